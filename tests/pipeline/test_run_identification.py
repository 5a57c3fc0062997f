"""Run (pipeline/run.py): identification in one prefill per item (identify_on="correct",
logits scoring) and batches of similar prompt length: the statistics of the correct items as
the two-pass path records them, the full model's predictions of the plain path, a kill and
resume mid-way that changes nothing, and results that do not depend on the order the items
came in."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from stats_reference import assert_stats_equal, reference_stats

import culture_neurons as cn
from culture_neurons.data import make_synthetic_items
from culture_neurons.errors import UsageError
from culture_neurons.masks import Masks
from culture_neurons.models import adapters
from culture_neurons.pipeline import RunConfig, matrix
from culture_neurons.pipeline.run import Run
from culture_neurons.pipeline.rundir import read_json
from culture_neurons.scoring.multiple_choice import Group, predict
from culture_neurons.scoring.prompting import encode
from culture_neurons.testing.tiny import tiny_model, tiny_processor

BS = 4


@pytest.fixture(scope="module")
def setup():
    """The tiny Qwen2.5-VL (random weights: some items right, some wrong, in every culture)
    on images of many shapes, so that prompts differ in length."""
    model, processor = tiny_model("qwen2_5_vl"), tiny_processor("qwen2_5_vl")
    data = make_synthetic_items(cultures=3, items_per_culture=12, seed=1, image_size=(24, 300))
    return model, processor, data


def make_run(setup, out, data=None, **config) -> Run:
    model, processor, default = setup
    config = RunConfig(batch_size=BS, **config)
    return Run(model, processor, data or default, out, config, progress=False)


@pytest.mark.slow
def test_one_pass_records_the_correct_items_as_the_two_pass_path(setup, tmp_path):
    model, processor, _ = setup
    run = make_run(setup, tmp_path / "one")
    assert run.one_pass
    items = run.identification_items()  # every item, in batching order
    stats = run.identify()
    # The full model's predictions: those of the plain path on the same batches, exactly.
    want = predict(model, processor, items, batch_size=BS).tolist()
    preds = read_json(tmp_path / "one" / "progress" / "ident_full.json")["preds"]
    assert preds == {it.id: p for it, p in zip(items, want, strict=True)}
    correct = [it for it, p in zip(items, want, strict=True) if p == it.label]
    assert 0 < len(correct) < len(items)
    cultures = run.cultures
    assert stats.items.tolist() == [sum(it.culture == c for it in correct) for c in cultures]
    # The two-pass path: the correct items recorded again, batched among themselves.
    with cn.record(model, cultures) as rec, torch.no_grad():
        for i in range(0, len(correct), BS):
            chunk = correct[i : i + BS]
            rec([cultures.index(it.culture) for it in chunk], **encode(model, processor, chunk))
        two_pass = rec.stats()
    for name in ("T", "K", "items"):
        assert torch.equal(getattr(stats, name), getattr(two_pass, name)), name
    # Other batch companions pad the prompts differently: fp32 activations differ by a few
    # ulp, their fp64 sums by ~1e-6 relative.
    for name in ("S", "Q"):
        torch.testing.assert_close(getattr(stats, name), getattr(two_pass, name), rtol=1e-5,
                                   atol=1e-5 * float(getattr(two_pass, name).abs().max()))  # fmt: skip
    # The same batches through the unstaged path, the wrong items' rows given culture -1: the
    # same fp32 activations, so counts exactly and sums to fp64 rounding (staging adds each
    # item's fp32 chunk sums into its slot, then the slots into the totals: another order).
    with cn.record(model, cultures) as rec, torch.no_grad():
        for i in range(0, len(items), BS):
            chunk = items[i : i + BS]
            rec([cultures.index(it.culture) if it in correct else -1 for it in chunk],
                **encode(model, processor, chunk))  # fmt: skip
        same_batches = rec.stats()
    for name in ("T", "K", "items"):
        assert torch.equal(getattr(stats, name), getattr(same_batches, name)), name
    for name in ("S", "Q"):  # fp32 sums of one chunk regrouped: ~1e-7 relative at most
        torch.testing.assert_close(getattr(stats, name), getattr(same_batches, name), rtol=1e-6,
                                   atol=1e-6 * float(getattr(same_batches, name).abs().max()))  # fmt: skip
    # And the independent reference on the one pass's own batches (wrong items not counted).
    ref = None
    for i in range(0, len(items), BS):
        chunk = items[i : i + BS]
        ids = [cultures.index(it.culture) if it in correct else -1 for it in chunk]
        one = reference_stats(model, encode(model, processor, chunk), ids, len(cultures))
        ref = one if ref is None else {k: ref[k] + one[k] for k in ref}
    assert_stats_equal(stats, ref)


@pytest.mark.slow
def test_kill_and_resume_mid_identification_gives_identical_stats(setup, tmp_path,
                                                                  monkeypatch):  # fmt: skip
    run = make_run(setup, tmp_path / "whole")
    batches = -(-len(run.identification_items()) // BS)
    assert batches >= 5
    whole = run.identify()
    out = tmp_path / "killed"
    original, calls = Group.predict_staged, []

    def killed(self, *args, **kwargs):
        calls.append(len(self.items))
        if len(calls) == 4:  # the 4th batch: 3 committed and checkpointed
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Group, "predict_staged", killed)
    with pytest.raises(KeyboardInterrupt):
        make_run(setup, out, checkpoint_every=1).identify()
    calls.clear()
    resumed = Run(setup[0], setup[1], setup[2], out, RunConfig(batch_size=BS, checkpoint_every=1),
                  resume=True, progress=False).identify()  # fmt: skip
    assert len(calls) == batches - 3, "the resumed run scored the checkpointed batches again"
    for name in ("T", "K", "S", "Q", "items"):  # the same sums in the same order: bit for bit
        assert torch.equal(getattr(resumed, name), getattr(whole, name)), name
    preds = [read_json(d / "progress" / "ident_full.json")["preds"] for d in (tmp_path / "whole", out)]
    assert preds[0] == preds[1]


def test_no_correct_item_is_refused(setup, tmp_path, monkeypatch):
    def wrong(self, recorder, culture):
        right = torch.tensor([it.label for it in self.items])
        pred = original(self, recorder, culture)
        return torch.where(pred == right, (right + 1) % 4, pred)

    original = Group.predict_staged
    monkeypatch.setattr(Group, "predict_staged", wrong)
    with pytest.raises(UsageError, match="answers none of them correctly"):
        make_run(setup, tmp_path / "none").identify()
    assert not (tmp_path / "none" / "stats.json").exists()


def test_generation_scoring_predicts_first_then_records_the_correct_items(setup, tmp_path,
                                                                          monkeypatch):  # fmt: skip
    """--scoring generate keeps the two passes (the answer needs forwards past the prompt).
    The tiny model's random weights generate no letter at all: its generation is replaced by
    a fixed answer per item (right for ids ending in an even digit), the rest is the run's."""
    model, processor, _ = setup

    def generated(self, inputs):
        assert inputs["input_ids"].shape[0] == self.size
        return torch.tensor([it.label if int(it.id[-1]) % 2 == 0 else (it.label + 1) % 4
                             for it in self.items])  # fmt: skip

    monkeypatch.setattr(Group, "_generate", generated)
    # No halves: the plain recording below sums each culture's rows of a forward in one fp32
    # chunk, as the run then does, so bit for bit (halves: tests/pipeline/test_halves.py).
    run = make_run(setup, tmp_path / "gen", scoring="generate", halves=False)
    assert not run.one_pass
    with pytest.raises(UsageError, match="generates tokens"):
        run.task.group(run.ident.items_by_culture[run.cultures[0]][:1]).predict_staged(None, [0])
    stats = run.identify()
    every = run._by_length([it for c in run.cultures for it in run.ident.items_by_culture[c]])
    correct = [it for it in every if int(it.id[-1]) % 2 == 0]
    assert 0 < len(correct) < len(every)
    with cn.record(model, run.cultures) as rec, torch.no_grad():
        for i in range(0, len(correct), BS):
            chunk = correct[i : i + BS]
            rec([run.cultures.index(it.culture) for it in chunk],
                **encode(model, processor, chunk))  # fmt: skip
        want = rec.stats()
    for name in ("T", "K", "S", "Q", "items"):  # the same batches: bit for bit
        assert torch.equal(getattr(stats, name), getattr(want, name)), name


def reordered(data):
    """The same items, each culture's in reverse order."""
    return replace(data, items_by_culture={c: tuple(reversed(its))
                                           for c, its in data.items_by_culture.items()})  # fmt: skip


@pytest.mark.slow
def test_batches_and_results_do_not_depend_on_the_items_order(setup, tmp_path):
    model, processor, data = setup
    runs = [make_run(setup, tmp_path / "a"), make_run(setup, tmp_path / "b", data=reordered(data))]
    batches = [r.identification_items() for r in runs]
    assert [it.id for it in batches[0]] == [it.id for it in batches[1]]
    lengths = runs[0]._lengths(batches[0])
    culture_runs = [it.culture for it in batches[0]]
    assert culture_runs == sorted(culture_runs, key=runs[0].cultures.index)  # shares kept
    for c in runs[0].cultures:  # each share sorted by (length, id)
        share = [(n, it.id) for n, it in zip(lengths, batches[0], strict=True) if it.culture == c]
        assert share == sorted(share)
    # The matrix: computed in length groups, returned in the order the items were given.
    fp = adapters.fingerprint(model)
    g = torch.Generator().manual_seed(0)
    masks = Masks.from_sets(["x", "y"], [torch.randperm(fp.num_layers * fp.num_neurons,
                                                        generator=g)[:30] for _ in range(2)], fp)
    items = [it for c in runs[0].cultures for it in runs[0].evaluation.items_by_culture[c]]
    got = matrix.exact(runs[0], items, masks)
    back = matrix.exact(runs[1], items[::-1], masks)
    assert torch.equal(back, got.flip(1))
    assert torch.equal(got[0], predict(model, processor, items, batch_size=1))  # groups of 1
