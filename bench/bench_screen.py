"""``--matrix screen`` and ``--matrix sample`` against ``--matrix exact`` on the same run: do
the conclusions agree, and at what cost?

    python bench/bench_screen.py --json screen.json --models toy        # the toy, default run
    python bench/bench_screen.py --models toy --cultures 4,6,8          # the cost against C
    python bench/bench_screen.py --models gemma --locales 9 --sentences 10 --rnd-draws 3
    python bench/bench_screen.py --rules sample_0.5,sample_0.25 --replicates 200
    python bench/bench_screen.py --quick                                # tiny random models

For each model: identification and selection once (every default method and its RND draws),
then the same masks evaluated twice on the same items, statistics and resamples: exact (one
prefill per item and condition) and screened (:mod:`culture_neurons.pipeline.screen`) or
sampled (:mod:`culture_neurons.scoring.sampled`). Per model:

- ``verdicts_differ``: how many verdicts differ (each method's p against RND below 0.05 or
  not, the primary one Holm-adjusted, per measure on gap and specificity; specificity defined
  or not), and ``verdicts_differ_by_measure``;
- ``max_ci_ratio``: the largest ``|screen - exact|`` of a method's self, cross, gap or
  specificity over exact's 95 % interval half-width (below 1: inside the interval);
- ``ranking_agrees``: the methods ranked by their primary gap, the same order both ways;
- the cost: ``exact_prefills`` and ``screen_prefills`` (item-condition prefills; the
  load-independent measure), ``estimated_items`` (forward + backward passes of the estimate,
  each item once), ``prefill_ratio``, the cells screening confirmed whole and why;
- ``exact_s`` / ``screen_s``: wall time of each evaluation (with ``load_1min``: a time taken
  on a loaded machine is no benchmark);
- ``cap_exact_methods``: the most any rule that computes every method's cells exactly can
  save, RND rows free: ``(1 + C x masks) / (1 + C x methods)`` conditions (4.64x on the toy:
  4 methods and 15 RND draws at C = 8; below 4.75x at any C);
- ``drift``: per mask, its first cells' exact / estimated effect summed (``ratio``) and the
  factor its most-off first cell is off by (``worst_cell``);
- ``exact_replicates`` (with ``--replicates N``): the yardstick ``verdicts_differ`` is read
  against, how stable exact's own verdicts are: its tests recomputed from its kept per-item
  scores (no model work) on N bootstrap replicates of the evaluation items (each culture's
  items drawn with replacement, as many as it has), and how many verdicts differ from exact's
  per replicate (``mean``, ``all_same`` the share of replicates where none does, ``max``,
  ``by_verdict``). A descriptive yardstick, not a test: where a verdict changes in many
  replicates, no cheaper rule can be asked to reproduce it;
- ``sample_replicates`` (rules ``sample_<share>`` with ``--replicates N``): the same count over
  N draws of the share (:func:`sampled_verdicts`): how far sample mode's verdicts move with the
  share drawn, to read against ``exact_replicates``.

Rules (``--rules``, :data:`RULES`): ``screen`` (the default rule), ``screen_1.25`` (an error
model of 1.25x instead of 2x: fewer cells confirmed, is it still right?) and ``first_cells``
(the diagonal and the budget's cells, no rounds: screening before drift and conclusions were
checked); ``sample_<share>`` is ``--matrix sample --sample-share <share>`` (no estimate: every
cell measured, off the diagonal on the share; its tests keep their level by construction).

JSON: ``{"machine": ..., "models": [{"model", "rule", "cultures", "items", "conditions", "exact_s",
"screen_s", "verdicts_differ", "verdicts_differ_by_measure", "max_ci_ratio", "ranking_agrees",
"exact_prefills", "screen_prefills", "estimated_items", "prefill_ratio", "whole",
"differing", "drift", "cap_exact_methods", "exact_replicates", "sample", "sample_replicates"}]}``
(one row per model and rule; ``screen_s`` / ``screen_prefills`` are the rule's, sample's too).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import checkout  # noqa: F401  (this checkout's culture_neurons first)

from culture_neurons.eval_schema import SUMMARIES, measures_of, primary
from culture_neurons.pipeline import screen
from culture_neurons.pipeline.config import RunConfig
from culture_neurons.pipeline.run import Run

GEMMA_LOCALES = 9  # the floor (20 if the CPU allows)
GEMMA_SENTENCES = 10  # per locale: half identify, half (5) evaluate
GEMMA_DRAWS = 3


def compare(exact: dict, screened: dict) -> dict:
    """How the screened eval JSONs ``{method: eval JSON}`` differ from the exact ones."""
    differ, by_measure, worst, differing = 0, {}, 0.0, []
    for name, want in exact.items():
        got = screened[name]
        a, b = screen.conclusions(want), screen.conclusions(got)
        for k in a:
            if a[k] != b.get(k):
                differ += 1
                by_measure[k] = by_measure.get(k, 0) + 1
                differing.append(f"{name} {k}")
        for m in measures_of(want):
            for s in SUMMARIES:
                x, y, ci = want.get(m.summary(s)), got.get(m.summary(s)), want.get(m.ci(s))
                if x is None or y is None or not ci or None in ci:
                    continue
                half = (ci[1] - ci[0]) / 2
                ratio = abs(x - y) / half if half > 0 else (0.0 if x == y else float("inf"))
                worst = max(worst, ratio)
    return {"verdicts_differ": differ, "verdicts_differ_by_measure": by_measure,
            "max_ci_ratio": worst, "ranking_agrees": ranking(exact) == ranking(screened),
            "ranking_exact": ranking(exact), "ranking_screen": ranking(screened),
            "differing": differing}  # fmt: skip


def ranking(results: dict) -> list[str]:
    """Methods by their primary gap, most selective first (its direction: lower or higher)."""
    def key(name: str) -> float:
        res = results[name]
        k = primary(res).summary("gap")
        sign = -1 if (res.get("direction") or {}).get(k) == "lower" else 1
        value = res.get(k)
        return float("inf") if value is None else -sign * value

    return sorted(results, key=key)


# Screening rules (providers): the default, a tighter error model, and the first cells alone
# (no rounds: the rule before drift and conclusions were checked, issue #26's baseline).
RULES = {
    "screen": (screen.DRIFT_LIMIT, dict(screen.FILLS)),
    "screen_1.25": (1.25, {"estimate": 1.0, "smaller": 1 / 1.25, "larger": 1.25}),
    "first_cells": (math.inf, {"estimate": 1.0}),
}
SAMPLE = "sample_"  # rule sample_<share>: --matrix sample at that share (no estimate at all)


def _is_sample(rule: str) -> bool:
    return rule.startswith(SAMPLE)


def measure(name: str, model, processor, data, config: RunConfig, rules: list[str],
            replicates: int = 0) -> list:  # fmt: skip
    """Identify and select once, evaluate exact and under every screening rule of ``rules``;
    the model's rows, one per rule (with ``replicates``, each carrying
    :func:`replicated_verdicts` of the exact run)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run = Run(model, processor, data, tmp / "exact", config, progress=False)
        masks = run.select(run.identify())
        start = time.perf_counter()
        exact = run.evaluate(masks)
        exact_s = time.perf_counter() - start
        load_exact = os.getloadavg()[0]
        stability = replicated_verdicts(run.out, exact, replicates) if replicates else None
        for rule in rules:
            if _is_sample(rule):
                share = float(rule.removeprefix(SAMPLE))
                cheap = replace(config, matrix="sample", sample_share=share)
            else:
                screen.DRIFT_LIMIT, screen.FILLS = RULES[rule]
                cheap = replace(config, matrix="screen", screen_budget=None)
            try:
                run_s = Run(model, processor, data, tmp / rule, cheap, progress=False)
                start = time.perf_counter()
                got = run_s.evaluate(masks)
                screen_s = time.perf_counter() - start
            finally:
                screen.DRIFT_LIMIT, screen.FILLS = RULES["screen"]
            row = _row(name, rule, run, masks, config, exact, got, exact_s, screen_s,
                       [load_exact, os.getloadavg()[0]]) | {"exact_replicates": stability}
            if _is_sample(rule) and replicates:
                row["sample_replicates"] = sampled_verdicts(run.out, exact, replicates, share,
                                                            config.seed)  # fmt: skip
            rows.append(row)
    return rows


def replicated_verdicts(out: Path, exact: dict, replicates: int, seed: int = 0) -> dict:
    """How many of exact's verdicts (:func:`compare`'s count) differ when its tests are
    recomputed (:func:`~culture_neurons.pipeline.retest.retest_items`, from the run's kept
    per-item scores in ``out``, read once) on ``replicates`` bootstrap replicates of the evaluation items (the
    intervals' stratified resamples, :class:`~culture_neurons.scoring.uncertainty.Bootstrap`,
    seeded by ``seed``): the module doc's ``exact_replicates``."""
    from culture_neurons.pipeline.retest import load_items
    from culture_neurons.scoring.uncertainty import Bootstrap

    items = load_items(out)
    culture = items["culture"]
    C = len(next(iter(exact.values()))["cultures"])
    return _tally(exact, (retested(exact, items, columns)
                          for columns in Bootstrap.draw(culture, C, replicates, seed).index))


def retested(exact: dict, items: dict, columns=None) -> dict:
    """A copy of exact's eval JSONs with the tests recomputed from ``items`` (on ``columns``)."""
    from culture_neurons.pipeline.retest import retest_items

    again = copy.deepcopy(exact)
    retest_items(items, again, columns)
    return again


def _tally(exact: dict, replicates) -> dict:
    """How many verdicts (:func:`compare`) each of ``replicates`` (eval JSONs) changes: mean,
    the share changing none, the most, and how often each verdict changes."""
    counts, by_verdict = [], {}
    for again in replicates:
        got = compare(exact, again)
        counts.append(got["verdicts_differ"])
        for k in got["differing"]:
            by_verdict[k] = by_verdict.get(k, 0) + 1
    return {"replicates": len(counts), "mean": sum(counts) / len(counts),
            "all_same": counts.count(0) / len(counts), "max": max(counts),
            "by_verdict": dict(sorted(by_verdict.items(), key=lambda kv: -kv[1]))}  # fmt: skip


def sampled_verdicts(out: Path, exact: dict, replicates: int, share: float, seed: int) -> dict:
    """How many of exact's verdicts differ under ``--matrix sample`` at ``share`` for
    ``replicates`` draws of the share (seeds ``seed + 1``, ...): its scores are exact's where it
    computes (tests/pipeline/test_sample_mode), so each draw is exact's kept scores with the
    others marked not computed, its tests recomputed
    (:func:`~culture_neurons.pipeline.retest.retest_items`; no model work). The spread a user
    of sample mode meets, read against ``exact_replicates``."""
    import torch

    from culture_neurons.pipeline.retest import load_items
    from culture_neurons.pipeline.rundir import read_json
    from culture_neurons.scoring import sampled
    from culture_neurons.tasks import task_class

    items = load_items(out)
    culture = items["culture"]
    first = next(iter(exact.values()))
    C = len(first["cultures"])
    ids = read_json(out / "eval" / "full.json", "")["items"]
    empty = task_class(first.get("task")).empty  # the task's "not computed"

    def drawn(r: int) -> dict:
        done = sampled.computed(sampled.choose(ids, culture, C, share, seed + 1 + r), culture,
                                C, C)  # [C, n]: every mask's C sets alike  # fmt: skip
        return {k: torch.where(done, v, empty(v.shape).to(v.dtype)) if k.startswith("scores.")
                else v for k, v in items.items()}  # fmt: skip

    return {"share": share} | _tally(exact, (retested(exact, drawn(r))
                                             for r in range(replicates)))


def _row(name, rule, run, masks, config, exact, got, exact_s, screen_s, load) -> dict:
    if _is_sample(rule):
        return _sample_row(name, rule, run, masks, config, exact, got, exact_s, screen_s, load)
    record = next(iter(got.values()))["screen"]
    whole = sorted({m for res in got.values() for m in res["screen"]["whole"]})
    ratio = {m: r for res in got.values() for m, r in res["screen"]["ratio"].items()}
    worst = {m: w for res in got.values() for m, w in res["screen"]["worst_cell"].items()}
    sizes = {m: sum(masks[m].sizes().tolist()) / len(run.cultures) for m in ratio}
    C = len(run.cultures)
    return {
        "model": name, "rule": rule, "cultures": C, "items": record["estimated_items"],
        "conditions": 1 + C * len(masks), "methods": list(exact),
        "rnd_draws": config.rnd_draws, "masks": len(masks),
        **compare(exact, got),
        "exact_prefills": record["exact_prefills"], "screen_prefills": record["prefills"],
        "estimated_items": record["estimated_items"],
        "prefill_ratio": record["exact_prefills"] / record["prefills"],
        "whole": whole, "rounds": record["rounds"],
        # the drift check: exact / estimated effect of each mask's first cells, by set size,
        # summed and the most-off cell (the factor it is off by either way; None: infinite)
        "drift": [{"mask": m, "mean_set_size": sizes[m], "ratio": ratio[m],
                   "worst_cell": worst[m]} for m in ratio],
        # what any rule that computes every method's cells exactly can save at best: the
        # exact matrix's conditions over the full model's and the methods' (RND rows free)
        "cap_exact_methods": (1 + C * len(masks)) / (1 + C * len(exact)),
        "exact_s": exact_s, "screen_s": screen_s,
        "load_1min": load,  # when each finished: a time taken under load is no benchmark
    }  # fmt: skip


def _sample_row(name, rule, run, masks, config, exact, got, exact_s, sample_s, load) -> dict:
    record = next(iter(got.values()))["sample"]
    C = len(run.cultures)
    return {
        "model": name, "rule": rule, "cultures": C, "items": sum(record["items_per_culture"]),
        "conditions": 1 + C * len(masks), "methods": list(exact),
        "rnd_draws": config.rnd_draws, "masks": len(masks), **compare(exact, got),
        "exact_prefills": record["exact_prefills"], "screen_prefills": record["prefills"],
        "estimated_items": 0, "prefill_ratio": record["exact_prefills"] / record["prefills"],
        "whole": [], "rounds": [], "drift": [], "sample": record,
        "cap_exact_methods": (1 + C * len(masks)) / (1 + C * len(exact)),
        "exact_s": exact_s, "screen_s": sample_s, "load_1min": load,
    }  # fmt: skip


def toy_case(draws: int | None, cultures: int | None = None) -> tuple:
    """The embedded toy's default run; with ``cultures``, on its first ``cultures`` cultures
    only (the same model and items: how the cost grows with C)."""
    import torch

    from culture_neurons.demo.toy import TOY_BATCH_SIZE, TOY_RATIO, TOY_THREADS, VERSION, toy

    torch.set_num_threads(TOY_THREADS)  # as the command line runs it
    t = toy()
    config = RunConfig(ratio=TOY_RATIO, batch_size=TOY_BATCH_SIZE)
    if draws is not None:
        config = replace(config, rnd_draws=draws)
    data = t.data if cultures is None else first_cultures(t.data, cultures)
    return f"toy ({VERSION})", t.model, t.processor, data, config


def first_cultures(data, k: int):
    """``data`` (a CultureData) on its first ``k`` cultures, their items as they are."""
    if not 2 <= k <= len(data.cultures):
        raise SystemExit(f"--cultures {k}: this data has 2 to {len(data.cultures)} cultures")
    return replace(data, items_by_culture={c: data.items_by_culture[c] for c in data.cultures[:k]})


def gemma_case(locales: int, sentences: int, draws: int) -> tuple:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from real_lm import BENCH_LOCALES, MODEL_NAME, cached_model  # noqa: E402 (bench/real_lm.py)

    from culture_neurons.data.faker_text import LOCALES, make_faker_data
    from culture_neurons.models.loading import load_model

    # real_lm's locales (close pairs and distant ones, issue #26's run), then Faker's others
    names = [*BENCH_LOCALES, *(loc for loc in LOCALES if loc not in BENCH_LOCALES)]
    data = make_faker_data(names[:locales], per_culture=sentences, seed=0)
    model, tok = load_model(str(cached_model()), "float32", "cpu")
    config = RunConfig(task="lm", identify_on="all", ratio=0.005, rnd_draws=draws,
                       batch_size=32, methods=("cas", "lape", "mad"))  # fmt: skip
    return MODEL_NAME, model, tok, data, config


def quick_cases() -> list[tuple]:
    from culture_neurons.data import make_synthetic_items
    from culture_neurons.data.faker_text import make_faker_data
    from culture_neurons.testing.tiny import tiny_model, tiny_processor

    vlm = ("tiny qwen2_5_vl (random weights)", tiny_model("qwen2_5_vl").eval(),
           tiny_processor("qwen2_5_vl"), make_synthetic_items(3, 8, seed=0),
           RunConfig(methods=("cas", "lap"), ratio=0.05, rnd_draws=1, batch_size=4,
                     identify_on="all", resamples=50))  # fmt: skip
    text = ("tiny llama (random weights)", tiny_model("llama").eval(), tiny_processor("llama"),
            make_faker_data(["de_DE", "ja_JP", "ru_RU"], per_culture=4, seed=0),
            RunConfig(task="lm", identify_on="all", methods=("cas", "lap"), ratio=0.05,
                      rnd_draws=1, batch_size=4, resamples=50))  # fmt: skip
    return [vlm, text]


def table(models: list[dict]) -> str:
    lines = ["| model | rule | C | items | conditions | verdicts differ | max |screen - exact| "
             "/ half-CI | ranking agrees | prefills exact / screen | ratio | cap | confirmed "
             "whole | wall exact / screen (s) | load |",
             "|" + " --- |" * 14]  # fmt: skip
    for m in models:
        lines.append(f"| {m['model']} | {m['rule']} | {m['cultures']} | {m['items']} | "
                     f"{m['conditions']} | "
                     f"{m['verdicts_differ']}{_spread(m.get('sample_replicates'))}"
                     f"{_yardstick(m.get('exact_replicates'))} | "
                     f"{m['max_ci_ratio']:.2f} | "
                     f"{'yes' if m['ranking_agrees'] else 'no'} | {m['exact_prefills']} / "
                     f"{m['screen_prefills']} (+ {m['estimated_items']} fwd+bwd) | "
                     f"{m['prefill_ratio']:.2f}x | {m['cap_exact_methods']:.2f}x | "
                     f"{len(m['whole'])} of {m['masks']} masks | {m['exact_s']:.0f} / "
                     f"{m['screen_s']:.0f} | {max(m['load_1min']):.1f} |")
    return "\n".join(lines)


def _spread(r: dict | None) -> str:
    if not r:
        return ""
    return (f" (over {r['replicates']} draws of the share: {r['mean']:.2f} on average, all kept "
            f"in {r['all_same']:.0%})")


def _yardstick(r: dict | None) -> str:
    if not r:
        return ""
    return (f" (exact's own, {r['replicates']} replicates: {r['mean']:.2f} on average, all "
            f"kept in {r['all_same']:.0%})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--quick", action="store_true", help="tiny random models only (seconds)")
    p.add_argument("--models", default="toy", help="toy, gemma or both (comma-separated)")
    p.add_argument("--locales", type=int, default=GEMMA_LOCALES)
    p.add_argument("--sentences", type=int, default=GEMMA_SENTENCES)
    p.add_argument("--rules", default=",".join(RULES),
                   help=f"rules to compare with exact: {', '.join(RULES)}, or "
                   f"{SAMPLE}<share> (--matrix sample at that share, e.g. {SAMPLE}0.25)")
    p.add_argument("--cultures", default=None,
                   help="the toy on its first K cultures, for each K of a comma-separated list "
                   "(default: all 8): how the cost grows with C")  # fmt: skip
    p.add_argument("--replicates", type=int, default=0,
                   help="also recompute exact's tests on this many bootstrap replicates of its "
                   "evaluation items: how many of its own verdicts differ (the yardstick)")
    p.add_argument("--rnd-draws", type=int, default=None,
                   help=f"RND draws (default: the run's default for the toy, {GEMMA_DRAWS} "
                   "for Gemma)")  # fmt: skip
    a = p.parse_args(argv)
    if a.quick:
        specs = quick_cases()
    else:
        wanted = {m.strip() for m in a.models.split(",")}
        toy_cs = [int(k) for k in a.cultures.split(",")] if a.cultures else [None]
        specs = ([toy_case(a.rnd_draws, k) for k in toy_cs] if "toy" in wanted else []) + (
            [gemma_case(a.locales, a.sentences, a.rnd_draws or GEMMA_DRAWS)]
            if "gemma" in wanted else [])  # fmt: skip
    models = []
    rules = [r.strip() for r in a.rules.split(",")]
    for spec in specs:
        models += measure(*spec, rules, a.replicates)
        print(f"# {spec[0]}: done", file=sys.stderr, flush=True)
    print(table(models))
    if a.json:
        from bench_estimate import machine

        Path(a.json).write_text(json.dumps({"machine": machine(), "models": models}, indent=1)
                                + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
