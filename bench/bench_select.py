"""Selectors and raw top-k: the C++ ranking (``backend="cpp"``) against the PyTorch twin.

Providers: ``cpp`` (culture_neurons._C) and ``torch`` (the pure-PyTorch path of topk.py), on
the same random stats in the same process; every case also checks that both give identical
output. Each timing is the median of ``--repeat`` runs of the whole call (for a selector:
statistics to Masks, so the shared elementwise work is in both numbers).

    python bench/bench_select.py --json bench_select.json     # ~10 min on 2 cores
    python bench/bench_select.py --quick                      # seconds

Cases: ``topk`` (one top-k over all C*L*N values of P), ``kth`` (the 95 % order statistic of
P, LAPE's filter), and the selectors ``cas lap lape mad rnd`` (``rnd`` does no ranking: its two
numbers run the same code and show the noise), at ratios r of 0.1, 0.5, 1 and 5 %.

Beside them, so that a reader sees whether selection is a cost at all, ``prefill_s``: the
decoder MLPs of ONE item's prefill at the same shape (L layers of gate, up, act * up and down
on ``PREFILL_TOKENS`` rows, fp32, on this machine; one layer timed, times L). Attention, the
vision tower and the head come on top, so a real prefill takes longer still: each row's
``cpp_over_prefill`` is an upper bound of selection's cost in prefills of one item. The header
gives the load average (a shared machine slows the multi-threaded torch path most).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import checkout  # noqa: F401  (this checkout's culture_neurons first)
import numpy as np
import torch
import torch.nn.functional as F
from shapes import QWEN25_VL_7B

from culture_neurons.selection import topk
from culture_neurons.selection.methods import select
from culture_neurons.stats import Fingerprint, Stats

# The paper's models (SPEC): C = 25 CVQA culture groups x L layers x N MLP neurons.
QWEN = QWEN25_VL_7B  # also Pangea-7B
SHAPES = {
    QWEN.name: (QWEN.cultures, QWEN.layers, QWEN.intermediate),  # 25 x 28 x 18944
    "llava-1.6-mistral-7b": (25, 32, 14336),  # not in shapes.py yet
}
QUICK_SHAPES = {"tiny": (8, 4, 4096)}
HIDDEN = {QWEN.name: QWEN.hidden, "llava-1.6-mistral-7b": 4096, "tiny": 256}
PREFILL_TOKENS = 1024  # one CVQA prompt with its image: ~1-2k tokens (shapes.py)
RATIOS = (0.001, 0.005, 0.01, 0.05)
QUICK_RATIOS = (0.005, 0.05)
SELECTORS = ("cas", "lap", "lape", "mad", "rnd")


def random_stats(C: int, L: int, N: int, seed: int = 0) -> Stats:
    """Binomial-ish counts: T ~ 1e5 tokens per culture, a per-neuron base firing rate (skewed
    low, as in real MLPs), a small per-culture effect, and sampling noise sqrt(T p (1 - p))."""
    g = torch.Generator().manual_seed(seed)
    T = torch.randint(60_000, 140_000, (C,), generator=g)
    base = torch.rand(L, N, generator=g).pow(3) * 0.6
    effect = torch.exp(torch.randn(C, L, N, generator=g) * 0.15)
    p = (base * effect).clamp(0, 1)  # float32 [C, L, N]
    Tf = T.view(-1, 1, 1).float()
    noise = torch.randn(C, L, N, generator=g) * (Tf * p * (1 - p)).sqrt()
    K = (Tf * p + noise).round().clamp(min=0).minimum(Tf).long()
    fp = Fingerprint("bench", "bench", L, N, 3584, "silu", f"random-{seed}")
    st = Stats.zeros([f"culture{c:02d}" for c in range(C)], fp)
    st.T.copy_(T)
    st.K.copy_(K)
    # Mean activation: correlated with firing plus noise (only mad reads it).
    st.S.copy_((K.float() * (0.5 + torch.rand(C, L, N, generator=g))).double())
    return st


def timed_pair(fn, repeat: int):
    """Median seconds of fn("cpp") and fn("torch"), and their last results. The providers
    alternate run by run, so both see the same load on a shared machine."""
    times = {"cpp": [], "torch": []}
    out = {}
    for _ in range(repeat):
        for backend in times:
            t0 = time.perf_counter()
            out[backend] = fn(backend)
            times[backend].append(time.perf_counter() - t0)
    med = {b: statistics.median(t) for b, t in times.items()}
    return med["cpp"], med["torch"], out["cpp"], out["torch"]


def prefill_mlps_s(L: int, H: int, N: int, tokens: int, repeat: int) -> float:
    """Seconds of the decoder MLPs of one prefill of ``tokens`` rows: L x the median of one
    layer's ``down(silu(gate(x)) * up(x))`` in fp32 (random weights, the matmuls dominate)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, H, generator=g)
    w_gate, w_up = torch.randn(N, H, generator=g), torch.randn(N, H, generator=g)
    w_down = torch.randn(H, N, generator=g)
    times = []
    with torch.no_grad():
        for i in range(repeat + 1):  # the first warms up
            t0 = time.perf_counter()
            F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)
            if i:
                times.append(time.perf_counter() - t0)
    return L * statistics.median(times)


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, tuple):
        return all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def cases(st: Stats, ratios):
    """(name, ratio, fn(backend)) for every case on these stats."""
    P = st.P
    flat = P.reshape(-1)
    yield "kth", None, lambda b: topk.kth_value(flat, round(flat.numel() * 0.95), backend=b)
    for r in ratios:
        yield "topk", r, lambda b, r=r: topk.topk_indices(flat, round(flat.numel() * r), backend=b)
        for method in SELECTORS:
            if method == "rnd":
                like = select(st, "cas", r)
                yield method, r, lambda b, like=like: select(st, "rnd", like=like, seed=0)
            else:
                yield method, r, lambda b, m=method, r=r: select(st, m, r, backend=b)


def header() -> dict:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "backend_built": topk.BACKEND,
        "load_1_5_15_min": [round(x, 2) for x in os.getloadavg()],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--quick", action="store_true", help="one tiny shape, two ratios, 1 repeat")
    ap.add_argument("--repeat", type=int, default=None, help="runs per provider (median)")
    args = ap.parse_args(argv)
    if topk._cpp() is None:
        print(f"bench_select: culture_neurons._C is not built ({topk._C_ERROR}); "
              "run `python setup.py build_ext --inplace` first", file=sys.stderr)  # fmt: skip
        return 1
    shapes, ratios = (QUICK_SHAPES, QUICK_RATIOS) if args.quick else (SHAPES, RATIOS)
    repeat = args.repeat or (1 if args.quick else 3)

    head = header()
    print(" | ".join(f"{k}: {v}" for k, v in head.items()) + f" | repeat: {repeat} (median)")
    print(f"{'case':<44} {'cpp_s':>8} {'torch_s':>8} {'speedup':>8}  identical  cpp/prefill")
    results = []
    for shape_name, (C, L, N) in shapes.items():
        tokens = 128 if args.quick else PREFILL_TOKENS
        prefill = prefill_mlps_s(L, HIDDEN[shape_name], N, tokens, repeat)
        print(f"# {shape_name}: the decoder MLPs of one {tokens}-token prefill take "
              f"{prefill:.3f} s here ({L} layers, hidden {HIDDEN[shape_name]}, {N} neurons)")
        st = random_stats(C, L, N)
        for name, r, fn in cases(st, ratios):
            t_cpp, t_torch, out_cpp, out_torch = timed_pair(fn, repeat)
            shape = f"{C}x{L}x{N}"
            case = f"{name} {shape}" + (f" r={r * 100:g}%" if r is not None else " q=95%")
            row = {
                "case": case, "selector": name, "shape": shape, "model": shape_name,
                "ratio": r, "cpp_s": round(t_cpp, 4), "torch_s": round(t_torch, 4),
                "speedup": round(t_torch / t_cpp, 2), "identical": same(out_cpp, out_torch),
                "prefill_s": round(prefill, 4), "prefill_tokens": tokens,
                "cpp_over_prefill": round(t_cpp / prefill, 3),
            }  # fmt: skip
            results.append(row)
            print(f"{case:<44} {t_cpp:8.3f} {t_torch:8.3f} {row['speedup']:7.2f}x  "
                  f"{row['identical']!s:<9}  {row['cpp_over_prefill']:.3f}", flush=True)  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"header": head, "cases": results}, indent=1))
    bad = [r["case"] for r in results if not r["identical"]]
    if bad:
        print("NOT IDENTICAL: " + ", ".join(bad), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
