"""The ablation matrix from gradients (``--matrix estimate``) against the exact matrix, in one run.

    python bench/bench_estimate.py --json estimate.json     # the embedded toy + Gemma 3 270M LM
    python bench/bench_estimate.py --quick                  # tiny random models, seconds

For each model: identification and selection once (every method, no RND draws: the estimate
is compared cell by cell, RND adds nothing to that), then the same evaluation items under every
set of every method twice, side by side: the exact matrix (one prefill per item and condition,
as ``--matrix exact``) and the estimate (one forward and backward per batch, as ``--matrix
estimate``), same rows per forward. Per method and measure (multiple choice: accuracy change
and flip rate; LM: NLL change):

- Pearson and Spearman correlation of estimated and exact cells (all C x C, and the diagonal);
- self, cross and gap of both, and the methods' ranking by gap under both;
- ``exact_s`` / ``estimate_s``: wall time of the whole matrix (every method's sets together),
  ``speedup`` their ratio.

Where the first order fails (``"by_size"``, ``"by_layer"``): random sets of growing size, and of
a fixed size inside one layer, on a few items: the per-item change of the scoring quantity
(MC: the letter-logit margins; LM: the summed NLL) exact against estimated, as Pearson r and
the median relative error ``|est - exact| / |exact|``.

JSON: ``{"machine": ..., "cases": [{"model", "method", "measure", "cells", "pearson",
"spearman", "spearman_diag", "self_exact", "self_estimate", "cross_exact", "cross_estimate",
"gap_exact", "gap_estimate", "specificity_exact", "specificity_estimate" (the share of harm:
accuracy lost, flips or NLL gained), "gap_rank_exact", "gap_rank_estimate", "exact_s",
"estimate_s", "speedup"}], "models": [{"model", "cultures", "items", "conditions", "exact_s", "estimate_s",
"speedup", "by_size", "by_layer"}]}``. Never timed under load: state the load (``uptime``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import checkout  # noqa: F401  (this checkout's culture_neurons first)
import numpy as np
import torch

import culture_neurons as cn
from culture_neurons.masks import Masks
from culture_neurons.models import adapters
from culture_neurons.pipeline import matrix
from culture_neurons.pipeline.config import RunConfig
from culture_neurons.pipeline.run import Run
from culture_neurons.scoring import lm
from culture_neurons.scoring.estimate import estimate_lm, estimate_mc, mc_margins
from culture_neurons.scoring.metrics import summaries
from culture_neurons.scoring.prompting import encode, letter_token_ids

GEMMA_LOCALES = 20  # the 20 locales (the first 20 Faker locales of data.faker_text)
GEMMA_SENTENCES = 3  # per locale: 2 identify, 1 evaluates (the exact matrix is the cost here)
SIZES = (1, 10, 100, 1000, 10000)  # random set sizes of the first-order failure probe
LAYER_SET = 100  # neurons per single-layer set of the probe
PROBE_ITEMS = 8


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(_ranks(x), _ranks(y))


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    ok = ~(np.isnan(x) | np.isnan(y))
    x, y = x[ok], y[ok]
    if len(x) < 3 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (NaN stays NaN)."""
    out = np.full(len(x), np.nan)
    ok = ~np.isnan(x)
    values = x[ok]
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values), dtype=float)
    for v in np.unique(values):  # average ties
        tie = values == v
        ranks[tie] = ranks[tie].mean()
    out[ok] = ranks
    return out


# -- the matrices, exact and estimated ----------------------------------------------------------
def compare(name: str, model, processor, data, config: RunConfig) -> tuple[list, dict]:
    """Cases per method and measure, and the model's timing, for one model and its data."""
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(model, processor, data, Path(tmp), config, progress=False)
        masks = run.select(run.identify())
        combined, names = matrix.combine(masks)
        items = [it for c in run.cultures for it in run.evaluation.items_by_culture[c]]
        culture = torch.tensor([run.cultures.index(it.culture) for it in items])
        start = time.perf_counter()
        exact = matrix.exact(run, items, combined)
        exact_s = time.perf_counter() - start
        start = time.perf_counter()
        est = matrix.estimate(run, items, combined)
        estimate_s = time.perf_counter() - start
    C = len(run.cultures)
    point_exact = run.task.point(exact[0], exact[1:], items, culture, C, data)
    point_est = run.task.point(est[0], est[1:], items, culture, C, data)
    measures = ["delta"] + (["flip"] if config.task == "mc" else [])
    cases = []
    timing = {"exact_s": exact_s, "estimate_s": estimate_s, "speedup": exact_s / estimate_s}
    for measure in measures:
        gaps = {}
        # Harm's sign (scoring.metrics): accuracy is lost (-1); flips and NLL rise (+1). Only
        # specificity depends on it, self / cross / gap do not.
        sign = -1 if measure == "delta" and config.task == "mc" else 1
        for i, method in enumerate(names):
            rows = slice(i * C, (i + 1) * C)
            a, b = point_exact[measure][rows], point_est[measure][rows]
            sa, sb = summaries(a, sign), summaries(b, sign)
            gaps[method] = (float(sa["gap"]), float(sb["gap"]))
            x, y = a.numpy().ravel(), b.numpy().ravel()
            cases.append({
                "model": name, "method": method, "measure": measure, "cells": int(C * C),
                "pearson": pearson(x, y), "spearman": spearman(x, y),
                "spearman_diag": spearman(a.diagonal().numpy(), b.diagonal().numpy()),
                **{f"{s}_{k}": float(v[s]) for s in ("self", "cross", "gap", "specificity")
                   for k, v in (("exact", sa), ("estimate", sb))},
                **timing,
            })  # fmt: skip
        # Methods ranked by gap (1 = most selective: lowest for an accuracy change, highest
        # for flips and NLL changes).
        for k, which in ((0, "exact"), (1, "estimate")):
            order = sorted(gaps, key=lambda m, k=k: -sign * gaps[m][k])
            for case in cases[-len(names) :]:
                case[f"gap_rank_{which}"] = order.index(case["method"]) + 1
    info = {"model": name, "cultures": C, "items": len(items), "conditions": 1 + len(combined),
            "rows_per_forward": config.batch_size, **timing}  # fmt: skip
    return cases, info


# -- where the first order fails ---------------------------------------------------------------
def probe(model, processor, items: list, task: str, seed: int = 0) -> dict:
    """Per-item exact vs estimated change of the scoring quantity under random sets of growing
    size and under single-layer sets (ablation)."""
    fp = adapters.fingerprint(model)
    L, N = fp.num_layers, fp.num_neurons
    gen = torch.Generator().manual_seed(seed)
    sized = [torch.randperm(L * N, generator=gen)[:k] for k in SIZES if k <= L * N // 2]
    per_layer = [layer * N + torch.randperm(N, generator=gen)[: min(LAYER_SET, N // 2)]
                 for layer in range(L)]  # fmt: skip
    sets = sized + per_layer
    masks = Masks.from_sets([f"s{i}" for i in range(len(sets))], sets, fp)
    if task == "mc":
        inputs = encode(model, processor, items, device=next(model.parameters()).device)
        quantities = mc_margins(letter_token_ids(processor))
        full, shifts = estimate_mc(model, processor, items, masks)
    else:
        inputs = lm.encode_text(model, processor, items)
        full, shifts = estimate_lm(model, processor, items, masks)
    exact = []
    with torch.no_grad(), cn.ablate(model, masks, backend="hooks") as ab:
        for s in range(len(masks)):
            ab.set_batch(set_ids=s, **inputs)
            if task == "mc":
                exact.append(quantities(model(**inputs)))
            else:
                exact.append(lm.nll_sums(model, inputs["input_ids"],
                                         inputs["attention_mask"])[:, None].float())  # fmt: skip
            ab.clear_batch()
    change = (torch.stack(exact) - full).numpy()  # [S, B, Q]
    est = shifts.permute(2, 1, 0).numpy()  # [S, B, Q]

    def row(s: int) -> dict:
        x, y = change[s].ravel(), est[s].ravel()
        rel = np.abs(y - x) / np.maximum(np.abs(x), 1e-12)
        return {"pearson": pearson(x, y), "median_rel_error": float(np.median(rel)),
                "mean_abs_change": float(np.abs(x).mean())}  # fmt: skip

    return {
        "by_size": [{"neurons": int(len(sized[i])), **row(i)} for i in range(len(sized))],
        "by_layer": [{"layer": layer, "neurons": int(len(per_layer[layer])),
                      **row(len(sized) + layer)} for layer in range(L)],  # fmt: skip
    }


# -- the models ---------------------------------------------------------------------------------
def toy_case() -> tuple:
    from culture_neurons.demo.toy import TOY_BATCH_SIZE, TOY_RATIO, VERSION, toy

    t = toy()
    config = RunConfig(ratio=TOY_RATIO, rnd_draws=0, batch_size=TOY_BATCH_SIZE, resamples=1)
    return f"toy ({VERSION})", t.model, t.processor, t.data, config


def gemma_case(locales: int, sentences: int) -> tuple:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from real_lm import MODEL_NAME, cached_model  # noqa: E402 (bench/real_lm.py)

    from culture_neurons.data.faker_text import LOCALES, make_faker_data
    from culture_neurons.models.loading import load_model

    data = make_faker_data(list(LOCALES)[:locales], per_culture=sentences, seed=0)
    model, tok = load_model(str(cached_model()), "float32", "cpu")
    config = RunConfig(task="lm", identify_on="all", ratio=0.005, rnd_draws=0, batch_size=32,
                       resamples=1)  # fmt: skip
    return MODEL_NAME, model, tok, data, config


def quick_cases() -> list[tuple]:
    from culture_neurons.data import make_synthetic_items
    from culture_neurons.data.faker_text import make_faker_data
    from culture_neurons.testing.tiny import tiny_model, tiny_processor

    vlm = ("tiny qwen2_5_vl (random weights)", tiny_model("qwen2_5_vl").eval(),
           tiny_processor("qwen2_5_vl"), make_synthetic_items(3, 8, seed=0),
           RunConfig(ratio=0.05, rnd_draws=0, batch_size=4, identify_on="all", resamples=1))
    text = ("tiny llama (random weights)", tiny_model("llama").eval(), tiny_processor("llama"),
            make_faker_data(["de_DE", "ja_JP", "ru_RU"], per_culture=4, seed=0),
            RunConfig(task="lm", identify_on="all", ratio=0.05, rnd_draws=0, batch_size=4,
                      resamples=1))  # fmt: skip
    return [vlm, text]


def machine() -> dict:
    return {"platform": platform.platform(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "load_1min": os.getloadavg()[0]}  # fmt: skip


def table(cases: list[dict], models: list[dict]) -> str:
    lines = ["| model | method | measure | Pearson | Spearman | Spearman diag | gap exact | "
             "gap estimate | rank exact / estimate |", "|" + " --- |" * 9]  # fmt: skip
    for c in cases:
        lines.append(f"| {c['model']} | {c['method']} | {c['measure']} | {c['pearson']:.2f} | "
                     f"{c['spearman']:.2f} | {c['spearman_diag']:.2f} | {c['gap_exact']:+.4g} | "
                     f"{c['gap_estimate']:+.4g} | {c['gap_rank_exact']} / "
                     f"{c['gap_rank_estimate']} |")  # fmt: skip
    lines += ["", "| model | cultures | items | conditions | exact s | estimate s | speedup |",
              "|" + " --- |" * 7]  # fmt: skip
    for m in models:
        lines.append(f"| {m['model']} | {m['cultures']} | {m['items']} | {m['conditions']} | "
                     f"{m['exact_s']:.1f} | {m['estimate_s']:.1f} | {m['speedup']:.1f}x |")
    for m in models:
        lines += ["", f"First order by set size / by layer, {m['model']} (per-item change of "
                  "the score; median relative error):"]  # fmt: skip
        for r in m["by_size"]:
            lines.append(f"- {r['neurons']} random neurons: r = {r['pearson']:.3f}, median rel. "
                         f"error {r['median_rel_error']:.2f} (mean |change| "
                         f"{r['mean_abs_change']:.3g})")  # fmt: skip
        for r in m["by_layer"]:
            lines.append(f"- layer {r['layer']}, {r['neurons']} neurons: r = {r['pearson']:.3f}, "
                         f"median rel. error {r['median_rel_error']:.2f}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--quick", action="store_true", help="tiny random models only (seconds)")
    p.add_argument("--models", default="toy,gemma", help="toy, gemma or both")
    p.add_argument("--locales", type=int, default=GEMMA_LOCALES)
    p.add_argument("--sentences", type=int, default=GEMMA_SENTENCES)
    a = p.parse_args(argv)
    if a.quick:
        specs = quick_cases()
    else:
        wanted = {m.strip() for m in a.models.split(",")}
        specs = ([toy_case()] if "toy" in wanted else []) + (
            [gemma_case(a.locales, a.sentences)] if "gemma" in wanted else [])  # fmt: skip
    cases, models = [], []
    for name, model, processor, data, config in specs:
        got, info = compare(name, model, processor, data, config)
        evaluation = data.split(config.split_ratio, config.seed)[1]
        by_culture = [evaluation.items_by_culture[c] for c in evaluation.cultures]
        probe_items = [it for one_each in zip(*by_culture, strict=False)  # the shortest culture
                       for it in one_each][:PROBE_ITEMS]
        info.update(probe(model, processor, probe_items, config.task))
        cases += got
        models.append(info)
        print(f"# {name}: done", file=sys.stderr)
    result = {"machine": machine(), "cases": cases, "models": models}
    print(table(cases, models))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
