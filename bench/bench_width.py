"""Paper-scale widths on the CPU (issue #24): does every recording path work, and what does it
cost, at the real 7B widths and on CVQA-sized photos?

Models (random weights, fp32 on the CPU, ``attn_implementation="sdpa"``), each from the real
config's shapes with few layers, so that a CPU forward takes seconds:

  qwen2.5-vl-7b         decoder 3584 x 18944 (28 heads over 4 kv heads), 2 of its 28 layers;
                        vision tower 1280 x 3420, 2 of its 32 blocks (the second a full-attention
                        one); vocabulary 152064; the real image processor (min_pixels 3136,
                        max_pixels 12845056, 28 x 28 pixels per token)
  llava-1.6-mistral-7b  decoder 4096 x 14336 (32 heads over 8 kv heads), 2 of its 32 layers;
                        CLIP ViT-L/14-336 1024 x 4096, 2 of its 24 layers; vocabulary 32064; the
                        real any-res grid pinpoints (336 x 672 ... 672 x 672, 1008 x 336)

Inputs: photos of ``--photo`` pixels (default 1600 x 1200, a typical CVQA photo; JPEG-encoded
and decoded, as CVQA's images are) with a short multiple-choice prompt, one item per forward,
at the processor's default image size and under ``--max-image-tokens`` (default 1024 for
Qwen, 2000 for LLaVA-NeXT, whose smallest tile grids hold 1,752 tokens).

Per model and image setting: image tokens per item, the median time of one prefill for
``plain`` (nothing attached), ``auto`` (``culture_neurons.record(backend="auto")``, the
pipeline's default), ``hooks``, ``fused``, ``functional`` and ``nnsight`` (bench_record's
providers, interleaved rounds), each one's ratio to ``plain``, and each one's peak memory above
the forward's start (``peak_mib``, the same profiler measurement for every provider); then one
estimate (``--matrix estimate``'s forward + backward, instrument/attribution.py) with its time
and peak. ``layer_rows_mib`` is one layer's ``[rows, N]`` fp32 temporary, the yardstick.

    python bench/bench_width.py [--quick] [--json out.json] [--repeats 2] [--case qwen]

``--quick`` runs the same code at 1/32 of the widths on small photos (seconds; the test runs
it). Times are only meaningful on a quiet machine: the header prints the load.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_record, checkout
import bench_record  # noqa: E402
import checkout  # noqa: E402, F401  (this checkout's culture_neurons first)
from bench_record import HAS_NNSIGHT, _cpu_name, instrument, measure  # noqa: E402

from culture_neurons.data.images import InMemoryImage  # noqa: E402
from culture_neurons.data.items import Item  # noqa: E402
from culture_neurons.models import adapters, image_budget  # noqa: E402
from culture_neurons.scoring.estimate import attribute_mc  # noqa: E402
from culture_neurons.scoring.prompting import encode  # noqa: E402
from culture_neurons.testing.memory import peak_bytes  # noqa: E402
from culture_neurons.testing.tiny import tiny_config, tiny_image, tiny_processor  # noqa: E402

# The real configs' shapes (hub config.json of each checkpoint); ``layers`` of the decoder and
# ``vision_layers`` of the tower are what this benchmark builds, not the real depth.
MODELS = {
    "qwen2.5-vl-7b": dict(
        family="qwen2_5_vl",
        text=dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                  num_key_value_heads=4, vocab_size=152064),  # fmt: skip
        mrope=[16, 24, 24],  # head_dim 128 / 2 rotary frequencies over (t, h, w)
        vision=dict(hidden_size=1280, intermediate_size=3420, num_heads=16, depth=2,
                    window_size=112, fullatt_block_indexes=[1]),  # fmt: skip
        pixels=(3136, 12845056),  # min_pixels, max_pixels of the real preprocessor_config
        budget=(1024, 16),  # --max-image-tokens of the budgeted case (real, --quick)
    ),
    "llava-1.6-mistral-7b": dict(
        family="llava_next",
        text=dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=32064),  # fmt: skip
        vision=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                    num_hidden_layers=2, image_size=336),  # fmt: skip
        pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        budget=(2000, 60),  # its smallest grids (336 x 672, 672 x 336) have 1,752 tokens
    ),
}
LAYERS = 2  # decoder layers built (real: 28 and 32)
PROVIDERS = ("plain", "auto", "hooks", "fused", "functional", "nnsight")
bench_record.PROVIDERS["auto"] = instrument("auto")  # the pipeline's default backend
QUICK = 32  # --quick divides every width by this


def build(name: str, quick: bool, layers: int = LAYERS):
    """(model, processor) of ``name`` at its real widths (``quick``: / QUICK), random weights,
    ``layers`` decoder layers."""
    spec = MODELS[name]
    shrink = QUICK if quick else 1
    text = {k: (v // shrink if k in ("hidden_size", "intermediate_size") else v)
            for k, v in spec["text"].items()}  # fmt: skip
    if quick:  # keep head_dim a multiple of what rotary needs: fewer heads, same layout
        text.update(num_attention_heads=4, num_key_value_heads=2, vocab_size=4096)
    text["num_hidden_layers"] = layers
    if "mrope" in spec:
        head_dim = text["hidden_size"] // text["num_attention_heads"]
        hw = 3 * head_dim // 16  # real: 24 of the 64 frequencies for h and for w, 16 for t
        section = spec["mrope"] if not quick else [head_dim // 2 - 2 * hw, hw, hw]
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6,
                                   "mrope_section": section}  # fmt: skip
    cls, config = tiny_config(spec["family"], **text)
    vision = dict(spec["vision"])
    if quick:
        vision.update(hidden_size=vision["hidden_size"] // shrink,
                      intermediate_size=vision["intermediate_size"] // shrink)  # fmt: skip
        vision["num_heads" if "num_heads" in vision else "num_attention_heads"] = 2
    for key, value in vision.items():
        setattr(config.vision_config, key, value)
    processor = tiny_processor(spec["family"])
    ip = processor.image_processor
    if "pixels" in spec:
        config.vision_config.out_hidden_size = text["hidden_size"]
        lo, hi = spec["pixels"]
        ip.size = {"shortest_edge": lo, "longest_edge": hi if not quick else 64 * 784}
    else:
        side = vision["image_size"] if not quick else 56
        pinpoints = spec["pinpoints"] if not quick else [[p // 6 for p in pp] for pp in
                                                         spec["pinpoints"]]  # fmt: skip
        config.vision_config.image_size = side
        config.image_grid_pinpoints = pinpoints
        ip.size, ip.crop_size = {"shortest_edge": side}, {"height": side, "width": side}
        ip.image_grid_pinpoints = pinpoints
    torch.manual_seed(0)
    model = cls._from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval()
    return model, processor


def photo_item(size: tuple[int, int], seed: int = 0) -> Item:
    """One multiple-choice item on a JPEG photo of ``size`` (width, height)."""
    buf = io.BytesIO()
    tiny_image(seed, size).save(buf, format="JPEG", quality=90)
    return Item(id=f"photo{seed}", culture="c0", question="Which dish is shown in this photo?",
                options=("rice", "bread", "soup", "tea"), label=0,
                image_ref=InMemoryImage(buf.getvalue()))  # fmt: skip


def _estimate(model, processor, batch) -> tuple[float, float]:
    """One estimate forward + backward: (seconds, peak MiB above its start)."""
    t0 = time.perf_counter()
    attribute_mc(model, processor, batch)
    seconds = time.perf_counter() - t0
    return seconds, peak_bytes(lambda: attribute_mc(model, processor, batch)) / 2**20


def photo_cases(name: str, quick: bool, photo: tuple[int, int], budget: int | None,
                settings: tuple[str, ...], layers: int = LAYERS):  # fmt: skip
    """Per image setting (``default``: the processor's; ``budget``: ``--max-image-tokens``):
    ``(model, processor, batch, row)``, one photo's encoded batch and the case's shape fields."""
    model, processor = build(name, quick, layers)
    budget = budget or MODELS[name]["budget"][quick]
    fp = adapters.fingerprint(model)
    item = photo_item(photo)
    for setting in [s if s == "default" else budget for s in settings]:
        done = image_budget.apply(model, processor, None if setting == "default" else setting)
        tokens = image_budget.image_tokens(model, processor, [item.image_size])[0]
        batch = encode(model, processor, [item])
        R = int(batch["input_ids"].numel())
        yield model, processor, batch, {
            "case": f"{name} ({'default' if setting == 'default' else f'<= {setting}'})",
            "model": name, "hidden": fp.hidden_size, "intermediate": fp.num_neurons,
            "layers": fp.num_layers, "photo": list(photo), "budget": done,
            "image_tokens": tokens, "rows": R, "layer_rows_mib": R * fp.num_neurons * 4 / 2**20}


def estimate_case(name: str, quick: bool, photo: tuple[int, int], budget: int | None,
                  layers: int, settings: tuple[str, ...] = ("default", "budget")) -> list:  # fmt: skip
    """The estimate's peak only (memory, not time: load does not change it), at ``layers``
    decoder layers."""
    rows = []
    for model, processor, batch, row in photo_cases(name, quick, photo, budget, settings, layers):
        peak = peak_bytes(lambda: attribute_mc(model, processor, batch)) / 2**20  # noqa: B023
        row.update(layer_input_mib=row["rows"] * row["hidden"] * 4 / 2**20,
                   estimate_peak_mib=peak)  # fmt: skip
        rows.append(row)
        print(f"{row['case']:<36} {row['layers']} layers, {row['image_tokens']:>6} image tokens, "
              f"{row['rows']:>6} rows; estimate peak {peak:.0f} MiB; [rows, N] fp32 = "
              f"{row['layer_rows_mib']:.0f} MiB, [rows, H] fp32 = {row['layer_input_mib']:.0f} "
              "MiB", flush=True)  # fmt: skip
    return rows


def run_case(name: str, quick: bool, photo: tuple[int, int], budget: int | None,
             repeats: int, providers: tuple[str, ...] = PROVIDERS,
             settings: tuple[str, ...] = ("default", "budget")) -> list:  # fmt: skip
    names = [p for p in providers if HAS_NNSIGHT or p != "nnsight"]
    rows = []
    for model, processor, batch, row in photo_cases(name, quick, photo, budget, settings):
        t, _, peak = measure(model, batch, [0], torch.device("cpu"), repeats, names,
                             first_apart=False)  # fmt: skip
        est_s, est_peak = _estimate(model, processor, batch)
        row.update(estimate_s=est_s, estimate_peak_mib=est_peak, peak_mib=peak)
        row.update({f"{n}_s": t[n] for n in names})
        row.update({f"{n}_over_plain": t[n] / t["plain"] for n in names if n != "plain"})
        rows.append(row)
        ratios = " ".join(f"{n} {t[n] / t['plain']:.3f}x ({peak[n]:.0f} MiB)" for n in names[1:])
        print(f"{row['case']:<36} {row['image_tokens']:>6} image tokens, {row['rows']:>6} rows; "
              f"plain {t['plain']:.2f} s ({peak['plain']:.0f} MiB); {ratios}; estimate "
              f"{est_s:.2f} s ({est_peak:.0f} MiB); [rows, N] fp32 = "
              f"{row['layer_rows_mib']:.0f} MiB", flush=True)  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1/32 of the widths, small photos")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--photo", default="1600x1200", help="photo size WIDTHxHEIGHT")
    ap.add_argument("--max-image-tokens", type=int, default=None,
                    help="the budgeted case's (default: 1024 for Qwen, 2000 for LLaVA-NeXT)")
    ap.add_argument("--case", default="", help="only the models whose name contains this")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--providers", default=",".join(PROVIDERS),
                    help="comma-separated, plain first (default: all)")
    ap.add_argument("--settings", default="default,budget",
                    help="image settings: default, budget or both (comma-separated)")
    ap.add_argument("--estimate-layers", type=int, nargs="*", default=None,
                    help="only the estimate's peak memory, at each of these decoder depths")
    args = ap.parse_args(argv)
    photo = (160, 120) if args.quick else tuple(int(v) for v in args.photo.split("x"))
    budget = args.max_image_tokens
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "python": platform.python_version()}  # fmt: skip
    print(f"# bench_width: cpu {_cpu_name()}, {torch.get_num_threads()} threads, load "
          f"{load:.2f} at start, " + ", ".join(f"{k} {v}" for k, v in versions.items())
          + f"; median of {args.repeats}; peak MiB above the forward's start", flush=True)  # fmt: skip
    rows = []
    for name in MODELS:
        if args.case not in name:
            continue
        if args.estimate_layers:
            for layers in args.estimate_layers:
                rows += estimate_case(name, args.quick, photo, budget, layers,
                                      tuple(args.settings.split(",")))
        else:
            rows += run_case(name, args.quick, photo, budget, args.repeats,
                             tuple(args.providers.split(",")), tuple(args.settings.split(",")))
    end_load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": f"cpu: {_cpu_name()}", "threads": torch.get_num_threads(),
                       "load_start": load, "load_end": end_load, "versions": versions,
                       "repeats": args.repeats, "quick": args.quick,
                       "peak": "live tensor bytes above the forward's start (testing.memory)",
                       "cases": rows}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
