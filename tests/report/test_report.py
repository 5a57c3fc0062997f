"""The report: figures and report.md from a hand-made output dir (no model, a few seconds).

The fake run has the layout of SPEC "What a run leaves behind": run.json, stats.*,
masks/<method>.safetensors (+ rnd0, rnd1) and eval/<method>.json with matrices whose summaries
are computed here the way pipeline.run computes them (mean diagonal, mean off-diagonal).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from culture_neurons.errors import DataError
from culture_neurons.masks import Masks
from culture_neurons.report.mc import write_report
from culture_neurons.stats import Fingerprint, Stats

L, N = 4, 10
FP = Fingerprint("qwen2_5_vl", "qwen2_5_vl", L, N, 8, "silu", "f" * 64)
CULTURES = ["Japan", "Brazil", "Kenya"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Hand-made delta matrices [S][C] (points): cas is selective, lap hurts everyone, rnd ~ nothing.
DELTA = {
    "cas": [[-20.0, -2.0, -1.0], [-3.0, -15.0, -2.0], [-1.0, -1.0, -25.0]],
    "lap": [[-8.0, -6.0, -7.0], [-5.0, -9.0, -6.0], [-7.0, -7.0, -10.0]],
}
RND_DELTA_DRAWS = [
    [[-1.0, -0.5, 0.0], [0.0, -1.0, -0.5], [-0.5, 0.0, -1.5]],
    [[-2.0, -1.0, -0.5], [-0.5, -0.5, 0.0], [0.0, -0.5, -1.0]],
]
SETS = {  # flat indices l * N + n per culture
    "cas": [[35, 36, 37, 25], [30, 31, 20, 5], [38, 39, 21, 22]],
    "lap": [[35, 36, 0, 1], [30, 31, 2, 3], [38, 4, 6, 7]],
    "rnd0": [[9, 19, 29, 39], [8, 18, 28, 38], [7, 17, 27, 37]],
    "rnd1": [[1, 11, 21, 31], [2, 12, 22, 32], [3, 13, 23, 33]],
}


def _summary(m: np.ndarray) -> tuple[float, float, float]:
    """self, cross, gap of a [C, C] matrix (cross and gap NaN with one culture)."""
    diag = np.eye(len(m), dtype=bool)
    s = float(m[diag].mean())
    c = float(m[~diag].mean()) if len(m) > 1 else float("nan")
    return s, c, s - c


def _eval_json(method, cultures, delta, labels: bool, masks: Masks) -> dict:
    """An eval/<method>.json as pipeline.run writes it; flip derived from |delta|."""
    delta = np.asarray(delta, dtype=float)
    flip = np.abs(delta) / 100 * 1.7
    full = [60.0 + 5 * i for i in range(len(cultures))]
    res = {
        "method": method,
        "cultures": cultures,
        "labels_available": labels,
        "units": {"accuracy": "percent", "delta": "points", "flip": "fraction"},
        "items_per_culture": [40 + i for i in range(len(cultures))],
        "set_sizes": masks.sizes().tolist(),
        "layer_counts": masks.layer_counts().tolist(),
        "unparseable_full": 1,
        "accuracy_full": full if labels else None,
        "accuracy": (np.array(full) + delta).tolist() if labels else None,
        "delta": delta.tolist() if labels else None,
        "flip": flip.tolist(),
    }
    s, c, g = _summary(delta) if labels else (None, None, None)
    res.update(self=s, cross=c, gap=g)
    fs, fc, fg = _summary(flip)
    res.update(flip_self=fs, flip_cross=fc, flip_gap=fg)
    return res


def make_run(out: Path, cultures=CULTURES, labels=True, methods=("cas", "lap"), rnd=True) -> Path:
    """A fake finished run in ``out`` (see the module docstring)."""
    C = len(cultures)
    out.mkdir(parents=True, exist_ok=True)
    stats = Stats.zeros(cultures, FP, options={"items": "correct" if labels else "all"})
    stats.items[:] = torch.arange(C) + 20
    stats.T[:] = torch.arange(C) * 1000 + 5000
    stats.save(out, extra={"items_counted": int(stats.items.sum())})
    config = {"methods": list(methods), "ratio": 0.1, "per_layer": False, "scope": "all",
              "activation": "gate", "identify_on": "correct" if labels else "all",
              "split_ratio": 0.5, "seed": 0, "rnd_draws": 2 if rnd else 0, "rnd_like": "cas",
              "scoring": "logits", "batch_size": 8, "backend": "auto"}  # fmt: skip
    meta = {"config": config, "cultures": cultures, "fingerprint": dataclasses.asdict(FP),
            "data": "afaji/cvqa (fake)"}  # fmt: skip
    (out / "run.json").write_text(json.dumps(meta))
    eval_dir = out / "eval"
    eval_dir.mkdir(exist_ok=True)
    names = list(methods) + (["rnd0", "rnd1"] if rnd else [])
    draws = []
    for name in names:
        sets = [torch.tensor(s) for s in SETS[name][:C]]
        masks = Masks.from_sets(cultures, sets, FP, method=name)
        masks.save(out / "masks" / f"{name}.safetensors")
        if name.startswith("rnd"):
            delta = np.array(RND_DELTA_DRAWS[int(name[3:])])[:C, :C]
            draws.append(_eval_json("rnd", cultures, delta, labels, masks))
            continue
        delta = np.array(DELTA[name])[:C, :C]
        _write(eval_dir / f"{name}.json", _eval_json(name, cultures, delta, labels, masks))
    if draws:
        _write(eval_dir / "rnd.json", _rnd_json(draws))
    return out


def _rnd_json(draws: list[dict]) -> dict:
    """rnd.json as pipeline.run._rnd_summary writes it: means, sample sd, per-draw summaries."""
    keys = ("self", "cross", "gap", "flip_self", "flip_cross", "flip_gap")
    out = dict(draws[0], draws=[{k: d[k] for k in keys} for d in draws])
    for key in ("accuracy", "delta", "flip"):
        if draws[0][key] is not None:
            out[key] = np.mean([d[key] for d in draws], axis=0).tolist()
    for key in keys:
        vals = [d[key] for d in draws if d[key] is not None]
        if vals:
            out[key] = float(np.mean(vals))
            out[f"{key}_sd"] = float(np.std(vals, ddof=1))
    out["layer_counts"] = np.mean([d["layer_counts"] for d in draws], axis=0).tolist()
    return out


def _write(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj))  # NaN written as the literal NaN, as pipeline.run does


def _read(out: Path, name: str) -> dict:
    return json.loads((out / "eval" / f"{name}.json").read_text())


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
    for method in ("cas", "lap", "rnd"):
        _assert_png(out / "figures" / f"{method}_delta.png")
        _assert_png(out / "figures" / f"{method}_flip.png")
    _assert_png(out / "figures" / "layers.png")
    assert not list((out / "figures").glob("*.tmp"))


def test_report_holds_the_summaries_from_the_json(labelled):
    out, text = labelled
    assert "Fake run for the report test." in text
    for method in ("cas", "lap"):
        ev = _read(out, method)
        row = next(line for line in text.splitlines() if line.startswith(f"| **{method}** |"))
        for key in ("self", "cross", "gap"):
            assert f"| {ev[key]:.1f} |" in row, (method, key, row)
        for key in ("flip_self", "flip_cross", "flip_gap"):
            assert f"| {ev[key]:.3f} |" in row, (method, key, row)
    rnd = _read(out, "rnd")
    row = next(line for line in text.splitlines() if line.startswith("| rnd |"))
    assert f"{rnd['gap']:.1f} ± {rnd['gap_sd']:.1f}" in row
    # Sorted by gap, most selective (most negative) first.
    summary = text.split("## Ablation effect per method")[1].split("\n## ")[0]
    order = [line.split("|")[1].strip(" *") for line in summary.splitlines()
             if line.startswith(("| **cas**", "| **lap**", "| rnd |"))]  # fmt: skip
    assert order == ["cas", "lap", "rnd"]


def test_report_interprets_against_rnd(labelled):
    out, text = labelled
    cas, rnd = _read(out, "cas"), _read(out, "rnd")
    assert "**cas** is the most selective method" in text
    # cas gap -18.3 vs RND -0.25 ± 0.35: beats it by far more than 2 sd.
    assert rnd["gap"] - cas["gap"] > 2 * rnd["gap_sd"]
    assert f"by {rnd['gap'] - cas['gap']:.1f} points, more than 2 sd" in text
    assert "more selective than RND by more than 2 sd: cas, lap." in text


def test_report_sections(labelled):
    out, text = labelled
    for needle in ("qwen2_5_vl", "afaji/cvqa (fake)", "ratio = 10% of all neurons",
                   "scope = all", "scoring = logits", "seed = 0", "| Japan | 20 | 5,000 | 40 |",
                   "full-model accuracy (%)", "| Brazil | 65.0 |", "## Overlap between methods",
                   "## Set sizes", "## Files", "`masks/rnd1.safetensors`"):  # fmt: skip
        assert needle in text, needle
    # Every figure is embedded with a relative path that exists.
    for target in ("figures/cas_delta.png", "figures/rnd_flip.png", "figures/layers.png"):
        assert f"]({target})" in text and (out / target).is_file()
    # cas: layers of 35 36 37 25 | 30 31 20 5 | 38 39 21 22 -> layer 3: 7, layer 2: 4, layer 0: 1.
    cas_row = next(line for line in text.splitlines() if line.startswith("| cas | 12 |"))
    assert "layer 3 (7), layer 2 (4), layer 0 (1)" in cas_row
    # cas vs lap, per culture: {35,36,37,25} & {35,36,0,1} = 2 of 6; 2 of 6; 1 of 7.
    overlap_row = next(line for line in text.splitlines() if line.startswith("| cas | - |"))
    assert f"| {(2 / 6 + 2 / 6 + 1 / 7) / 3:.3f} |" in overlap_row


def test_hidden_labels_report_no_accuracy(tmp_path):
    out = make_run(tmp_path, labels=False)
    (out / "figures").mkdir()
    (out / "figures" / "cas_delta.png").write_bytes(PNG_MAGIC)  # left by an earlier report
    text = write_report(out).read_text(encoding="utf-8")
    assert "accuracy is unavailable" in text.splitlines()[2]  # the notice, at the top
    assert "full-model accuracy" not in text and "(pts)" not in text
    assert "agreement self" in text
    assert not list((out / "figures").glob("*_delta.png"))
    for method in ("cas", "lap", "rnd"):
        _assert_png(out / "figures" / f"{method}_flip.png")
    cas = _read(out, "cas")
    row = next(line for line in text.splitlines() if line.startswith("| **cas** |"))
    assert f"| {cas['flip_gap']:.3f} |" in row and f"| {1 - cas['flip_self']:.3f} |" in row


def test_single_culture(tmp_path):
    out = make_run(tmp_path, cultures=["Japan"], methods=("cas",))
    assert math.isnan(_read(out, "cas")["gap"])  # written as NaN, as pipeline.run does
    text = write_report(out).read_text(encoding="utf-8")
    assert "cross and gap are undefined" in text
    _assert_png(out / "figures" / "cas_delta.png")


def test_some_methods_without_rnd(tmp_path):
    out = make_run(tmp_path, methods=("lap",), rnd=False)
    text = write_report(out).read_text(encoding="utf-8")
    assert "no RND control" in text and "**lap**" in text and "**cas**" not in text
    assert "Not computed: fewer than two methods" in text
    _assert_png(out / "figures" / "layers.png")


def test_unevaluated_run_is_refused(tmp_path):
    with pytest.raises(DataError, match="run `evaluate`"):
        write_report(tmp_path)
