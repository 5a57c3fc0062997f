"""--max-image-tokens end to end through the CLI: recorded in run.json, applied to every
prompt of the run (the report and eval/full.json say how many image tokens items had), and
fixed for the run (another value on the same --out is refused, naming both)."""

from __future__ import annotations

import json

import pytest
from conftest import save_cli_assets

from culture_neurons.pipeline import cli

SMALL = ["--min-items", "4", "--batch-size", "4", "--identify-on", "all", "--quiet",
         "--ratio", "0.05", "--rnd-draws", "1", "--methods", "cas"]  # fmt: skip


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return save_cli_assets(tmp_path_factory.mktemp("budget"), "qwen2_5_vl")


def run(assets, out, *extra) -> int:
    return cli.main(["run", "--model", assets["model"], "--data", assets["data"], "--out",
                     str(out), *SMALL, *extra])  # fmt: skip


def tokens(out) -> dict:
    return json.loads((out / "eval" / "full.json").read_text())["input_tokens"]


def test_the_budget_is_recorded_applied_and_reported(assets, tmp_path, capsys):
    default, budget = tmp_path / "default", tmp_path / "budget"
    assert run(assets, default) == 0
    assert run(assets, budget, "--max-image-tokens", "2") == 0
    assert json.loads((budget / "run.json").read_text())["config"]["max_image_tokens"] == 2
    assert json.loads((default / "run.json").read_text())["config"]["max_image_tokens"] is None
    t, d = tokens(budget), tokens(default)
    assert t["budget"]["max_image_tokens"] == 2 and "max_pixels" in t["budget"]["how"]
    for split in ("evaluation", "identification"):
        assert t[split]["image_max"] <= 2 < d[split]["image_max"]
        assert t[split]["prompt_mean"] < d[split]["prompt_mean"]
        assert 0 < t[split]["image_share"] < d[split]["image_share"] < 1
    report = (budget / "report.md").read_text()
    assert "**Tokens**" in report and "at most 2 image tokens per image" in report
    assert "no --max-image-tokens" in (default / "report.md").read_text()

    # Fixed for the run: another budget on the same --out is refused before any model work.
    capsys.readouterr()
    code = cli.main(["evaluate", "--out", str(budget), "--max-image-tokens", "9", "--quiet"])
    assert code != 0
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "max-image-tokens" in err and "2" in err and "9" in err, err


def test_a_budget_the_model_cannot_meet_is_one_line(assets, tmp_path, capsys):
    lm = save_cli_assets(tmp_path, "llama")
    code = cli.main(["record", "--task", "mc", "--model", lm["model"], "--data", lm["data"],
                     "--out", str(tmp_path / "o"), "--max-image-tokens", "8", *SMALL[:7]])  # fmt: skip
    assert code != 0
    assert "takes no images" in capsys.readouterr().err.strip().splitlines()[-1]
