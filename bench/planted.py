"""Planted ground truth: do the selectors find neurons we planted ourselves?

For each (strength, noise) of a sweep and each seed, ``culture_neurons.testing.planted.plant`` builds a
tiny Llama whose culture neurons are known, the fused backend records its statistics, and every
selector (``cas lap lape mad rnd``) picks as many neurons as were planted (size matching in
``culture_neurons.testing.planted.select_matched``). Precision and recall are micro-averaged over
cultures and pooled over seeds. Two diagnostics follow the sweep: ``mad`` with
``contrast="max"``, and a sweep of ``culture_share`` (the share of a row's positions that carry
its culture's words), which is what ``lape``'s absolute bar depends on.

    python bench/planted.py --json out.json [--quick]

The ``always_on`` and ``pairs`` columns say how many selected neurons are distractors; ``chance``
is the precision of a uniform draw, k / (L * N). ``planted_p_own`` is the mean P of the planted
neurons on their culture, ``planted_p_other_max`` their mean highest P on another culture, and
``lape_bar`` the bar of ``lape`` (the ``bar_ratio`` order statistic of all P values).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict

import checkout  # noqa: F401  (this checkout's culture_neurons first)
import torch
import transformers

from culture_neurons.testing.planted import PlantConfig, Score, plant, score, select_matched

METHODS = ("cas", "lap", "lape", "mad", "rnd")
FULL = {"strengths": (0.25, 0.5, 1.0, 2.0, 4.0), "noises": (0.0, 1.0, 3.0), "seeds": 3,
        "shares": (0.5, 0.8, 1.0), "biases": (0.5, 0.25, 0.1)}  # fmt: skip
QUICK = {"strengths": (0.5, 2.0), "noises": (0.0, 2.0), "seeds": 1, "shares": (0.5, 1.0),
         "biases": (0.1,)}  # fmt: skip
# Diagnostic variants: (label, selector, options).
VARIANTS = (("mad[contrast=max]", "mad", {"contrast": "max"}),)


def header(threads: int) -> str:
    return (
        f"# planted ground truth | CPU {_cpu_name()} | torch {torch.__version__} | "
        f"transformers {transformers.__version__} | python {platform.python_version()} | "
        f"{threads} torch thread(s)"
    )


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_case(config: PlantConfig, seeds: int, selectors) -> tuple[dict[str, Score], dict]:
    """Pooled scores per selector label over ``seeds`` planted models of ``config``, and what
    the stats say about the planted neurons (means over seeds)."""
    totals = {label: Score() for label, _, _ in selectors}
    probe = {"planted_p_own": 0.0, "planted_p_other_max": 0.0, "lape_bar": 0.0}
    for seed in range(seeds):
        planted = plant(config, seed=config.seed + seed)
        stats = planted.record(backend="fused")
        P = planted.truth.probabilities(stats)  # [C, k, C']
        own = torch.eye(P.shape[0], dtype=torch.bool).unsqueeze(1).expand_as(P)
        probe["planted_p_own"] += float(P[own].mean()) / seeds
        probe["planted_p_other_max"] += float(P.masked_fill(own, 0).amax(-1).mean()) / seeds
        for label, method, options in selectors:
            masks = select_matched(stats, planted.truth, method, seed=seed, **options)
            totals[label] += score(masks, planted.truth)
            if method == "lape":
                probe["lape_bar"] += masks.options["bar_value"] / seeds
    return totals, probe


def rows_of(config: PlantConfig, result: tuple[dict[str, Score], dict], sweep: str) -> list[dict]:
    totals, probe = result
    chance = config.per_culture / (config.layers * config.intermediate)
    return [
        {
            "sweep": sweep, "method": label, "strength": config.strength, "noise": config.noise,
            "culture_share": config.culture_share, "bias_signal": config.bias_signal,
            "precision": s.precision, "recall": s.recall,
            "selected": s.selected, "planted": s.planted, "always_on": s.always_on,
            "pairs": s.pairs, "chance": chance, **probe,
        }
        for label, s in totals.items()
    ]  # fmt: skip


def tables(rows: list[dict]) -> str:
    """Markdown: precision / recall per method and case, then what each method picked instead."""
    labels = list(dict.fromkeys(r["method"] for r in rows))
    cases: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        key = (r["sweep"], r["strength"], r["noise"], r["culture_share"], r["bias_signal"])
        cases.setdefault(key, {})[r["method"]] = r
    head = ["sweep", "strength", "noise", "share", "bias", *labels, "P own", "P other", "lape bar"]
    out = ["precision / recall (micro over cultures, pooled over seeds); P own / P other: mean "
           "P of planted neurons on their culture / highest other culture", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # fmt: skip
    for key, by_method in cases.items():
        any_row = next(iter(by_method.values()))
        cells = [key[0], *(f"{v:g}" for v in key[1:])]
        cells += [f"{by_method[m]['precision']:.2f} / {by_method[m]['recall']:.2f}" for m in labels]
        cells += [f"{any_row[k]:.3f}" for k in ("planted_p_own", "planted_p_other_max", "lape_bar")]
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "selected neurons that are distractors, summed over all cases "
            "(always-on / two-culture / all selected)", "",
            "| method | always-on | two-culture | selected |", "|---|---|---|---|"]  # fmt: skip
    for m in labels:
        mine = [r for r in rows if r["method"] == m]
        total = [sum(r[k] for r in mine) for k in ("always_on", "pairs", "selected")]
        out.append(f"| {m} | " + " | ".join(str(t) for t in total) + " |")
    rnd = [r for r in rows if r["method"] == "rnd"]
    if rnd:
        hits = sum(r["precision"] * r["selected"] for r in rnd)
        precision = hits / sum(r["selected"] for r in rnd)
        recall = hits / sum(r["planted"] for r in rnd)
        out += ["", f"rnd pooled over all cases: precision {precision:.4f}, recall {recall:.4f}; "
                f"chance k / (L * N) = {rnd[0]['chance']:.4f}"]  # fmt: skip
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, help="write the cases here")
    parser.add_argument("--quick", action="store_true", help="2 x 2 sweep, 1 seed (~1 min)")
    parser.add_argument("--seeds", type=int, help="planted models per case (default 3; quick 1)")
    # One thread by default: on the shared 2-core box a forward of the planted model took 3.5 s
    # with torch's 2 threads under load and 0.4 s with 1 (oversubscription).
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    sweep = QUICK if args.quick else FULL
    seeds = args.seeds or sweep["seeds"]
    torch.set_num_threads(args.threads)
    print(header(args.threads), flush=True)
    base = PlantConfig()
    print(f"# config: {asdict(base)}; seeds per case: {seeds}", flush=True)

    # 100 rnd draws: chance precision is k / (L * N) = 0.8 %, ~37 expected hits per case and seed.
    selectors = [(m, m, {"draws": 100} if m == "rnd" else {}) for m in METHODS] + list(VARIANTS)
    start, rows, done = time.perf_counter(), [], {}

    def case(config: PlantConfig, sweep_name: str) -> list[dict]:
        # Diagnostic sweeps repeat some configs of the main one: run each config once.
        if config not in done:
            done[config] = run_case(config, seeds, selectors)
        return rows_of(config, done[config], sweep_name)

    for strength in sweep["strengths"]:
        for noise in sweep["noises"]:
            config = PlantConfig(strength=strength, noise=noise)
            rows += case(config, "strength x noise")
    # Diagnostics at strength 2, noise 0. lape's bar is an absolute P order statistic, so what
    # matters is how often a planted neuron fires at all on its culture's rows (culture_share
    # at most) against how spread ordinary neurons' P is (bias_signal).
    for share in sweep["shares"]:
        config = PlantConfig(strength=2.0, noise=0.0, culture_share=share)
        rows += case(config, "culture_share")
    for bias in sweep["biases"]:
        config = PlantConfig(strength=2.0, noise=0.0, culture_share=0.8, bias_signal=bias)
        rows += case(config, "bias_signal")
    print(tables(rows), flush=True)
    elapsed = time.perf_counter() - start
    print(f"# {len(rows)} rows in {elapsed:.0f} s", flush=True)
    meta = {"header": header(args.threads), "config": asdict(base), "seeds": seeds,
            "seconds": elapsed}  # fmt: skip
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "cases": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
