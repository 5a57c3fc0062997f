"""The steps of a run agree with each other (culture_neurons.pipeline.rundir), through the
command line as a user chains them: nothing stale, mixed, lost, overwritten or counted twice.

Every refusal is exit code 2, one line, no traceback, and leaves the output dir exactly as it
was (``assert_refused`` compares a snapshot of every file and mtime). Test names carry the
number of the case of issue #12 they close.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import assert_refused, save_cli_assets, snapshot

from culture_neurons.masks import load_masks
from culture_neurons.pipeline import cli, rundir

RECORD = ["--min-items", "4", "--batch-size", "4", "--identify-on", "all", "--quiet"]
SELECT = ["--ratio", "0.05", "--rnd-draws", "1", "--methods", "cas,lap"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny model, synthetic CVQA, and a model of the same architecture with other weights."""
    from culture_neurons.models.loading import save_processor
    from culture_neurons.testing.tiny import tiny_model, tiny_processor

    a = save_cli_assets(tmp_path_factory.mktemp("rundir"), "qwen2_5_vl")
    other = a["root"] / "other-weights"
    tiny_model("qwen2_5_vl", seed=1).save_pretrained(other)
    save_processor(tiny_processor("qwen2_5_vl"), other)
    return {**a, "other": str(other)}


def ok(argv: list[str]) -> None:
    assert cli.main(argv) == 0, f"culture-neurons {' '.join(argv)} failed"


def model_data(assets) -> list[str]:
    return ["--model", assets["model"], "--data", assets["data"]]


@pytest.fixture(scope="module")
def finished(assets, tmp_path_factory):
    """A finished run (stats, masks, eval, report) at ratio 0.05."""
    out = tmp_path_factory.mktemp("finished") / "run"
    ok(["run", *model_data(assets), "--out", str(out), *RECORD, *SELECT])
    return out


@pytest.fixture
def run_dir(finished, tmp_path):
    """A copy of the finished run to change."""
    return shutil.copytree(finished, tmp_path / "run")


def eval_json(out, name: str) -> dict:
    return json.loads((out / "eval" / f"{name}.json").read_text())


# -- 1: the model is its architecture and its weights ---------------------------------------
def test_1_same_architecture_other_weights_is_another_model(assets, run_dir, capsys):
    from culture_neurons.models import fingerprint
    from culture_neurons.models.loading import load_model

    a, b = (fingerprint(load_model(m)[0]) for m in (assets["model"], assets["other"]))
    assert a.config_hash == b.config_hash and a.weights_hash != b.weights_hash
    for argv in (["evaluate", "--out", str(run_dir), "--model", assets["other"]],
                 ["record", "--out", str(run_dir), "--model", assets["other"], "--resume"]):
        assert_refused(argv, capsys, "another model", "weights", watch=[run_dir])


def test_1_2_matrix_cache_is_keyed_on_model_items_and_masks(tmp_path):
    from culture_neurons.pipeline.group_log import _read_groups

    log = tmp_path / "matrix.jsonl"
    rows = [{"key": "A", "group": 0, "items": ["x"], "preds": [[1]]},
            {"key": "B", "group": 1, "items": ["y"], "preds": [[2]]},
            {"group": 2, "items": ["z"], "preds": [[3]]}]  # fmt: skip  (no key: an old log)
    log.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"key": "A", "gro')  # torn
    assert list(_read_groups(log, "A")) == [0] and list(_read_groups(log, "B")) == [1]
    assert _read_groups(log, "C") == {}


# -- 2: cached predictions follow the masks' content -----------------------------------------
@pytest.mark.slow
def test_2_select_again_then_evaluate_equals_a_fresh_run(assets, run_dir, tmp_path):
    """select --ratio 0.1 --overwrite, then evaluate: the same numbers as a run at 0.1 from
    scratch (the 0.05 matrices cached in progress/ are not reused for the new masks)."""
    ok(["select", "--out", str(run_dir), "--ratio", "0.1", "--overwrite"])
    assert not (run_dir / "eval").exists() and not (run_dir / "report.md").exists()
    ok(["evaluate", "--out", str(run_dir), "--quiet"])
    fresh = tmp_path / "fresh"
    ok(["run", *model_data(assets), "--out", str(fresh), *RECORD, *SELECT, "--ratio", "0.1"])
    for name in ("cas", "lap"):
        a, b = eval_json(run_dir, name), eval_json(fresh, name)
        assert a == b, name
    sizes = load_masks(run_dir / "masks" / "cas.safetensors").sizes().tolist()
    assert eval_json(run_dir, "cas")["set_sizes"] == sizes
    run = json.loads((run_dir / "run.json").read_text())
    assert run["config"]["ratio"] == 0.1
    assert run["changes"] == [{"step": "select", "setting": "ratio", "from": 0.05, "to": 0.1}]


# -- 3: every step reads run.json ------------------------------------------------------------
def test_3_select_takes_the_runs_settings(run_dir, finished):
    """After a run at 0.05, `select --overwrite` without --ratio selects 0.05 again (not the
    0.005 default): the same masks, carrying the run's settings."""
    before = {p.name: load_masks(p).content_hash() for p in (finished / "masks").iterdir()}
    ok(["select", "--out", str(run_dir), "--overwrite"])
    for name, h in before.items():
        m = load_masks(run_dir / "masks" / name)
        assert m.content_hash() == h and m.options["selection"]["ratio"] == 0.05, name
    assert json.loads((run_dir / "run.json").read_text())["changes"] == []


def test_3_masks_are_checked_against_the_run(run_dir, capsys):
    """Masks selected with other settings than run.json's are refused by evaluate and report."""
    meta = json.loads((run_dir / "run.json").read_text())
    meta["config"]["ratio"] = 0.2
    (run_dir / "run.json").write_text(json.dumps(meta))
    for command in ("evaluate", "report"):
        assert_refused([command, "--out", str(run_dir)], capsys, "--ratio 0.05", "0.2",
                       "select", watch=[run_dir])  # fmt: skip


def test_3_a_setting_that_contradicts_the_run_is_refused(run_dir, tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('scope = "text"\n')
    line = assert_refused(["select", "--out", str(run_dir), "--overwrite", "--config", str(cfg)],
                          capsys, f"scope in {cfg} text", "this run's all", watch=[run_dir])  # fmt: skip
    assert "--scope all" in line  # what to pass
    cfg.write_text("ratio = 0.1\n")
    assert_refused(["evaluate", "--out", str(run_dir), "--config", str(cfg)], capsys,
                   "ratio in", "0.1", "0.05", "select --out", watch=[run_dir])  # fmt: skip
    assert_refused(["run", *model_data_of(run_dir), "--out", str(run_dir), "--resume",
                    "--scope", "text", "--quiet"], capsys, "--scope text", "this run's all",
                   watch=[run_dir])  # fmt: skip


def test_3_other_items_are_refused_before_the_model_loads(run_dir, tmp_path, capsys,
                                                         monkeypatch):  # fmt: skip
    from culture_neurons.data import write_synthetic_cvqa
    from culture_neurons.models import loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    other = write_synthetic_cvqa(tmp_path / "other", cultures=3, items_per_culture=8, seed=5)
    assert_refused(["evaluate", "--out", str(run_dir), "--data", str(other)], capsys,
                   "other items", "pass the run's --data", watch=[run_dir])  # fmt: skip
    fewer = write_synthetic_cvqa(tmp_path / "fewer", cultures=2, items_per_culture=8)
    assert_refused(["evaluate", "--out", str(run_dir), "--data", str(fewer)], capsys,
                   "cultures", watch=[run_dir])  # fmt: skip


def model_data_of(out) -> list[str]:
    inputs = json.loads((out / "run.json").read_text())["inputs"]
    return ["--model", inputs["model"], "--data", inputs["data"]]


def test_3_report_refuses_results_of_replaced_masks(run_dir, finished, capsys):
    ok(["select", "--out", str(run_dir), "--ratio", "0.1", "--overwrite", "--quiet"])
    shutil.copytree(finished / "eval", run_dir / "eval")  # results of the 0.05 masks
    assert_refused(["report", "--out", str(run_dir)], capsys, "other masks", "evaluate",
                   watch=[run_dir])  # fmt: skip


# -- 4: nothing replaced without --overwrite ---------------------------------------------------
def test_4_select_and_merge_need_overwrite(run_dir, finished, capsys):
    assert_refused(["select", "--out", str(run_dir)], capsys, "already holds masks",
                   "--overwrite", watch=[run_dir])  # fmt: skip
    assert_refused(["merge", str(finished), "--out", str(run_dir)], capsys, "already holds",
                   "--overwrite", watch=[run_dir])  # fmt: skip


def test_4_merge_overwrite_replaces_what_the_stats_made(run_dir, finished):
    ok(["merge", str(finished), "--out", str(run_dir), "--overwrite", "--quiet"])
    # the statistics and their split halves (pipeline.halves), nothing made from them
    assert sorted(rundir.present(run_dir)) == ["halves", "run.json", "stats.json",
                                               "stats.safetensors"]  # fmt: skip


# -- 5: the same statistics twice ------------------------------------------------------------
def test_5_merge_refuses_the_same_statistics_twice(finished, tmp_path, capsys):
    copy = shutil.copytree(finished, tmp_path / "copy")
    out = tmp_path / "merged"
    for inputs, needle in (([finished, finished], "same statistics"),
                           ([finished, finished / "stats.json"], "same statistics"),
                           ([finished, copy], "identical statistics")):  # fmt: skip
        assert_refused(["merge", *map(str, inputs), "--out", str(out)], capsys, needle,
                       "once", watch=[out, finished])  # fmt: skip
        assert not out.exists()


# -- 6: a step that fails on its inputs writes nothing -----------------------------------------
@pytest.mark.slow
def test_6_evaluate_without_masks_writes_nothing(assets, tmp_path, capsys):
    empty = tmp_path / "empty"
    assert_refused(["evaluate", "--out", str(empty)], capsys, "does not exist", watch=[empty])
    assert not empty.exists()
    empty.mkdir()
    assert_refused(["evaluate", "--out", str(empty), *model_data(assets)], capsys,
                   "holds no stats.json", "select", watch=[empty])  # fmt: skip
    recorded = tmp_path / "recorded"
    ok(["record", *model_data(assets), "--out", str(recorded), *RECORD])
    assert_refused(["evaluate", "--out", str(recorded)], capsys, "holds no masks", "select",
                   watch=[recorded])  # fmt: skip
    ok(["run", *model_data(assets), "--out", str(empty), *RECORD, *SELECT])  # still usable


# -- 7: hidden labels: the default follows, an explicit correct is refused up front ----------
def test_7_identify_on_correct_on_hidden_labels_is_refused_before_anything(assets, tmp_path,
                                                                          capsys):  # fmt: skip
    from culture_neurons.data import write_synthetic_cvqa

    hidden = write_synthetic_cvqa(tmp_path / "hidden", cultures=3, items_per_culture=8,
                                  hidden_labels=True)  # fmt: skip
    out = tmp_path / "out"
    argv = ["run", "--model", assets["model"], "--data", str(hidden), "--out", str(out),
            "--min-items", "4", "--identify-on", "correct", "--quiet"]  # fmt: skip
    assert_refused(argv, capsys, "--identify-on correct", "hidden", "--identify-on all",
                   watch=[out], alone=False)  # fmt: skip  (after the loader's warning)
    assert not out.exists()


# -- 8: an unreadable file of ours is one line naming it ---------------------------------------
def test_8_damaged_files_are_one_line_naming_them(run_dir, capsys):
    masks = run_dir / "masks" / "cas.safetensors"
    masks.write_bytes(masks.read_bytes()[:40])
    assert_refused(["evaluate", "--out", str(run_dir)], capsys, str(masks), "select",
                   watch=[run_dir])  # fmt: skip
    stats = run_dir / "stats.safetensors"
    stats.write_bytes(stats.read_bytes()[:100])
    assert_refused(["select", "--out", str(run_dir), "--overwrite"], capsys, str(stats),
                   "truncated", watch=[run_dir])  # fmt: skip
    (run_dir / "run.json").write_text('{"config": ')
    assert_refused(["report", "--out", str(run_dir)], capsys, "run.json", watch=[run_dir])


def test_8_files_of_an_older_version_are_refused(run_dir, capsys):
    for name in ("stats.json", "run.json"):
        meta = json.loads((run_dir / name).read_text())
        del meta["fingerprint"]["weights_hash"]
        (run_dir / name).write_text(json.dumps(meta))
    assert_refused(["select", "--out", str(run_dir), "--overwrite"], capsys,
                   "did not cover the weights", "record", watch=[run_dir])  # fmt: skip


# -- 11: an empty selection is an error --------------------------------------------------------
def test_11_a_ratio_that_selects_nothing_is_refused(run_dir, capsys):
    assert_refused(["select", "--out", str(run_dir), "--ratio", "0.0001", "--overwrite"], capsys,
                   "--ratio 0.0001 selects no neuron", "above", watch=[run_dir])  # fmt: skip


def test_11_a_culture_without_neurons_is_a_warning(caplog):
    from culture_neurons.masks import Masks
    from culture_neurons.pipeline.config import RunConfig
    from culture_neurons.selection.controls import _check_sizes
    from culture_neurons.stats import Fingerprint

    fp = Fingerprint("t", "t", 2, 5, 4, "silu", "c", "w")
    m = Masks.from_sets(["a", "b"], [torch.tensor([1, 7]), torch.tensor([], dtype=torch.int64)],
                        fp)  # fmt: skip
    with caplog.at_level("WARNING"):
        _check_sizes({"cas": m}, RunConfig(ratio=0.2))
    assert "cas selected no neuron for b" in caplog.text


# -- 13: missing paths are named as given ------------------------------------------------------
def test_13_missing_out_and_inputs_are_named(tmp_path, capsys):
    nope = tmp_path / "nope"
    for argv, needle in ((["select", "--out", str(nope)], f"--out {nope} does not exist"),
                         (["report", "--out", str(nope)], f"--out {nope} does not exist"),
                         (["merge", str(nope), "--out", str(tmp_path / "m")],
                          f"merge input {nope} does not exist")):  # fmt: skip
        assert_refused(argv, capsys, needle, watch=[tmp_path])


# -- 14, 15: checks that need no model run before it loads, in the CLI's words -----------------
def test_14_15_refusals_before_the_model_loads(assets, finished, tmp_path, capsys, monkeypatch):
    from culture_neurons.models import loading

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before a check that needs no model")

    monkeypatch.setattr(loading, "load_model", no_model)
    out = tmp_path / "new"
    base = ["run", *model_data(assets), "--out", str(out), *RECORD]
    cases = [
        (["run", *model_data(assets), "--out", str(finished), *RECORD],
         ["already holds a run", "--resume", "--overwrite"]),
        ([*base, "--cultures", "Atlantis"], ["Atlantis"]),
        ([*base, "--batch-size", "0"], ["--batch-size must be >= 1, got 0"]),
        ([*base, "--max-items", "0"], ["--max-items must be >= 1, got 0"]),
        ([*base, "--resume", "--overwrite"], ["--resume and --overwrite do not combine"]),
        ([*base, "--ratio", "2"], ["--ratio must be a share in (0, 1)"]),
    ]  # fmt: skip
    if not torch.cuda.is_available():
        cases.append(([*base, "--device", "cuda"], ["--device cuda", "no CUDA GPU"]))
    for argv, needles in cases:
        assert_refused(argv, capsys, *needles, watch=[out, finished])
        assert not out.exists()


def test_15_resume_on_a_dir_that_never_ran_starts_fresh(assets, tmp_path, capsys):
    out = tmp_path / "fresh"
    assert cli.main(["record", *model_data(assets), "--out", str(out), *RECORD[:-1],
                     "--resume"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "holds no run yet; starting fresh" in err and "Traceback" not in err
    assert (out / "stats.json").exists()


def test_15_version(capsys):
    from culture_neurons import __version__

    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"culture-neurons {__version__}"


# -- the whole chain, as a user would try it ----------------------------------------------------
def test_a_user_chain_ends_consistent(assets, run_dir, tmp_path, capsys):
    """run, select with other options, evaluate with another model (refused), merge (the
    same run twice: refused), report: every step agrees with run.json."""
    ok(["select", "--out", str(run_dir), "--ratio", "0.1", "--methods", "cas", "--overwrite",
        "--quiet"])  # fmt: skip
    assert_refused(["evaluate", "--out", str(run_dir), "--model", assets["other"]], capsys,
                   "another model", watch=[run_dir])  # fmt: skip
    assert_refused(["merge", str(run_dir), str(run_dir), "--out", str(tmp_path / "m")], capsys,
                   "same statistics")  # fmt: skip
    ok(["evaluate", "--out", str(run_dir), "--quiet"])
    ok(["report", "--out", str(run_dir)])
    report = (run_dir / "report.md").read_text()
    assert "= 10% of all neurons" in report and "methods = cas;" in report
    assert sorted(p.stem for p in (run_dir / "eval").glob("*.json")) == ["cas", "full"]
    assert snapshot(run_dir)  # the dir holds the consistent result
