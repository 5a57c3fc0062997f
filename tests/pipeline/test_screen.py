"""The rules of ``--matrix screen`` (:mod:`culture_neurons.pipeline.screen`) against plain
computations written separately: the drift ratio, the cost, the fills, and which conclusions
count as unsettled. The rounds on real runs: tests/pipeline/test_matrix_modes.py."""

from __future__ import annotations

import math

import pytest
import torch

from culture_neurons.errors import UsageError
from culture_neurons.pipeline import cli, screen
from culture_neurons.pipeline.config import SCREEN_BUDGET, RunConfig


def random_effects(C: int, masks: int, seed: int, zeros: bool = False) -> tuple:
    """``(exact, estimated, confirmed)`` ``[C * masks, C]``: random effects, a tenth of the
    exact ones NaN (and with ``zeros`` a tenth of each 0), about half the cells confirmed."""
    g = torch.Generator().manual_seed(seed)
    S = C * masks
    exact = torch.rand(S, C, generator=g, dtype=torch.float64)
    est = torch.rand(S, C, generator=g, dtype=torch.float64)
    exact[torch.rand(S, C, generator=g) < 0.1] = float("nan")
    if zeros:
        exact[torch.rand(S, C, generator=g) < 0.1] = 0.0
        est[torch.rand(S, C, generator=g) < 0.1] = 0.0
    return exact, est, torch.rand(S, C, generator=g) < 0.5


@pytest.mark.parametrize("C, masks", [(1, 1), (3, 4), (7, 2)])
def test_drift_is_the_exact_over_the_estimated_effect_of_each_masks_confirmed_cells(C, masks):
    exact, est, confirmed = random_effects(C, masks, seed=C * 10 + masks)
    got = screen.drift(exact, est, confirmed, C)
    for i in range(masks):
        num = den = 0.0
        for s in range(i * C, (i + 1) * C):
            for c in range(C):
                a, b = exact[s, c].item(), est[s, c].item()
                if confirmed[s, c] and not (math.isnan(a) or math.isnan(b)):
                    num, den = num + a, den + b
        want = 1.0 if num == den == 0 else (math.inf if den == 0 else num / den)
        assert got[i].item() == pytest.approx(want, rel=1e-12), i


def test_drift_flags_an_estimate_off_by_more_than_the_limit_either_way():
    C = 2
    exact = torch.tensor([[0.4, 0.2], [0.1, 0.3]] * 4, dtype=torch.float64)
    est = exact.clone()
    est[2:4] /= 10  # the realistic failure: the first order 10x too small
    est[4:6] *= 3  # too large
    est[6:8] = 0  # sees nothing where something happens
    every = torch.ones(8, C, dtype=torch.bool)
    ratio = screen.drift(exact, est, every, C)
    assert ratio.tolist() == pytest.approx([1.0, 10.0, 1 / 3, math.inf])
    worst = screen.worst_cell(exact, est, every, C)
    assert worst.tolist() == pytest.approx([1.0, 10.0, 3.0, math.inf])
    assert screen.drifts(worst).tolist() == [False, True, True, True]
    nothing = torch.zeros(2, C, dtype=torch.float64)
    assert screen.drift(nothing, nothing, torch.ones(2, C, dtype=torch.bool), C).item() == 1.0
    assert screen.worst_cell(nothing, nothing, torch.ones(2, C, dtype=torch.bool), C).item() == 1


@pytest.mark.parametrize("C, masks", [(1, 1), (3, 4), (7, 2)])
def test_worst_cell_is_the_most_off_confirmed_cell_of_each_mask(C, masks):
    exact, est, confirmed = random_effects(C, masks, seed=C * 7 + masks, zeros=True)
    got = screen.worst_cell(exact, est, confirmed, C)
    for i in range(masks):
        want = 1.0
        for s in range(i * C, (i + 1) * C):
            for c in range(C):
                a, b = exact[s, c].item(), est[s, c].item()
                if not confirmed[s, c] or math.isnan(a) or math.isnan(b) or a == b:
                    continue
                want = max(want, math.inf if 0.0 in (a, b) else max(a / b, b / a))
        assert got[i].item() == pytest.approx(want, rel=1e-12), i


def test_a_mask_whose_cells_sum_right_but_one_cell_is_off_drifts():
    """The Gemma failure: the first cells' sum within 2x of the estimate (one too large, one
    too small) while single cells are 5x off: drift per cell confirms the mask whole."""
    C = 2
    exact = torch.tensor([[0.5, 0.1], [0.1, 0.5]], dtype=torch.float64)
    est = torch.tensor([[0.5, 0.5], [0.02, 0.5]], dtype=torch.float64)
    every = torch.ones(C, C, dtype=torch.bool)
    ratio = screen.drift(exact, est, every, C)
    assert 1 / screen.DRIFT_LIMIT < ratio.item() < screen.DRIFT_LIMIT  # 1.2 / 1.52
    worst = screen.worst_cell(exact, est, every, C)
    assert worst.item() == pytest.approx(5.0) and screen.drifts(worst).item()


def test_prefills_count_the_items_of_every_confirmed_cell():
    g = torch.Generator().manual_seed(0)
    C, S, n = 4, 12, 37
    culture = torch.randint(0, C - 1, (n,), generator=g)  # the last culture has no items
    confirmed = torch.rand(S, C, generator=g) < 0.4
    want = sum(int((culture == c).sum()) for s in range(S) for c in range(C) if confirmed[s, c])
    assert screen.prefills(confirmed, culture) == want
    assert screen.prefills(torch.ones(S, C, dtype=torch.bool), culture) == S * n


def test_whole_marks_every_cell_of_the_named_masks():
    got = screen.whole([0, 2], S=9, C=3)
    want = torch.zeros(9, 3, dtype=torch.bool)
    want[0:3] = want[6:9] = True
    assert torch.equal(got, want)


def test_the_estimate_at_several_scales_is_one_backward_scaled():
    """Block k of ``estimated(..., scales)`` is the estimate with its change x scales[k]: the
    LM's NLL change scaled, the MC letters of the scaled margin shifts (scale 1: the plain
    estimate)."""
    from culture_neurons.data import make_synthetic_items
    from culture_neurons.data.faker_text import make_faker_data
    from culture_neurons.masks import Masks
    from culture_neurons.models import adapters
    from culture_neurons.scoring.estimate import estimated_lm, estimated_mc
    from culture_neurons.testing.tiny import tiny_model, tiny_processor

    scales = (1.0, 1 / screen.DRIFT_LIMIT, screen.DRIFT_LIMIT)
    for family, items, fn in (
        ("llama", list(make_faker_data(["de_DE", "ja_JP"], per_culture=2, seed=0)), estimated_lm),
        ("qwen2_5_vl", list(make_synthetic_items(2, 2, seed=0)), estimated_mc),
    ):
        model, proc = tiny_model(family).eval(), tiny_processor(family)
        fp = adapters.fingerprint(model)
        LN = fp.num_layers * fp.num_neurons
        g = torch.Generator().manual_seed(0)
        sets = [torch.randperm(LN, generator=g)[:k] for k in (1, 7, LN // 3)]
        masks = Masks.from_sets(["a", "b", "c"], sets, fp, method="test")
        one = fn(model, proc, items, masks)
        got = fn(model, proc, items, masks, scales=scales)
        S = len(masks)
        assert got.shape == (1 + 3 * S, len(items))
        torch.testing.assert_close(got[: 1 + S], one, rtol=0, atol=1e-9)  # scale 1: the same
        if got.is_floating_point():
            for k, scale in enumerate(scales):
                block = got[1 + k * S : 1 + (k + 1) * S]
                torch.testing.assert_close(block - got[:1], scale * (one[1:] - one[:1]),
                                           rtol=1e-12, atol=1e-9)  # fmt: skip


def _ev(p_adj=0.01, p_spec=0.2, gap=-5.0, gap_ci=(-7.0, -3.0), spec=0.5) -> dict:
    """An eval JSON's fields that conclusions read (accuracy delta primary, flips second)."""
    return {"measures": ["accuracy_delta", "flip"], "primary": {"p_adj": p_adj},
            "p_gap_vs_rnd": p_adj / 2, "p_specificity_vs_rnd": p_spec,
            "gap": gap, "gap_ci": list(gap_ci), "specificity": spec,
            "specificity_ci": [0.3, 0.7], "p_flip_gap_vs_rnd": 0.5,
            "p_flip_specificity_vs_rnd": None, "flip_specificity": None}  # fmt: skip


def test_conclusions_are_the_verdicts_at_the_level():
    got = screen.conclusions(_ev())
    assert got == {"primary": True, "p_gap_vs_rnd": True, "p_specificity_vs_rnd": False,
                   "specificity defined": True, "p_flip_gap_vs_rnd": False,
                   "p_flip_specificity_vs_rnd": False, "flip_specificity defined": False}


def test_unsettled_names_methods_whose_verdict_or_summary_depends_on_the_fill():
    base = {"cas": _ev(), "mad": _ev(gap=-1.0)}
    same = {"cas": _ev(gap=-5.5), "mad": _ev(gap=-0.5)}  # within half the half-width (1.0)
    assert screen.unsettled({"estimate": base, "none": same}) == {}
    flipped = {"cas": _ev(p_adj=0.06), "mad": _ev(gap=-2.2)}
    assert screen.unsettled({"estimate": base, "none": same, "scaled": flipped}) == {
        "cas": ["primary verdict"], "mad": ["gap"]}  # unadjusted p 0.03 either way
    undefined = {"cas": _ev(spec=None), "mad": _ev(gap=-1.0)}
    assert screen.unsettled({"estimate": base, "none": undefined})["cas"] == [
        "specificity", "specificity defined verdict"]


def test_screen_budget_only_with_screen(tmp_path, capsys):
    """A budget under another mode is refused the same way from Python, flags and TOML."""
    assert RunConfig(matrix="screen").screen_budget == SCREEN_BUDGET
    assert RunConfig(matrix="screen", screen_budget=0).screen_budget == 0
    assert RunConfig().screen_budget is None
    for mode in ("exact", "estimate"):
        with pytest.raises(UsageError, match=f"--screen-budget 2 applies to --matrix screen "
                                             f"only, got --matrix {mode}"):  # fmt: skip
            RunConfig(matrix=mode, screen_budget=2)
    out = str(tmp_path / "run")
    assert cli.main(["run", "--out", out, "--screen-budget", "2", "--quiet"]) == 2
    assert "--screen-budget 2 applies to --matrix screen only" in capsys.readouterr().err
    toml = tmp_path / "run.toml"
    toml.write_text('matrix = "estimate"\nscreen_budget = 1\n')
    assert cli.main(["run", "--out", out, "--config", str(toml), "--quiet"]) == 2
    assert "got --matrix estimate" in capsys.readouterr().err


def test_next_cells_confirm_half_of_each_named_masks_open_cells_widest_first():
    g = torch.Generator().manual_seed(3)
    C, masks = 4, 3
    spread = torch.rand(masks * C, C, generator=g, dtype=torch.float64)
    spread[1, 2] = float("nan")
    confirmed = torch.rand(masks * C, C, generator=g) < 0.3
    confirmed[2 * C : 3 * C] = True  # mask 2: nothing left to confirm
    got = screen.next_cells(spread, confirmed, [0, 2], C)
    want = torch.zeros_like(confirmed)
    open_ = [(s, c) for s in range(C) for c in range(C) if not confirmed[s, c]]
    key = {(s, c): (-1.0 if math.isnan(spread[s, c]) else spread[s, c].item()) for s, c in open_}
    for s, c in sorted(open_, key=lambda sc: -key[sc])[: (len(open_) + 1) // 2]:
        want[s, c] = True
    assert torch.equal(got, want)
    assert not (got & confirmed).any()
    # rounds of halving leave nothing open after ceil(log2(C * C)) + 1 of them
    cells = torch.zeros(C, C, dtype=torch.bool)
    for _ in range(math.ceil(math.log2(C * C)) + 1):
        cells |= screen.next_cells(torch.zeros(C, C), cells, [0], C)
    assert cells.all()


def test_close_ranks_are_unsettled_where_the_fills_spread_covers_the_difference():
    def fills(cas, lap, mad):  # primary gaps per fill: estimate, smaller, larger
        return {how: {"cas": _ev(gap=cas[k]), "lap": _ev(gap=lap[k]), "mad": _ev(gap=mad[k])}
                for k, how in enumerate(screen.FILLS)}  # fmt: skip

    # cas spans [-5.2, -5.0] (widened: [-5.4, -4.8]), lap [-4.65, -4.6] ([-4.7, -4.55]): apart
    assert screen.close_ranks(fills((-5.0, -5.1, -5.2), (-4.6, -4.62, -4.65), (-1, -1, -1))) == []
    # lap moves to -4.9: within cas's widened range
    assert screen.close_ranks(fills((-5.0, -5.1, -5.2), (-4.7, -4.8, -4.9), (-1, -1, -1))) == [
        "cas", "lap"]
    # equal gaps no fill moves: nothing to settle
    assert screen.close_ranks(fills((-2, -2, -2), (-2, -2, -2), (-1, -1, -1))) == []
    got = screen.unsettled(fills((-5.0, -5.1, -5.2), (-4.7, -4.8, -4.9), (-1, -1, -1)))
    assert got["cas"] == ["rank"] and got["lap"] == ["rank"] and "mad" not in got
