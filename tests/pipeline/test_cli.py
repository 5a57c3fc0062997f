"""The command line on a tiny saved model and synthetic CVQA: every command, resume after an
interruption, the default (correct-items) and hidden-label paths end to end, and one clear
line for every user mistake. The seams between steps (run.json, caches, refusals) are tested
in test_rundir.py, the option table in test_options.py."""

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
RECORD = ["--min-items", "4", "--batch-size", "4", "--identify-on", "all", "--quiet"]
SELECT = ["--ratio", "0.05", "--rnd-draws", "1", "--methods", "cas,lap"]
SMALL = RECORD + SELECT  # what `run` takes


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return save_cli_assets(tmp_path_factory.mktemp("cli"), "qwen2_5_vl")


def args_for(assets, out, *extra, options=SMALL) -> list[str]:
    return ["--model", assets["model"], "--data", assets["data"], "--out", str(out), *options,
            *extra]  # fmt: skip


def main_ok(argv: list[str]) -> None:
    assert cli.main(argv) == 0, f"culture-neurons {' '.join(argv)} failed"


def eval_json(out, method: str) -> dict:
    return json.loads((out / "eval" / f"{method}.json").read_text())


def test_steps_then_run_give_the_same_matrices(assets, tmp_path):
    steps, whole = tmp_path / "steps", tmp_path / "whole"
    main_ok(["record", *args_for(assets, steps, options=RECORD)])
    assert (steps / "stats.safetensors").exists()
    main_ok(["select", "--out", str(steps), *SELECT])
    assert (steps / "masks" / "cas.safetensors").exists()
    main_ok(["evaluate", "--out", str(steps), "--quiet"])  # model and data: the run's
    main_ok(["report", "--out", str(steps)])
    main_ok(["run", *args_for(assets, whole)])
    for out in (steps, whole):
        for f in ("report.md", "figures/cas_delta.png", "figures/layers.png"):
            assert (out / f).exists(), f
        assert list((out / "masks").glob("rnd-*cas*-0.safetensors")), "no RND draw for cas"
        assert not (out / "eval" / "rnd.json").exists()  # each method carries its own control
    for method in ("cas", "lap"):
        a, b = eval_json(steps, method), eval_json(whole, method)
        assert a["delta"] == b["delta"] and a["flip"] == b["flip"], method
        C = len(a["cultures"])
        assert len(a["delta"]) == C and all(len(row) == C for row in a["delta"])
        full = a["accuracy_full"]
        for s in range(C):
            for c in range(C):
                assert a["delta"][s][c] == pytest.approx(a["accuracy"][s][c] - full[c])
                assert 0 <= a["flip"][s][c] <= 1


def test_merge_adds_statistics_of_other_data(assets, tmp_path):
    """Two runs on two datasets (same cultures and settings) add up; run.json says both."""
    from culture_neurons.data import write_synthetic_cvqa

    other = write_synthetic_cvqa(tmp_path / "cvqa2", cultures=3, items_per_culture=8, seed=5)
    a, b, m = tmp_path / "a", tmp_path / "b", tmp_path / "m"
    main_ok(["record", *args_for(assets, a, options=RECORD)])
    main_ok(["record", "--model", assets["model"], "--data", str(other), "--out", str(b),
             *RECORD])  # fmt: skip
    main_ok(["merge", str(a), str(b / "stats.json"), "--out", str(m)])
    one, two, both = load_stats(a), load_stats(b), load_stats(m)
    for name in ("T", "K", "items"):
        assert torch.equal(getattr(both, name), getattr(one, name) + getattr(two, name)), name
    torch.testing.assert_close(both.S, one.S + two.S, rtol=0, atol=0)  # one fp64 addition
    run = json.loads((m / "run.json").read_text())
    assert run["merged_from"] == [str(a), str(b)] and run["data_hash"] is None


def test_config_file_and_command_line_precedence(assets, tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('ratio = 0.2\nmethods = "cas"\nrnd_draws = 0\nbatch_size = 2\n')
    out = tmp_path / "cfg"
    main_ok(["record", *args_for(assets, out, options=RECORD), "--config", str(cfg)])
    run = json.loads((out / "run.json").read_text())
    # record: the command line beat the file (batch size), the file beat the defaults
    assert run["config"]["batch_size"] == 4 and run["config"]["ratio"] == 0.2
    main_ok(["select", "--out", str(out), "--config", str(cfg), "--ratio", "0.1"])
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["ratio"] == 0.1 and run["config"]["methods"] == ["cas"]
    assert run["changes"] == [{"step": "select", "setting": "ratio", "from": 0.2, "to": 0.1}]
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["cas.safetensors"]


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("stage", ["identification", "evaluation"])
def test_resume_after_interruption_gives_identical_results(assets, tmp_path, monkeypatch, stage):
    """Stop a run part-way (as Ctrl-C would), resume it: stats and matrices are identical."""
    ref = tmp_path / "ref"
    main_ok(["run", *args_for(assets, ref), "--checkpoint-every", "1"])
    out = tmp_path / "resumed"
    from culture_neurons.scoring.multiple_choice import Group
    from culture_neurons.tasks import mc as tasks  # the module whose encode MCTask calls

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
    for method in ("cas", "lap"):
        assert eval_json(ref, method) == eval_json(out, method), method


def test_resume_after_kill_9(assets, tmp_path):
    """A process killed with SIGKILL while recording resumes to the uninterrupted result."""
    ref, out = tmp_path / "ref", tmp_path / "killed"
    # One item per batch, a checkpoint after each: the child is killed with batches to go.
    slow = ["--checkpoint-every", "1", "--batch-size", "1"]
    main_ok(["record", *args_for(assets, ref, *slow, options=RECORD)])
    cmd = [sys.executable, "-m", "culture_neurons", "record",
           *args_for(assets, out, *slow, options=RECORD)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out / "progress" / "stats" / "stats.json"
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the child finished before it could be killed"
    assert not (out / "stats.json").exists()  # really stopped mid-way
    main_ok(["record", *args_for(assets, out, *slow, "--resume", options=RECORD)])
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
    base = ["--data", assets["data"], "--out", out, *RECORD]
    fails(["record", "--model", str(tmp_path / "nope"), *base], "cannot load model", "local")
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(gpt2)
    fails(["record", "--model", str(gpt2), *base], "not supported", "qwen2_5_vl")
    model = ["--model", assets["model"], "--out", out, *RECORD]
    fails(["record", *model, "--data", str(tmp_path / "missing")], "does not exist")
    bad = tmp_path / "bad.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": [1, 2]}), bad)
    fails(["record", *model, "--data", str(bad)], "missing")
    fails(["record", *model, "--data", assets["data"], "--cultures", "Atlantis"], "Atlantis")
    fails(["run", *model, "--data", assets["data"], "--ratio", "1.5"], "--ratio")
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o500)
    if not os.access(readonly, os.W_OK):  # root writes anywhere: nothing to test there
        fails(["record", "--model", assets["model"], "--data", assets["data"],
               "--out", str(readonly / "x"), *RECORD], "writable")  # fmt: skip
    else:
        (readonly / "x").write_text("a file where a dir should be")
        fails(["record", "--model", assets["model"], "--data", assets["data"],
               "--out", str(readonly / "x"), *RECORD], "is a file")  # fmt: skip
    fails(["record", *base, "--model", assets["model"], "--device", "cuda"]
          if not torch.cuda.is_available() else ["record", "--device", "cuda:99", *base],
          "GPU" if not torch.cuda.is_available() else "")  # fmt: skip
    # Stats from another model handed to evaluate.
    other = tmp_path / "other"
    llava = save_cli_assets(tmp_path / "llava", "llava")["model"]
    main_ok(["record", "--model", llava, "--data", assets["data"], "--out", str(other),
             *RECORD])  # fmt: skip
    main_ok(["select", "--out", str(other), *SELECT])
    fails(["evaluate", "--model", assets["model"], "--data", assets["data"], "--out", str(other),
           "--quiet"], "another model")  # fmt: skip
    fails(["run", "--model", assets["model"], "--out", out, *SMALL], "--data")


def test_out_of_memory_suggests_a_smaller_batch(assets, tmp_path, capsys, monkeypatch):
    from culture_neurons.tasks import mc as tasks  # the module whose encode MCTask calls

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(tasks, "encode", oom)
    code, err = run_cli(["record", *args_for(assets, tmp_path / "oom", options=RECORD)], capsys)
    assert code != 0 and "--batch-size" in err.strip().splitlines()[-1]


def test_every_command_has_help(capsys):
    for command in ("run", "record", "select", "evaluate", "report", "merge"):
        assert cli.main([command, "--help"]) == 0
        assert "--out" in capsys.readouterr().out


@pytest.mark.slow
def test_default_identify_on_correct_end_to_end(tmp_path, monkeypatch):
    """The default path (the items the full model answers correctly) through the command
    line, in one prefill per item, interrupted mid-identification: the resume scores only the
    batches after the checkpoint, the predictions are the full model's, and every culture's
    statistics count exactly the items an independent pass gets right.
    (That a resumed run ends with the uninterrupted numbers is tested in test_run.py.)"""
    from culture_neurons.data import load_cvqa
    from culture_neurons.models.loading import load_model
    from culture_neurons.pipeline.batching import by_length
    from culture_neurons.scoring.multiple_choice import Group, predict
    from culture_neurons.scoring.prompting import prompt_lengths

    # 12 items per culture, data seed 1: the random tiny model gets some of every culture right
    a = save_cli_assets(tmp_path / "assets", "qwen2_5_vl", items=12, seed=1)
    argv = ["run", "--model", a["model"], "--data", a["data"], "--min-items", "4",
            "--batch-size", "4", "--ratio", "0.05", "--methods", "cas", "--rnd-draws", "1",
            "--checkpoint-every", "1", "--quiet", "--out", str(tmp_path / "out")]  # fmt: skip
    out = tmp_path / "out"
    staged, calls = Group.predict_staged, []

    def stop(self, *args, **kw):  # the second batch: the first is scored and checkpointed
        calls.append(len(self.items))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return staged(self, *args, **kw)

    monkeypatch.setattr(Group, "predict_staged", stop)
    assert cli.main(argv) == 130
    assert not (out / "stats.json").exists()
    data = load_cvqa(a["data"], min_items=4)
    items = [it for c in data.cultures for it in data.split(0.5, 0)[0].items_by_culture[c]]
    model, processor = load_model(a["model"])
    items = [items[i] for i in by_length(items, prompt_lengths(model, processor, items))]
    ref = predict(model, processor, items, batch_size=4).tolist()  # the run's batches
    calls.clear()
    monkeypatch.setattr(Group, "predict_staged", lambda self, *a, **kw: (
        calls.append(len(self.items)), staged(self, *a, **kw))[1])  # fmt: skip
    main_ok([*argv, "--resume"])
    assert len(calls) == -(-len(items) // 4) - 1, "the resumed run scored a checkpointed batch"
    cached = json.loads((out / "progress" / "ident_full.json").read_text())
    assert cached["preds"] == {it.id: p for it, p in zip(items, ref, strict=True)}
    stats = load_stats(out)
    correct = [sum(p == it.label for it, p in zip(items, ref, strict=True) if it.culture == c)
               for c in data.cultures]  # fmt: skip
    assert stats.items.tolist() == correct and all(correct)
    assert stats.options["items"] == "correct"
    assert json.loads((out / "run.json").read_text())["config"]["identify_on"] == "correct"
    ev = eval_json(out, "cas")
    assert ev["labels_available"] and len(ev["accuracy_full"]) == 3
    assert ev["rnd"]["set_sizes"] == ev["set_sizes"] and ev["gap_ci"] is not None


@pytest.mark.slow
def test_hidden_labels_end_to_end(assets, tmp_path, capsys):
    """Public CVQA hides its labels: identification uses every item (one notice says why),
    the eval JSONs and the report give flip rates only, never an accuracy."""
    from culture_neurons.data import write_synthetic_cvqa

    hidden = write_synthetic_cvqa(tmp_path / "hidden", cultures=3, items_per_culture=8,
                                  hidden_labels=True)  # fmt: skip
    out = tmp_path / "out"
    main_ok(["run", "--model", assets["model"], "--data", str(hidden), "--out", str(out),
             "--min-items", "4", "--batch-size", "4", *SELECT])  # fmt: skip
    captured = capsys.readouterr()
    notices = [line for line in captured.err.splitlines() if "--identify-on all" in line]
    assert len(notices) == 1 and "hidden" in notices[0]
    assert "flip_gap" in captured.out and "accuracy" not in captured.out
    assert json.loads((out / "run.json").read_text())["config"]["identify_on"] == "all"
    for method in ("cas", "lap"):
        ev = eval_json(out, method)
        assert ev["labels_available"] is False
        for key in ("accuracy_full", "accuracy", "delta", "self", "cross", "gap", "gap_ci",
                    "specificity", "p_gap_vs_rnd"):  # fmt: skip
            assert ev[key] is None, (method, key)
        assert ev["flip_gap_ci"] is not None and ev["p_flip_gap_vs_rnd"] is not None
        assert all(0 <= f <= 1 for row in ev["flip"] for f in row if f is not None)
        assert ev["flip_self"] is not None
    report = (out / "report.md").read_text()
    assert "Labels are hidden in this data: accuracy is unavailable" in report
    assert "accuracy (%)" not in report and "(points)" not in report and "flip self" in report
    assert not list((out / "figures").glob("*_delta.png"))
