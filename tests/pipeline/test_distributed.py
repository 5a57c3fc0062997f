"""Data parallel (2 gloo ranks on CPU) and ``record --shard`` + ``merge`` against one process,
with every identification item and with the default, the items answered correctly."""

from __future__ import annotations

import json
import os
import shutil
import socket

import pytest
import torch
import torch.multiprocessing as mp
from conftest import save_cli_assets

from culture_neurons.errors import StatsMismatchError
from culture_neurons.pipeline import cli
from culture_neurons.stats import load_stats, merge_shards

RECORD = ["--min-items", "4", "--batch-size", "2", "--quiet"]
SELECT = ["--ratio", "0.05", "--rnd-draws", "1", "--methods", "cas,lap"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_cli_assets(tmp_path_factory.mktemp("dist"), "llava", seed=1)


@pytest.fixture(scope="module")
def assets(saved):
    """`record` arguments, every identification item."""
    return ["--model", saved["model"], "--data", saved["data"], *RECORD, "--identify-on", "all"]


def assert_same_stats(a, b) -> None:
    """Counts exactly; sums to fp64 rounding (ranks add the same batches in another order)."""
    for name in ("T", "K", "items"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for name in ("S", "Q"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-12, atol=1e-12)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, argv: list[str], codes) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    codes[rank] = cli.main(argv)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _two_ranks(argv: list[str]) -> None:
    codes = mp.Manager().dict()
    mp.spawn(_rank, args=(2, _free_port(), argv, codes), nprocs=2, join=True)
    assert dict(codes) == {0: 0, 1: 0}


def test_two_gloo_ranks_equal_one_process(assets, tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    assert cli.main(["run", *assets, *SELECT, "--out", str(single)]) == 0
    _two_ranks(["run", *assets, *SELECT, "--out", str(multi)])
    assert_same_stats(load_stats(single), load_stats(multi))
    for method in ("cas", "lap", "full"):
        a = json.loads((single / "eval" / f"{method}.json").read_text())
        b = json.loads((multi / "eval" / f"{method}.json").read_text())
        assert a == b, method
    assert (multi / "report.md").exists()


@pytest.mark.slow
def test_ranks_record_the_correct_items_of_one_process(saved, tmp_path):
    """identify_on="correct" (the default): ranks predict their share of the items, share the
    predictions, and record the correct items in the batches one process would use."""
    argv = ["record", "--model", saved["model"], "--data", saved["data"], *RECORD]
    single, multi = tmp_path / "single", tmp_path / "multi"
    assert cli.main([*argv, "--out", str(single)]) == 0
    _two_ranks([*argv, "--out", str(multi)])
    a, b = load_stats(single), load_stats(multi)
    assert a.options["items"] == "correct" and 0 < int(a.items.sum()) < 3 * 4  # some, not all
    assert_same_stats(a, b)
    # Each rank predicted its own half of the identification items, the union is everything.
    preds = [json.loads((multi / "progress" / f"ident_full-{r}of2.json").read_text())["preds"]
             for r in range(2)]  # fmt: skip
    whole = json.loads((single / "progress" / "ident_full.json").read_text())["preds"]
    assert not set(preds[0]) & set(preds[1]) and {**preds[0], **preds[1]} == whole


def record_shards(assets, tmp_path, n: int):
    """``record --shard i/n`` for every i, then ``merge``: (the shards' dirs, the merged dir)."""
    shards = []
    for i in range(n):
        out = tmp_path / f"s{i}"
        assert cli.main(["record", *assets, "--out", str(out), "--shard", f"{i}/{n}"]) == 0
        shards.append(out)
    merged = tmp_path / "merged"
    assert cli.main(["merge", *map(str, shards), "--out", str(merged)]) == 0
    return shards, merged


def test_shards_merge_to_the_unsharded_stats(assets, tmp_path):
    whole = tmp_path / "whole"
    assert cli.main(["record", *assets, "--out", str(whole)]) == 0
    shards, merged = record_shards(assets, tmp_path, 3)
    assert_same_stats(load_stats(whole), load_stats(merged))
    # the split halves merge too (pipeline.halves)
    assert_same_stats(load_stats(whole / "halves"), load_stats(merged / "halves"))
    parts = [load_stats(s) for s in shards]
    assert [p.shard for p in parts] == [(0, 3), (1, 3), (2, 3)]
    with pytest.raises(StatsMismatchError, match="missing: 2/3"):
        merge_shards(parts[:2])
    with pytest.raises(StatsMismatchError, match="overlapping .*1/3"):
        merge_shards([parts[0], parts[1], parts[1], parts[2]])


def test_a_shard_alone_is_not_selected_from(assets, tmp_path, capsys):
    out = tmp_path / "s0"
    assert cli.main(["record", *assets, "--out", str(out), "--shard", "0/2"]) == 0
    assert cli.main(["select", "--out", str(out)]) == 2
    assert cli.main(["record", *assets, "--out", str(tmp_path / "x"), "--shard", "2/2"]) == 2
    err = capsys.readouterr().err
    assert "shard" in err


# -- every matrix mode and the LM task scale like exact ------------------------------------------
@pytest.fixture(scope="module")
def exact_run(assets, tmp_path_factory):
    """A finished exact run (one process) that each mode evaluates again."""
    out = tmp_path_factory.mktemp("exact") / "run"
    assert cli.main(["run", *assets, *SELECT, "--out", str(out)]) == 0
    return out


def _evals(out) -> dict:
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / "eval").glob("*.json"))}


@pytest.mark.parametrize("mode", ["estimate", "screen"])
def test_matrix_modes_under_two_ranks_equal_one_process(exact_run, tmp_path, mode):
    """``evaluate --matrix estimate|screen`` on 2 gloo ranks writes the one process's eval
    JSONs (screening's rounds, decided on every rank from gathered scores, included)."""
    single, multi = tmp_path / "single", tmp_path / "multi"
    shutil.copytree(exact_run, single)
    shutil.copytree(exact_run, multi)
    argv = ["evaluate", "--matrix", mode, "--quiet"]
    assert cli.main([*argv, "--out", str(single)]) == 0
    _two_ranks([*argv, "--out", str(multi)])
    a, b = _evals(single), _evals(multi)
    assert a == b and a["cas"]["matrix"] == mode
    if mode == "screen":
        assert a["cas"]["screen"]["rounds"] and "confirmed" in a["cas"]


@pytest.mark.slow
def test_sharded_statistics_screen_like_one_process(assets, exact_run, tmp_path):
    """``record --shard`` + ``merge``, then select and ``evaluate --matrix screen``: the
    single process's screened eval JSONs."""
    single = tmp_path / "single"
    shutil.copytree(exact_run, single)
    assert cli.main(["evaluate", "--out", str(single), "--matrix", "screen", "--quiet"]) == 0
    _, merged = record_shards(assets, tmp_path, 2)
    assert cli.main(["select", "--out", str(merged), *SELECT]) == 0
    assert cli.main(["evaluate", "--out", str(merged), "--matrix", "screen", "--quiet"]) == 0
    a, b = _evals(single), _evals(merged)
    for name in a:  # the same masks (their hash) and numbers
        assert a[name] == b[name], name


@pytest.mark.slow
def test_lm_task_under_two_ranks_equals_one_process(tmp_path):
    """The LM task, exact then screened, on 2 gloo ranks: the one process's eval JSONs."""
    pytest.importorskip("faker")
    from culture_neurons.models.loading import save_processor
    from culture_neurons.testing.tiny import tiny_model, tiny_processor

    model_dir = tmp_path / "model"
    tiny_model("llama").save_pretrained(model_dir)
    save_processor(tiny_processor("llama"), model_dir)
    lm = ["--model", str(model_dir), "--task", "lm", "--data", "faker", "--cultures",
          "de_DE,ja_JP,ru_RU", "--max-items", "6", "--batch-size", "2", *SELECT,
          "--resamples", "50", "--quiet"]  # fmt: skip
    single, multi = tmp_path / "single", tmp_path / "multi"
    assert cli.main(["run", *lm, "--out", str(single)]) == 0
    _two_ranks(["run", *lm, "--out", str(multi)])
    assert _evals(single) == _evals(multi)
    for out in (single, multi):
        argv = ["evaluate", "--out", str(out), "--matrix", "screen", "--quiet"]
        if out == single:
            assert cli.main(argv) == 0
        else:
            _two_ranks(argv)
    a, b = _evals(single), _evals(multi)
    assert a == b and a["cas"]["matrix"] == "screen"


def test_a_ranked_process_ends_without_the_interpreters_teardown(tmp_path):
    """Under a process group, ``exit_process`` ends with the code, output flushed, and no
    teardown (an atexit handler does not run: where a gloo rank aborted now and then); one
    process exits the usual way (the handler runs)."""
    import subprocess
    import sys

    code = ("import atexit, sys, torch.distributed as dist\n"
            "from culture_neurons.pipeline.distributed import exit_process\n"
            "atexit.register(lambda: print('teardown ran', flush=True))\n"
            "if sys.argv[1] == 'ranked':\n"
            f"    dist.init_process_group('gloo', init_method='file://{tmp_path}/store', "
            "rank=0, world_size=1)\n"
            "print('work done', end='')\n"
            "exit_process(3)\n")  # fmt: skip
    for how, teardown in (("ranked", False), ("single", True)):
        proc = subprocess.run([sys.executable, "-c", code, how], capture_output=True, text=True,
                              timeout=120)  # fmt: skip
        assert proc.returncode == 3, proc.stderr
        assert proc.stdout.startswith("work done")
        assert ("teardown ran" in proc.stdout) is teardown, proc.stdout
