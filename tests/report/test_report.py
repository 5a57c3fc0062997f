"""The report: figures and report.md from a made-up output dir (no model, a few seconds).

The fake run has the layout of SPEC "What a run leaves behind": run.json, stats.*,
masks/<method>.safetensors (+ the RND draws) and eval/<method>.json, assembled by the
pipeline's own task code (MCTask.results) from made-up predictions: cas hurts the culture whose
set is ablated, lap hurts every culture alike, RND draws flip a few items anywhere.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from culture_neurons.errors import DataError
from culture_neurons.masks import Masks
from culture_neurons.pipeline.config import RunConfig
from culture_neurons.pipeline.tasks import MCTask
from culture_neurons.report import figures, mc
from culture_neurons.report.conclusions import with_ci
from culture_neurons.report.mc import write_report
from culture_neurons.stats import Fingerprint, Stats

L, N = 4, 10
FP = Fingerprint("qwen2_5_vl", "qwen2_5_vl", L, N, 8, "silu", "f" * 64)
CULTURES = ["Japan", "Brazil", "Kenya"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ITEMS = 40  # evaluation items per culture
DRAWS = 5  # RND draws: 6^3 = 216 recombinations, p-value floor 1/216
# Chance a right answer turns wrong under set s, for items of the set's own culture / others.
HURT = {"cas": (0.6, 0.02), "lap": (0.2, 0.2)}
RND_HURT = 0.03
SETS = {  # flat indices l * N + n per culture
    "cas": [[35, 36, 37, 25], [30, 31, 20, 5], [38, 39, 21, 22]],
    "lap": [[35, 36, 0, 1], [30, 31, 2, 3], [38, 4, 6, 7]],
}


def make_run(out: Path, cultures=CULTURES, labels=True, methods=("cas", "lap"), draws=DRAWS,
             alpha=None) -> Path:  # fmt: skip
    """A fake finished run in ``out`` (see the module docstring)."""
    C = len(cultures)
    out.mkdir(parents=True, exist_ok=True)
    stats = Stats.zeros(cultures, FP, options={"items": "correct" if labels else "all"})
    stats.items[:] = torch.arange(C) + 20
    stats.T[:] = torch.arange(C) * 1000 + 5000
    stats.save(out, extra={"items_counted": int(stats.items.sum())})
    config = RunConfig(methods=methods, ratio=0.1, rnd_draws=draws, resamples=300,
                       identify_on="correct" if labels else "all",
                       intervention="ablate" if alpha is None else "steer", alpha=alpha)
    meta = {"config": dataclasses.asdict(config), "cultures": cultures,
            "fingerprint": dataclasses.asdict(FP), "data": "afaji/cvqa (fake)"}  # fmt: skip
    meta["config"]["methods"] = list(methods)
    (out / "run.json").write_text(json.dumps(meta))

    gen = torch.Generator().manual_seed(0)
    culture = torch.arange(C).repeat_interleave(ITEMS)
    label = torch.randint(0, 4, (C * ITEMS,), generator=gen)
    wrong = (label + 1) % 4
    full = torch.where(torch.rand(C * ITEMS, generator=gen) < 0.75, label, wrong)

    def predictions(own: float, other: float) -> torch.Tensor:  # [C sets, n]
        p = torch.full((C, C * ITEMS), other)
        p[culture.unsqueeze(0) == torch.arange(C).unsqueeze(1)] = own
        hurt = (torch.rand(C, C * ITEMS, generator=gen) < p) & (full == label)
        return torch.where(hurt, wrong, full)

    masks, per_set, nulls = {}, {}, {}
    for m in methods:
        masks[m] = Masks.from_sets(cultures, [torch.tensor(s) for s in SETS[m][:C]], FP, m,
                                   {"ratio": 0.1})  # fmt: skip
        per_set[m] = predictions(*HURT[m])
    rnd_names = [f"rnd-{'+'.join(methods)}-{i}" for i in range(draws)]
    for i, name in enumerate(rnd_names):  # methods of one size: they share the draws
        sets = [torch.randperm(L * N, generator=gen)[:4] for _ in range(C)]
        masks[name] = Masks.from_sets(cultures, sets, FP, "rnd", {"seed": 7, "draw": i})
        per_set[name] = predictions(RND_HURT, RND_HURT)
    nulls = {m: rnd_names for m in methods}
    for name, m in masks.items():
        m.save(out / "masks" / f"{name}.safetensors")
    items = [SimpleNamespace(id=f"i{j}", label=int(label[j])) for j in range(C * ITEMS)]
    data = SimpleNamespace(labels_available=labels)
    _, results = MCTask(None, None, config).results(masks, per_set, full, items, culture,
                                                    cultures, data, nulls)  # fmt: skip
    (out / "eval").mkdir(exist_ok=True)
    for name, res in results.items():
        (out / "eval" / f"{name}.json").write_text(json.dumps(res))
    return out


def _read(out: Path, name: str) -> dict:
    return json.loads((out / "eval" / f"{name}.json").read_text())


def _row(text: str, first_cell: str, after: str = "") -> str:
    """The first table row starting with ``first_cell`` after the heading ``after``."""
    part = text.split(after, 1)[1] if after else text
    return next(line for line in part.splitlines() if line.startswith(f"| {first_cell} |"))


def _assert_png(path: Path) -> None:
    assert path.is_file(), f"missing {path}"
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000, f"{path} is not a PNG"


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> tuple[Path, str]:
    out = make_run(tmp_path_factory.mktemp("labelled"))
    path = write_report(out, description="Fake run for the report test.")
    return out, path.read_text(encoding="utf-8")


def test_writes_every_figure_as_png(labelled):
    out, _ = labelled
    for method in ("cas", "lap"):
        _assert_png(out / "figures" / f"{method}_delta.png")
        _assert_png(out / "figures" / f"{method}_flip.png")
    _assert_png(out / "figures" / "layers.png")
    assert not list((out / "figures").glob("*.tmp"))


def test_every_summary_is_shown_with_its_interval(labelled):
    out, text = labelled
    assert "Fake run for the report test." in text
    for method in ("cas", "lap"):
        ev = _read(out, method)
        row = _row(text, method, "### Accuracy change")
        for key in ("self", "cross", "gap"):
            assert with_ci(ev[key], ev[f"{key}_ci"], 1) in row, (method, key, row)
        row = _row(text, method, "### Flips")
        for key in ("flip_self", "flip_cross", "flip_gap"):
            assert with_ci(ev[key], ev[f"{key}_ci"], 3) in row, (method, key, row)
        row = _row(text, method, "**specificity (accuracy change)**")
        assert with_ci(ev["specificity"], ev["specificity_ci"], 2, mark=False) in row
    # cas: self far below 0 (bold: its interval excludes 0); a value whose interval holds 0 is
    # written plain.
    cas = _read(out, "cas")
    assert cas["self_ci"][1] < 0 and f"**{cas['self']:.1f}** [" in _row(text, "cas")
    assert with_ci(0.0, [-1.0, 2.0], 1) == "0.0 [-1.0, 2.0]"  # holds 0: plain
    assert with_ci(-3.0, [-5.0, -1.0], 1) == "**-3.0** [-5.0, -1.0]"
    # Ranked by gap, most negative first.
    summary = text.split("### Accuracy change")[1].split("**specificity")[0]
    order = [line.split("|")[1].strip() for line in summary.splitlines()
             if line.startswith(("| cas |", "| lap |"))]  # fmt: skip
    assert order == ["cas", "lap"]


def test_beats_rnd_uses_the_p_value_against_the_methods_own_control(labelled):
    out, text = labelled
    cas, lap = _read(out, "cas"), _read(out, "lap")
    assert cas["p_gap_vs_rnd"] == pytest.approx(1 / (DRAWS + 1) ** 3)  # no draw comes near
    assert cas["rnd"]["draws"] == DRAWS and cas["rnd"]["set_sizes"] == cas["set_sizes"]
    row = _row(text, "cas", "### Accuracy change")
    # The primary test (accuracy gap) is Holm-adjusted across the 2 methods: 2 x the floor.
    assert cas["p_gap_vs_rnd_adj"] == pytest.approx(2 * cas["p_gap_vs_rnd"])
    assert (f"yes (Holm-adjusted p = {cas['p_gap_vs_rnd_adj']:.3f}; "
            f"p = {cas['p_gap_vs_rnd']:.3f} (floor))") in row  # fmt: skip
    sd = f"{cas['rnd']['gap_mean']:.1f} ± {cas['rnd']['gap_sd']:.1f}"
    assert sd in row  # RND gap: mean ± sd over the method's own draws
    q = lap["p_gap_vs_rnd_adj"]
    word = "yes" if q < 0.05 else "no"  # lap's true gap is 0
    assert f"{word} (Holm-adjusted p = {q:.3f}" in _row(text, "lap", "### Accuracy change")
    assert "its floor here is 0.0046" in text
    # the headline speaks of the adjusted primary test only; the flip gap is secondary
    headline = text.split("## Primary result")[1].split("## ")[0]
    assert "cas: **beats RND** (adjusted p = " in headline and "flip" not in headline
    assert "secondary, unadjusted" in _row(text, "cas", "### Flips")


def test_which_method_wins_on_which_measure(labelled):
    out, text = labelled
    wins = text.split("## Which method wins on which measure")[1].split("\n## ")[0]
    gap = next(line for line in wins.splitlines() if line.startswith("- **gap"))
    assert "cas has the lowest" in gap and "ahead of lap" in gap and "beats its size-matched" in gap
    # The lead's interval is the paired bootstrap difference of the stored resamples.
    cas, lap = _read(out, "cas"), _read(out, "lap")
    d = np.array(cas["resampled"]["gap"]) - np.array(lap["resampled"]["gap"])
    lo, hi = np.quantile(d, [0.025, 0.975])
    assert f"[{lo:.1f}, {hi:.1f}]" in gap
    spec = next(line for line in wins.splitlines() if line.startswith("- **specificity"))
    assert "cas has the highest" in spec
    # No claim without its numbers: every "beats" and "ahead of" comes with an interval or p.
    for line in wins.splitlines():
        if "beats" in line:
            assert "p = " in line, line
        if "ahead of" in line:
            assert re.search(r"difference -?[\d.]+ \[", line), line


def test_headline_accuracy_and_sections(labelled):
    out, text = labelled
    cas = _read(out, "cas")
    lo, hi = cas["accuracy_full_mean_ci"]
    assert f"{cas['accuracy_full_mean']:.1f} [{lo:.1f}, {hi:.1f}] %" in text.split("## Full model")[1]
    assert text.count("**Headline") == 1
    for needle in ("qwen2_5_vl", "afaji/cvqa (fake)", "ratio (cas, lap, mad) = 10% of all neurons",
                   "mad contrast = mean", "lape top_rate / filter_rate / bar_ratio = 0.01",
                   f"RND control = {DRAWS} draws per method", "bootstrap = 300 resamples",
                   "intervention = ablate", "scope = all", "scoring = logits", "seed = 0",
                   "| Japan | 20 | 5,000 | 40 |", "## Overlap between methods",
                   "## Set sizes", "## Files", "vs own RND"):  # fmt: skip
        assert needle in text, needle
    for target in ("figures/cas_delta.png", "figures/lap_flip.png", "figures/layers.png"):
        assert f"]({target})" in text and (out / target).is_file()
    # cas: layers of 35 36 37 25 | 30 31 20 5 | 38 39 21 22 -> layer 3: 7, layer 2: 4, layer 0: 1.
    assert "layer 3 (7), layer 2 (4), layer 0 (1)" in _row(text, "cas", "## Where")
    # cas vs lap, per culture: {35,36,37,25} & {35,36,0,1} = 2 of 6; 2 of 6; 1 of 7.
    assert f"| {(2 / 6 + 2 / 6 + 1 / 7) / 3:.3f} |" in _row(text, "cas", "## Overlap")


def test_the_report_opens_with_three_quotable_lines(labelled, tmp_path):
    """Issue #23: the first lines say which method finds culture-sensitive neurons on the
    primary measure (value, interval, Holm-adjusted p), how the others fared, and what the
    random control and the full model gave; recomputed here from the eval JSONs."""
    out, text = labelled
    lines = [line for line in text.splitlines()[1:] if line][:3]  # after the title
    evals = {m: _read(out, m) for m in ("cas", "lap")}
    adjusted = {m: ev["p_gap_vs_rnd_adj"] for m, ev in evals.items()}
    beating = sorted((p, m) for m, p in adjusted.items() if p < 0.05)
    assert beating, "the fake run's cas is built to beat its control"
    best = beating[0][1]
    assert lines[0].startswith(f"**{best} finds culture-sensitive neurons** on the primary "
                               "measure, the gap (self - cross)")  # fmt: skip
    assert f"{evals[best]['gap']:.1f} [{evals[best]['gap_ci'][0]:.1f}, " in lines[0]
    other = next(m for m in evals if m != best)
    verdict = "beats" if adjusted[other] < 0.05 else "does not beat"
    assert lines[1].startswith(f"Also: {other} {verdict} RND")
    assert lines[2].startswith("Random control:") and "% of the evaluation items right" in lines[2]
    for m, ev in evals.items():
        assert f"{m} {ev['rnd']['gap_mean']:.1f} ± {ev['rnd']['gap_sd']:.1f}" in lines[2]

    hidden = write_report(make_run(tmp_path, labels=False)).read_text(encoding="utf-8")
    opening = [line for line in hidden.splitlines()[1:] if line and "accuracy is unavailable"
               not in line][:3]  # fmt: skip
    assert "the flip gap (self - cross)" in opening[0] and "labels are hidden" in opening[2]


def test_matrices_are_tables_with_intervals(labelled):
    out, text = labelled
    cas = _read(out, "cas")
    part = text.split("### cas")[1].split("### lap")[0]
    delta = part.split("cas: accuracy change (points)")[1]
    for s, name in enumerate(CULTURES):
        row = _row(delta, name)
        for c in range(len(CULTURES)):
            cell = with_ci(cas["delta"][s][c], cas["delta_ci"][s][c], 1)
            assert cell in row, (s, c, cell, row)
            assert cell.startswith("**") == (not cas["delta_ci"][s][c][0] <= 0 <=
                                             cas["delta_ci"][s][c][1])  # fmt: skip
    assert "cas: accuracy (%)" in part and "cas: flip rate" in part


def test_figures_share_one_colour_scale_per_kind(tmp_path, monkeypatch):
    out = make_run(tmp_path)
    scales: dict[str, set] = {"delta": set(), "flip": set()}

    def spy(path, m, cultures, title, label, scale, diverging, holds_zero=None):
        scales[path.stem.split("_")[-1]].add(scale)
        assert holds_zero is not None and holds_zero.shape == m.shape

    monkeypatch.setattr(mc, "heatmap", spy)
    mc.write_figures(mc.load_run(out))
    assert len(scales["delta"]) == 1 and len(scales["flip"]) == 1
    (lo, hi), = scales["delta"]
    biggest = max(abs(v) for m in ("cas", "lap") for row in _read(out, m)["delta"] for v in row)
    assert lo == -hi == -biggest
    assert figures.shared_scale([np.array([[0.2, np.nan]]), np.array([[0.5]])], False) == (0, 0.5)


def test_hidden_labels_report_no_accuracy(tmp_path):
    out = make_run(tmp_path, labels=False)
    (out / "figures").mkdir()
    (out / "figures" / "cas_delta.png").write_bytes(PNG_MAGIC)  # left by an earlier report
    text = write_report(out).read_text(encoding="utf-8")
    assert "accuracy is unavailable" in text.splitlines()[2]  # the notice, at the top
    assert "full-model accuracy" not in text and "(points)" not in text
    assert "agreement self" in text
    assert not list((out / "figures").glob("*_delta.png"))
    for method in ("cas", "lap"):
        _assert_png(out / "figures" / f"{method}_flip.png")
    cas = _read(out, "cas")
    assert cas["p_gap_vs_rnd"] is None and cas["p_flip_gap_vs_rnd"] is not None
    row = _row(text, "cas", "### Flips")
    assert with_ci(cas["flip_gap"], cas["flip_gap_ci"], 3) in row
    assert f"| {1 - cas['flip_self']:.3f} |" in row


def test_single_culture(tmp_path):
    out = make_run(tmp_path, cultures=["Japan"], methods=("cas",))
    assert _read(out, "cas")["gap"] is None
    text = write_report(out).read_text(encoding="utf-8")
    assert "cross, gap and specificity are undefined" in text
    _assert_png(out / "figures" / "cas_delta.png")


def test_some_methods_without_rnd(tmp_path):
    out = make_run(tmp_path, methods=("lap",), draws=0)
    text = write_report(out).read_text(encoding="utf-8")
    assert "No RND draws were run" in text and "| lap |" in text and "| cas |" not in text
    assert "n/a (no RND draws)" in text
    assert "Not computed: fewer than two methods" in text
    _assert_png(out / "figures" / "layers.png")


def test_steering_report_says_so_and_tests_two_sided(tmp_path):
    out = make_run(tmp_path, alpha=0.5)
    cas = _read(out, "cas")
    assert cas["intervention"] == "steer" and cas["alpha"] == 0.5
    assert cas["direction"]["gap"] == "either" and cas["direction"]["flip_gap"] == "higher"
    text = write_report(out).read_text(encoding="utf-8")
    assert text.startswith("# Culture-sensitive neurons: steering report")
    assert "steer (a := (1 + alpha) a, alpha = 0.5)" in text and "two-sided" in text


def test_unevaluated_run_is_refused(tmp_path):
    with pytest.raises(DataError, match="run `evaluate`"):
        write_report(tmp_path)


def test_delta_cells_are_bold_only_under_bh(labelled):
    out, text = labelled
    for method in ("cas", "lap"):
        ev = _read(out, method)
        part = text.split(f"{method}: accuracy change (points)", 1)[1]
        cultures = ev["cultures"]
        for s, name in enumerate(cultures):
            row = _row(part, name).split("|")[2:-1]
            for c, cell in enumerate(row):
                q = ev["delta_cell_q"][s][c]
                assert ("**" in cell) == (q is not None and q < 0.05), (method, s, c, cell, q)
        flips = text.split(f"{method}: flip rate", 1)[1].split("###")[0]
        assert "**" not in flips.split("![")[0]  # flip cells: never bold (no cell test)
    assert _read(out, "cas")["delta_cell_q"][0][0] < 0.05  # cas's own cells: found
