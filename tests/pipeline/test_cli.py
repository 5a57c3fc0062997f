"""The command line on a tiny saved model and synthetic CVQA: every command, resume after an
interruption, and one clear line for every user mistake."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import save_cli_assets

from culture_neurons.pipeline import cli
from culture_neurons.stats import load_stats

# Small on purpose: two methods and one RND draw keep each run to seconds on 2 CPU cores.
SMALL = ["--min-items", "4", "--ratio", "0.05", "--rnd-draws", "1", "--batch-size", "4",
         "--identify-on", "all", "--methods", "cas,lap", "--quiet"]  # fmt: skip


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return save_cli_assets(tmp_path_factory.mktemp("cli"), "qwen2_5_vl")


def args_for(assets, out, *extra) -> list[str]:
    return ["--model", assets["model"], "--data", assets["data"], "--out", str(out), *SMALL,
            *extra]  # fmt: skip


def main_ok(argv: list[str]) -> None:
    assert cli.main(argv) == 0, f"culture-neurons {' '.join(argv)} failed"


def eval_json(out, method: str) -> dict:
    return json.loads((out / "eval" / f"{method}.json").read_text())


def test_steps_then_run_give_the_same_matrices(assets, tmp_path):
    steps, whole = tmp_path / "steps", tmp_path / "whole"
    main_ok(["record", *args_for(assets, steps)])
    assert (steps / "stats.safetensors").exists()
    main_ok(["select", "--out", str(steps), "--ratio", "0.05", "--rnd-draws", "1",
             "--methods", "cas,lap"])  # fmt: skip
    assert (steps / "masks" / "cas.safetensors").exists()
    main_ok(["evaluate", *args_for(assets, steps)])
    main_ok(["report", "--out", str(steps)])
    main_ok(["run", *args_for(assets, whole)])
    for out in (steps, whole):
        for f in ("report.md", "figures/cas_delta.png", "figures/layers.png", "eval/rnd.json"):
            assert (out / f).exists(), f
    for method in ("cas", "lap", "rnd"):
        a, b = eval_json(steps, method), eval_json(whole, method)
        assert a["delta"] == b["delta"] and a["flip"] == b["flip"], method
        C = len(a["cultures"])
        assert len(a["delta"]) == C and all(len(row) == C for row in a["delta"])
        full = a["accuracy_full"]
        for s in range(C):
            for c in range(C):
                assert a["delta"][s][c] == pytest.approx(a["accuracy"][s][c] - full[c])
                assert 0 <= a["flip"][s][c] <= 1


def test_merge_adds_statistics(assets, tmp_path):
    a = tmp_path / "a"
    main_ok(["record", *args_for(assets, a)])
    main_ok(["merge", str(a), str(a), "--out", str(tmp_path / "m")])
    one, two = load_stats(a), load_stats(tmp_path / "m")
    assert torch.equal(two.K, 2 * one.K) and torch.equal(two.T, 2 * one.T)


def test_config_file_and_command_line_precedence(assets, tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('ratio = 0.2\nmethods = "cas"\nrnd_draws = 0\n')
    out = tmp_path / "cfg"
    main_ok(["record", *args_for(assets, out), "--config", str(cfg)])
    main_ok(["select", "--out", str(out), "--config", str(cfg), "--ratio", "0.1"])
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["ratio"] == 0.05  # record: the command line beat the file
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["cas.safetensors"]


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("stage", ["identification", "evaluation"])
def test_resume_after_interruption_gives_identical_results(assets, tmp_path, monkeypatch, stage):
    """Stop a run part-way (as Ctrl-C would), resume it: stats and matrices are identical."""
    ref = tmp_path / "ref"
    main_ok(["run", *args_for(assets, ref), "--checkpoint-every", "1"])
    out = tmp_path / "resumed"
    from culture_neurons.pipeline import tasks
    from culture_neurons.scoring.multiple_choice import Group

    target = (tasks, "encode") if stage == "identification" else (Group, "predict")
    original = getattr(*target)
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(*a, **k)

    monkeypatch.setattr(*target, flaky)
    assert cli.main(["run", *args_for(assets, out), "--checkpoint-every", "1"]) == 130
    monkeypatch.setattr(*target, original)
    progress = out / "progress" / ("stats/stats.json" if stage == "identification"
                                   else "matrix.jsonl")  # fmt: skip
    assert progress.exists(), "the interrupted run left no progress to resume from"
    main_ok(["run", *args_for(assets, out), "--checkpoint-every", "1", "--resume"])
    a, b = load_stats(ref), load_stats(out)
    for name in ("T", "K", "S", "Q", "items"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for method in ("cas", "lap", "rnd"):
        assert eval_json(ref, method) == eval_json(out, method), method


def test_resume_after_kill_9(assets, tmp_path):
    """A process killed with SIGKILL while recording resumes to the uninterrupted result."""
    ref, out = tmp_path / "ref", tmp_path / "killed"
    main_ok(["record", *args_for(assets, ref), "--checkpoint-every", "1"])
    cmd = [sys.executable, "-m", "culture_neurons", "record", *args_for(assets, out),
           "--checkpoint-every", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out / "progress" / "stats" / "stats.json"
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    main_ok(["record", *args_for(assets, out), "--checkpoint-every", "1", "--resume"])
    a, b = load_stats(ref), load_stats(out)
    for name in ("T", "K", "S", "Q", "items"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = cli.main(argv)
    return code, capsys.readouterr().err


def test_bad_input_gives_one_line_and_nonzero_exit(assets, tmp_path, capsys):
    def fails(argv, *needles):
        code, err = run_cli(argv, capsys)
        assert code != 0, argv
        last = err.strip().splitlines()[-1]
        assert last.startswith("error:"), err
        for needle in needles:
            assert needle in last, (needle, last)

    out = str(tmp_path / "o")
    base = ["--data", assets["data"], "--out", out, *SMALL]
    fails(["record", "--model", str(tmp_path / "nope"), *base], "cannot load model", "local")
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(gpt2)
    fails(["record", "--model", str(gpt2), *base], "not supported", "qwen2_5_vl")
    model = ["--model", assets["model"], "--out", out, *SMALL]
    fails(["record", *model, "--data", str(tmp_path / "missing")], "does not exist")
    bad = tmp_path / "bad.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": [1, 2]}), bad)
    fails(["record", *model, "--data", str(bad)], "missing")
    fails(["record", *model, "--data", assets["data"], "--cultures", "Atlantis"], "Atlantis")
    fails(["record", *model, "--data", assets["data"], "--ratio", "1.5"], "ratio")
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o500)
    if not os.access(readonly, os.W_OK):  # root writes anywhere: nothing to test there
        fails(["record", "--model", assets["model"], "--data", assets["data"],
               "--out", str(readonly / "x"), *SMALL], "writable")  # fmt: skip
    else:
        (readonly / "x").write_text("a file where a dir should be")
        fails(["record", "--model", assets["model"], "--data", assets["data"],
               "--out", str(readonly / "x"), *SMALL], "writable")  # fmt: skip
    fails(["record", *base, "--model", assets["model"], "--device", "cuda"]
          if not torch.cuda.is_available() else ["record", "--device", "cuda:99", *base],
          "GPU" if not torch.cuda.is_available() else "")  # fmt: skip
    # Stats from another model handed to evaluate.
    other = tmp_path / "other"
    llava = save_cli_assets(tmp_path / "llava", "llava")["model"]
    main_ok(["record", "--model", llava, "--data", assets["data"], "--out", str(other),
             *SMALL])  # fmt: skip
    main_ok(["select", "--out", str(other), "--ratio", "0.05", "--rnd-draws", "1",
             "--methods", "cas,lap"])  # fmt: skip
    fails(["evaluate", "--model", assets["model"], "--data", assets["data"], "--out", str(other),
           *SMALL], "another model")  # fmt: skip
    fails(["run", "--model", assets["model"], "--out", out, *SMALL], "--data")


def test_out_of_memory_suggests_a_smaller_batch(assets, tmp_path, capsys, monkeypatch):
    from culture_neurons.pipeline import tasks

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(tasks, "encode", oom)
    code, err = run_cli(["record", *args_for(assets, tmp_path / "oom")], capsys)
    assert code != 0 and "--batch-size" in err.strip().splitlines()[-1]


def test_every_command_has_help(capsys):
    for command in ("run", "record", "select", "evaluate", "report", "merge"):
        with pytest.raises(SystemExit) as e:
            cli.main([command, "--help"])
        assert e.value.code == 0
        assert "--out" in capsys.readouterr().out
