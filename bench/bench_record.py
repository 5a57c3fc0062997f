"""Whole-model forward: plain vs recording with the hooks backend vs the fused backend.

Providers (same model, same batch, one process, interleaved repeats so that machine noise
hits all of them alike):
  plain   model(**batch), nothing attached
  hooks   culture_neurons.record(..., backend="hooks"): PyTorch forward hooks (the reference)
  fused   culture_neurons.record(..., backend="fused"): the MLP forward replaced by one op
          (Triton on CUDA, chunked PyTorch on CPU)

Cases: the tiny model of every family (tiny batch with images) and a mid-size decoder
(Qwen2 text config, see MID below) on random token ids. Reports median seconds and the
ratios hooks/plain and fused/plain; ``--json PATH`` writes them.

    python bench/bench_record.py [--quick] [--json out.json] [--device cuda]
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
from culture_neurons.testing.tiny import TINY_FAMILIES, tiny_batch, tiny_model, tiny_processor

# Mid-size decoder: a Qwen2-7B layer shrunk 4x in width (7B: hidden 3584, intermediate 18944,
# 28 layers) so that a CPU forward takes a fraction of a second.
MID = dict(hidden_size=896, intermediate_size=4736, num_hidden_layers=4, num_attention_heads=14,
           num_key_value_heads=2, vocab_size=4096)  # fmt: skip
MID_TOKENS = (4, 256)  # batch, sequence
CULTURES = [f"c{i}" for i in range(25)]  # CVQA's 25 culture groups


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_providers(model, batch: dict, device: torch.device, repeats: int) -> dict[str, float]:
    """Median seconds per forward of each provider, repeats interleaved."""
    B = batch["input_ids"].shape[0]
    culture = [i % len(CULTURES) for i in range(B)]
    recorders = {
        "hooks": lambda: cn.record(model, CULTURES, backend="hooks"),
        "fused": lambda: cn.record(model, CULTURES, backend="fused"),
    }
    times: dict[str, list[float]] = {"plain": [], "hooks": [], "fused": []}
    with torch.no_grad():
        for rep in range(repeats + 1):  # the first round warms up and is dropped
            for name in times:
                inst = recorders[name]() if name in recorders else None
                _sync(device)
                t0 = time.perf_counter()
                if inst is None:
                    model(**batch)
                else:
                    inst(culture, **batch)
                _sync(device)
                dt = time.perf_counter() - t0
                if inst is not None:
                    inst.detach()
                if rep:
                    times[name].append(dt)
    return {name: statistics.median(ts) for name, ts in times.items()}


def cases(quick: bool, device: torch.device):
    families = TINY_FAMILIES[:3] if quick else TINY_FAMILIES
    for family in families:
        model = tiny_model(family).to(device)
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                 for k, v in tiny_batch(family, tiny_processor(family), n=4).items()}  # fmt: skip
        yield f"tiny-{family}", model, batch
    torch.manual_seed(0)
    config = transformers.Qwen2Config(**MID)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = transformers.Qwen2ForCausalLM(config).to(device, dtype).eval()
    B, T = MID_TOKENS if not quick else (2, 128)
    ids = torch.randint(0, MID["vocab_size"], (B, T), device=device)
    yield f"mid-qwen2-{B}x{T}", model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="three tiny families, fewer repeats")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    device = torch.device(args.device)
    repeats = args.repeats or (3 if args.quick else 10)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(f"# bench_record: {device.type} {name or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"transformers {transformers.__version__}; median of {repeats}")  # fmt: skip
    print(f"{'case':<28}{'plain s':>10}{'hooks s':>10}{'fused s':>10}{'hooks/plain':>13}"
          f"{'fused/plain':>13}")  # fmt: skip
    rows = []
    for case, model, batch in cases(args.quick, device):
        t = time_providers(model, batch, device, repeats)
        row = {"case": case, "plain_s": t["plain"], "hooks_s": t["hooks"], "fused_s": t["fused"],
               "hooks_over_plain": t["hooks"] / t["plain"],
               "fused_over_plain": t["fused"] / t["plain"]}  # fmt: skip
        rows.append(row)
        print(f"{case:<28}{t['plain']:>10.4f}{t['hooks']:>10.4f}{t['fused']:>10.4f}"
              f"{row['hooks_over_plain']:>13.3f}{row['fused_over_plain']:>13.3f}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": f"{device.type}: {name}", "cases": rows}, f, indent=1)


if __name__ == "__main__":
    main()
