"""``culture-neurons compare``: finished tiny runs of two depths, other cultures and another
seed, compared from their files; numbers checked against plain computations on the masks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import save_cli_assets, snapshot

from culture_neurons.masks import load_masks
from culture_neurons.models.loading import save_processor
from culture_neurons.pipeline import cli
from culture_neurons.selection.stability import expected_jaccard
from culture_neurons.testing.tiny import tiny_config, tiny_processor

SMALL = ["--min-items", "4", "--ratio", "0.05", "--rnd-draws", "2", "--batch-size", "4",
         "--identify-on", "all", "--methods", "cas,lap", "--resamples", "50", "--quiet"]  # fmt: skip
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _deep_model(folder: Path, layers: int) -> str:
    """The tiny Qwen2.5-VL with ``layers`` decoder layers, saved as a user's model folder."""
    model_cls, config = tiny_config("qwen2_5_vl", num_hidden_layers=layers)
    torch.manual_seed(1)
    model_cls._from_config(config, dtype=torch.float32).eval().save_pretrained(folder)
    save_processor(tiny_processor("qwen2_5_vl"), folder)
    return str(folder)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """shallow (3 layers, 3 cultures), shallow_seed1 (same model, another split seed) and
    deep (6 layers, 4 cultures): three finished runs."""
    root = tmp_path_factory.mktemp("compare")
    three = save_cli_assets(root / "three", "qwen2_5_vl", cultures=3)
    four = save_cli_assets(root / "four", "qwen2_5_vl", cultures=4)
    deep = _deep_model(root / "deep_model", 6)
    out = {"shallow": root / "shallow", "shallow_seed1": root / "shallow_seed1",
           "deep": root / "deep"}  # fmt: skip
    for name, model, data, extra in (("shallow", three["model"], three["data"], []),
                                     ("shallow_seed1", three["model"], three["data"],
                                      ["--seed", "1"]),
                                     ("deep", deep, four["data"], [])):  # fmt: skip
        args = ["run", "--model", model, "--data", data, "--out", str(out[name]), *SMALL, *extra]
        assert cli.main(args) == 0, name
    return out


@pytest.fixture(scope="module")
def compared(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "cmp"
    before = {n: snapshot(p) for n, p in runs.items()}
    assert cli.main(["compare", *(str(p) for p in runs.values()), "--out", str(out),
                     "--quiet"]) == 0  # fmt: skip
    assert {n: snapshot(p) for n, p in runs.items()} == before  # the runs are only read
    return out, (out / "report.md").read_text()


def _mean_depth(masks, culture: int | None = None) -> float:
    """Mean (layer + 0.5) / L of the selected neurons, from the masks' flat indices."""
    flats = [masks.flat_of(c) for c in (range(len(masks)) if culture is None else [culture])]
    layers = torch.cat(flats) // masks.num_neurons
    return float(((layers.double() + 0.5) / masks.num_layers).mean())


def _row(text: str, *cells: str) -> str:
    start = "| " + " | ".join(cells) + " |"
    return next(line for line in text.splitlines() if line.startswith(start))


def test_writes_report_and_figures(compared, runs):
    out, text = compared
    for name in ["depth.png", "depth_cas.png", "depth_lap.png", "effects.png"]:
        data = (out / "figures" / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000, name
    for heading in ["## Runs", "## What differs between the runs",
                    "## Where the selected neurons sit", "### Per culture",
                    "## Primary measure and specificity", "## Same model: overlap",
                    "## Split-half stability of each run"]:  # fmt: skip
        assert heading in text, heading
    assert "3 x 96" in _row(text, "shallow") and "6 x 96" in _row(text, "deep")


def test_settings_that_differ_are_listed(compared):
    _, text = compared
    part = text.split("## What differs between the runs", 1)[1].split("\n## ", 1)[0]
    assert _row(part, "seed") == "| seed | 0 | 1 | 0 |"
    assert _row(part, "model").count("model") >= 2  # the two model folders
    assert "| ratio |" not in part  # equal in all runs: not listed


def test_mean_depth_matches_the_masks(compared, runs):
    _, text = compared
    for name, path in runs.items():
        for method in ("cas", "lap"):
            masks = load_masks(path / "masks" / f"{method}.safetensors")
            assert f"| {_mean_depth(masks):.2f} |" in _row(text, name, method), (name, method)
    # per culture: the cultures every run has (the deep run's fourth is not among them)
    shallow = load_masks(runs["shallow"] / "masks" / "lap.safetensors")
    deep = load_masks(runs["deep"] / "masks" / "lap.safetensors")
    assert len(deep.names) == 4 and deep.names[:3] == shallow.names
    part = text.split("lap:\n", 1)[1]
    for c, culture in enumerate(shallow.names):
        line = _row(part, culture)
        assert line.endswith(f"| {_mean_depth(deep, c):.2f} |"), line
    assert f"| {deep.names[3]} |" not in part.split("\n## ", 1)[0]
    assert f"deep: 1 culture(s) not in every run ({deep.names[3]})" in text


def test_overlap_only_between_runs_of_one_model(compared, runs):
    _, text = compared
    part = text.split("## Same model", 1)[1].split("\n## ", 1)[0]
    assert "### shallow vs shallow_seed1" in part
    assert "deep" not in part  # another model: its neurons do not correspond
    a = load_masks(runs["shallow"] / "masks" / "cas.safetensors")
    b = load_masks(runs["shallow_seed1"] / "masks" / "cas.safetensors")
    for c, culture in enumerate(a.names):
        A, B = set(a.flat_of(c).tolist()), set(b.flat_of(c).tolist())
        j = len(A & B) / len(A | B)
        e = expected_jaccard(len(A), len(B), a.num_layers * a.num_neurons)
        assert _row(part, culture, f"{j:.3f} ({e:.3f})"), culture


def test_effects_are_the_runs_own_numbers(compared, runs):
    _, text = compared
    ev = json.loads((runs["deep"] / "eval" / "lap.json").read_text())
    q = ev["p_gap_vs_rnd_adj"]
    line = _row(text.split("## Primary measure", 1)[1], "deep", "lap")
    assert ("does not beat RND" if q >= 0.05 else "beats RND") in line
    assert f"| {ev['gap']:.1f} [".replace("-0.0", "0.0") in line


def test_stability_of_each_run(compared, runs):
    _, text = compared
    st = json.loads((runs["deep"] / "eval" / "cas.json").read_text())["stability"]
    line = _row(text.split("## Split-half stability of each run", 1)[1], "deep")
    if "unavailable" in st:
        assert "n/a" in line
    else:
        assert f"{st['mean']:.3f} ({st['expected_mean']:.3f})" in line


def test_an_existing_comparison_is_replaced_only_with_overwrite(compared, runs, capsys):
    out, _ = compared
    args = ["compare", str(runs["shallow"]), str(runs["deep"]), "--out", str(out), "--quiet"]
    capsys.readouterr()
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "already holds a comparison" in err and "--overwrite" in err and err.count("\n") == 1
    assert cli.main([*args, "--overwrite"]) == 0
    text = (out / "report.md").read_text()
    assert "shallow_seed1" not in text and "## Runs" in text


@pytest.mark.parametrize("case", ["one run", "twice", "into a run", "not a run"])
def test_bad_inputs_are_one_line(runs, tmp_path, capsys, case):
    a, b = str(runs["shallow"]), str(runs["deep"])
    (tmp_path / "empty").mkdir()
    args = {"one run": [a], "twice": [a, a], "into a run": [a, b],
            "not a run": [a, str(tmp_path / "empty")]}[case]  # fmt: skip
    out = b if case == "into a run" else str(tmp_path / "cmp")
    capsys.readouterr()
    assert cli.main(["compare", *args, "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "cmp" / "report.md").exists()
