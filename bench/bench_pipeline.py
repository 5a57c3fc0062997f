"""Pipeline throughput: the whole identification and the ablation matrix against plain prefills.

Every provider works on the same items, in the same batches (the run's: grouped by prompt
length, see ``culture_neurons.pipeline.batching``), with the same rows per forward, and pays
the same encoding (chat template, image processor, padding) inside its timing:

  identification (the identification half, ``batch_size`` items per forward)
    plain      one plain prefill of every item, scored: ``Group(batch).predict([-1])`` (the
               full model's letters; what any evaluation of the items costs)
    ident      ``Run.identify()``: the whole identification as the pipeline runs it, one
               prefill per item (score + record, the correct items committed), checkpoints
               and files included
    two_pass   the way before one-prefill identification: the plain prefill above, then the
               correct items recorded in a second prefill (what ``--scoring generate`` does)
  ablation matrix (the evaluation half, every item under the full model and S ablation sets)
    plain      per condition, one plain prefill of every item in forwards of ``batch_size``
               rows, scored, vision tower included (what a loop over conditions costs without
               ablating anything)
    matrix     ``Run``'s matrix: groups of ``batch_size // 4`` items, 4 conditions per forward
               (``batch_size`` rows, as plain), per-row ablation sets, the group's vision
               output reused by every forward after its first
    matrix_no_reuse  the same with ``reuse_vision=False`` (vision and encoding per forward):
               the reuse's share on its own line

JSON per case: ``*_s`` (medians), ``ident_over_plain``, ``two_pass_over_plain``,
``matrix_over_plain`` and ``matrix_no_reuse_over_plain`` (the same work as plain, so also the
ratio per condition), ``per_condition_s``, ``padding_share`` of the run's batches and
``padding_share_data_order`` (the same items batched in data order), ``lengths_s`` (prompt
lengths for the grouping, once per run, outside the timed providers). Targets (issue #13):
ident <= 1.10x, matrix <= 1.0x.

Cases: the tiny Qwen2.5-VL of culture_neurons.testing.tiny and a mid-size one (its decoder
widened, see MID), on synthetic CVQA images of varied sizes (``IMAGE_SIZES``: width and height
drawn apart, so prompts differ in length as CVQA's do).

    python bench/bench_pipeline.py [--quick] [--json out.json] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time

import checkout  # noqa: F401  (this checkout's culture_neurons first)
import torch
import transformers

import culture_neurons as cn
from culture_neurons.data import make_synthetic_items
from culture_neurons.masks import Masks
from culture_neurons.models import adapters
from culture_neurons.pipeline import RunConfig
from culture_neurons.pipeline import matrix as matrix_modes
from culture_neurons.pipeline.batching import padding_share
from culture_neurons.pipeline.run import Run
from culture_neurons.scoring.multiple_choice import Group
from culture_neurons.scoring.prompting import prompt_lengths
from culture_neurons.testing.tiny import tiny_model, tiny_processor

# Mid-size decoder (Qwen2.5-VL-7B: hidden 3584, intermediate 18944, 28 layers, 28 heads).
# head_dim stays the tiny model's 16 so that its multimodal rope sections still fit.
MID = dict(hidden_size=512, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=32,
           num_key_value_heads=4)  # fmt: skip
IMAGE_SIZES = (28, 224)  # pixels, smallest and largest side (tiny Qwen2.5-VL: 4 to 64 tokens)
BATCH = 8


def build(case: str, device: torch.device):
    model = tiny_model("qwen2_5_vl")
    if case == "mid":
        config = model.config
        for key, value in MID.items():
            setattr(config.text_config, key, value)
        config.text_config.head_dim = MID["hidden_size"] // MID["num_attention_heads"]
        config.text_config.layer_types = ["full_attention"] * MID["num_hidden_layers"]
        config.vision_config.out_hidden_size = MID["hidden_size"]
        torch.manual_seed(0)
        model = type(model)(config).eval()
    return model.to(device), tiny_processor("qwen2_5_vl")


def _timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _plain(model, processor, items: list, device) -> torch.Tensor:
    """The full model's letters of ``items``, BATCH rows per forward, vision and encoding each
    time."""
    preds = [Group(model, processor, items[i : i + BATCH], device=device,
                   reuse_vision=False).predict([-1])[0]
             for i in range(0, len(items), BATCH)]  # fmt: skip
    return torch.cat(preds)


def identification(run: Run, device, repeats: int) -> dict:
    model, processor = run.model, run.processor
    items = run.identification_items()  # every item in the run's batching order (one pass)
    cultures = run.cultures

    def two_pass():
        pred = _plain(model, processor, items, device)
        correct = [it for it, p in zip(items, pred.tolist(), strict=True) if p == it.label]
        with cn.record(model, cultures, backend=run.config.backend) as rec:
            for i in range(0, len(correct), BATCH):
                chunk = correct[i : i + BATCH]
                rec([cultures.index(it.culture) for it in chunk],
                    **run.task.encode(chunk, device))  # fmt: skip

    providers = {"plain": lambda: _plain(model, processor, items, device),
                 "ident": run.identify, "two_pass": two_pass}  # fmt: skip
    out = _compare(providers, device, repeats)
    lengths = run._lengths(items)
    by_data = [it for c in cultures for it in run.ident.items_by_culture[c]]
    out.update(items=len(items), padding_share=padding_share(lengths, BATCH),
               padding_share_data_order=padding_share(run._lengths(by_data), BATCH))  # fmt: skip
    return out


def matrix(run: Run, no_reuse: Run, masks: Masks, device, repeats: int) -> dict:
    model, processor = run.model, run.processor
    items = [it for c in run.cultures for it in run.evaluation.items_by_culture[c]]
    order = run._by_length(items)
    conditions = 1 + len(masks)

    def plain():
        for _ in range(conditions):
            _plain(model, processor, order, device)

    providers = {"plain": plain, "matrix": lambda: matrix_modes.exact(run, items, masks),
                 "matrix_no_reuse": lambda: matrix_modes.exact(no_reuse, items, masks)}  # fmt: skip
    out = _compare(providers, device, repeats)
    group = max(1, BATCH // 4)
    out.update(items=len(items), conditions=conditions,
               per_condition_s=out["plain_s"] / conditions,
               padding_share=padding_share(run._lengths(order), group))  # fmt: skip
    return out


def _compare(providers: dict, device, repeats: int) -> dict:
    """Medians (``<name>_s``) and ``<name>_over_plain``; rounds interleaved, round 0 warms up."""
    times = {name: [] for name in providers}
    with torch.no_grad():
        for rep in range(repeats + 1):
            for name, fn in providers.items():
                dt = _timed(fn, device)
                if rep:
                    times[name].append(dt)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    out = {f"{n}_s": med[n] for n in providers}
    out.update({f"{n}_over_plain": med[n] / med["plain"] for n in providers if n != "plain"})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny case only, fewer items, 2 repeats")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json")
    args = ap.parse_args()
    device = torch.device(args.device)
    cultures, per_culture = (2, 6) if args.quick else (4, 16)
    repeats = 2 if args.quick else 5
    data = make_synthetic_items(cultures=cultures, items_per_culture=per_culture, seed=0,
                                image_size=IMAGE_SIZES)  # fmt: skip
    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "python": platform.python_version()}  # fmt: skip
    print(f"# bench_pipeline: {device.type} {platform.machine()}, {torch.get_num_threads()} "
          f"threads, " + ", ".join(f"{k} {v}" for k, v in versions.items())
          + f"; {len(data)} items, images {IMAGE_SIZES[0]}-{IMAGE_SIZES[1]} px, "
          f"{BATCH} rows per forward, median of {repeats}")  # fmt: skip
    print(f"{'case':<6}{'step':<16}{'plain s':>9}  ratios to plain (same rows per forward)")
    rows = []
    for case in ("tiny",) if args.quick else ("tiny", "mid"):
        model, processor = build(case, device)
        fp = adapters.fingerprint(model)
        g = torch.Generator().manual_seed(0)
        k = max(1, fp.num_layers * fp.num_neurons // 200)  # 0.5 % per set
        sets = [torch.randperm(fp.num_layers * fp.num_neurons, generator=g)[:k]
                for _ in range(2 * cultures)]  # fmt: skip  (two methods' worth of culture sets)
        masks = Masks.from_sets([f"s{i}" for i in range(len(sets))], sets, fp)
        with tempfile.TemporaryDirectory() as tmp:
            config = RunConfig(batch_size=BATCH, checkpoint_minutes=0)
            run = Run(model, processor, data, f"{tmp}/run", config, progress=False)
            no_reuse = Run(model, processor, data, f"{tmp}/no_reuse",
                           RunConfig(batch_size=BATCH, reuse_vision=False), progress=False)  # fmt: skip
            t0 = time.perf_counter()
            every = [it for c in run.cultures for part in (run.ident, run.evaluation)
                     for it in part.items_by_culture[c]]  # fmt: skip
            lengths = prompt_lengths(model, processor, every)
            lengths_s = time.perf_counter() - t0
            for r in (run, no_reuse):  # the run's own cache, filled outside the timings
                r._length_of.update(zip([it.id for it in every], lengths, strict=True))
            steps = {"identification": identification(run, device, repeats),
                     "matrix": matrix(run, no_reuse, masks, device, repeats)}
        for step, r in steps.items():
            row = {"case": case, "step": step, "lengths_s": lengths_s, **r}
            rows.append(row)
            ratios = "  ".join(f"{k.removesuffix('_over_plain')} {v:.3f}x" for k, v in r.items()
                               if k.endswith("_over_plain"))  # fmt: skip
            print(f"{case:<6}{step:<16}{r['plain_s']:>9.3f}  {ratios}  "
                  f"(padding {100 * r['padding_share']:.1f} %)")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "threads": torch.get_num_threads(),
                       "versions": versions, "repeats": repeats, "rows_per_forward": BATCH,
                       "image_sizes": IMAGE_SIZES, "cases": rows}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
