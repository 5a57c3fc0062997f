"""Pipeline throughput: the identification pass and the ablation matrix against plain prefills.

Providers, same model, same items, one process:
  identification
    plain      model(**batch) over the identification batches (already encoded)
    record     the same forwards through culture_neurons.record (fused backend)
  ablation matrix (every item under the full model and under S ablation sets)
    plain      model(**batch) once per (item batch, condition): what a hand-written loop does,
               vision tower included every time, no ablation applied
    matrix     culture_neurons.evaluate.Group: the group's vision work once, rows of up to
               batch_size // group conditions share each forward, per-row ablation masks

Throughput is items (identification) or items x conditions (matrix) per second; the ratio is
time(ours) / time(plain). Goal: identification <= 1.05x, matrix <= 1.1x.

Cases: the tiny Qwen2.5-VL of culture_neurons.testing.tiny and a mid-size one (its decoder widened,
see MID), on synthetic CVQA images (64 px; CVQA's are larger, so the vision share here is
small and the matrix's reuse gains are understated).

    python bench/bench_pipeline.py [--quick] [--json out.json] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import transformers

import culture_neurons as cn
from culture_neurons.data import make_synthetic_items
from culture_neurons.masks import Masks
from culture_neurons.models import adapters
from culture_neurons.scoring.multiple_choice import Group
from culture_neurons.scoring.prompting import encode
from culture_neurons.testing.tiny import tiny_model, tiny_processor

# Mid-size decoder (Qwen2.5-VL-7B: hidden 3584, intermediate 18944, 28 layers, 28 heads).
# head_dim stays the tiny model's 16 so that its multimodal rope sections still fit.
MID = dict(hidden_size=512, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=32,
           num_key_value_heads=4)  # fmt: skip


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


def identification(model, processor, items, batch_size, device, repeats) -> dict:
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    encoded = [encode(model, processor, b, device=device) for b in batches]
    cultures = sorted({it.culture for it in items})
    ids = [[cultures.index(it.culture) for it in b] for b in batches]

    def plain():
        for batch in encoded:
            model(**batch)

    def record():
        with cn.record(model, cultures, backend="fused") as rec:
            for batch, culture in zip(encoded, ids, strict=True):
                rec(culture, **batch)

    return _compare({"plain": plain, "record": record}, device, repeats, len(items))


def matrix(model, processor, items, masks, batch_size, device, repeats) -> dict:
    conditions = [-1] + list(range(len(masks)))
    group_size = max(1, batch_size // 4)
    per_forward = max(1, batch_size // group_size)
    chunks = [items[i : i + group_size] for i in range(0, len(items), group_size)]
    encoded = [encode(model, processor, c, device=device) for c in chunks]

    def plain():
        for batch in encoded:
            for _ in conditions:
                model(**batch, logits_to_keep=1)

    def ours():
        with cn.ablate(model, masks) as ablator:
            for chunk in chunks:
                group = Group(model, processor, chunk)
                for c0 in range(0, len(conditions), per_forward):
                    group.predict(conditions[c0 : c0 + per_forward], ablator)

    work = len(items) * len(conditions)
    return _compare({"plain": plain, "matrix": ours}, device, repeats, work)


def _compare(providers: dict, device, repeats: int, work: int) -> dict:
    times = {name: [] for name in providers}
    with torch.no_grad():
        for rep in range(repeats + 1):  # round 0 warms up
            for name, fn in providers.items():
                dt = _timed(fn, device)
                if rep:
                    times[name].append(dt)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    names = list(providers)
    out = {f"{n}_s": med[n] for n in names}
    out.update({f"{n}_per_s": work / med[n] for n in names})
    out["ratio"] = med[names[1]] / med[names[0]]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json")
    args = ap.parse_args()
    device = torch.device(args.device)
    cultures, per_culture = (3, 4) if args.quick else (4, 8)
    repeats = 2 if args.quick else 5
    data = make_synthetic_items(cultures=cultures, items_per_culture=per_culture, seed=0)
    items = [it for c in data.cultures for it in data.items_by_culture[c]]
    print(f"# bench_pipeline: {device.type} {platform.machine()}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}; {len(items)} items, median of {repeats}")
    print(f"{'case':<10}{'step':<16}{'plain/s':>10}{'ours/s':>10}{'ours/plain time':>17}")
    rows = []
    for case in ("tiny",) if args.quick else ("tiny", "mid"):
        model, processor = build(case, device)
        fp = adapters.fingerprint(model)
        g = torch.Generator().manual_seed(0)
        k = max(1, fp.num_layers * fp.num_neurons // 200)  # 0.5 % per set
        sets = [torch.randperm(fp.num_layers * fp.num_neurons, generator=g)[:k]
                for _ in range(2 * cultures)]  # two methods' worth of culture sets
        masks = Masks.from_sets([f"s{i}" for i in range(len(sets))], sets, fp)
        for step, fn in (("identification", identification), ("matrix", matrix)):
            extra = (masks,) if step == "matrix" else ()
            r = fn(model, processor, items, *extra, 8, device, repeats)
            ours = "record" if step == "identification" else "matrix"
            row = {"case": case, "step": step, **r}
            rows.append(row)
            print(f"{case:<10}{step:<16}{r['plain_per_s']:>10.1f}{r[ours + '_per_s']:>10.1f}"
                  f"{r['ratio']:>17.3f}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "cases": rows}, f, indent=1)


if __name__ == "__main__":
    main()
