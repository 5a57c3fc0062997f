"""Whole-model recording: every way to take per-culture statistics, against the plain forward.

Providers (same model, same batch and rows per forward, one process, interleaved rounds so
that machine noise hits all of them alike; each is attached before its forwards and detached
after, outside the timing, with its totals allocated at attach as a long run amortises them;
per round, the first forward after attach is timed apart, ``<provider>_first_s``, and the
per-forward time is the second one's: a run attaches once and then runs many forwards):

  plain          model(**batch), nothing attached
  hand_hooks     what a researcher writes by hand: a forward hook on each act_fn taking, per
                 culture of the batch, fp32 (a > 0).sum, a.sum, (a * a).sum over its rows
  store          hook-and-store (TransformerLens' run_with_cache style): keep every layer's
                 activation during the forward, reduce per culture after it
  hooks          culture_neurons.record(..., backend="hooks"): PyTorch hooks, the reference
  functional     the functional API in a forward hook on each act_fn: one Totals, row ids
                 and T once per forward, F.accumulate per layer
  nnsight_plain  an nnsight trace with nothing in it (the baseline of nnsight's own cost);
                 nnsight providers run on a copy of the model, as wrapping patches modules
  nnsight        record_in_trace(lm, totals, ...) inside the trace
  fused          culture_neurons.record(..., backend="fused"): one op per MLP (Triton on CUDA,
                 chunked PyTorch on the CPU)

Cases: the tiny model of every family (4 prompts with images), the trained toy (8 encoded
items), and a realistic width (Qwen2 text config: hidden 896, intermediate 4736, 4 layers) on
random token ids. Times are medians; ratios to ``plain`` in the same run, and
``fused_over_hand_hooks``. Peak memory (``peak_mib``) is measured in a separate untimed
forward per provider by :func:`culture_neurons.testing.memory.peak_bytes`, the same way for
every provider: the highest live tensor bytes during the forward above those at its start
(CUDA: the allocator's max_memory_allocated; CPU: the profiler's allocation events).
``layer_rows_mib`` is one layer's ``[rows, N]`` fp32 temporary, the yardstick of the targets.

    python bench/bench_record.py [--quick] [--json out.json] [--device cuda] [--repeats 10]
        [--case mid] [--providers hand_hooks,hooks,fused] [--pairs 200]

``--pairs N`` adds each provider's paired ratio (:func:`paired`: plain and the provider on two
copies of the model, forward by forward), with its quartiles: the number to read where a
target is a few percent, as the separate medians move by more between runs.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable

import checkout  # noqa: F401  (this checkout's culture_neurons first)
import torch
import transformers

import culture_neurons as cn
from culture_neurons.instrument import Totals
from culture_neurons.instrument import functional as F
from culture_neurons.models import adapters
from culture_neurons.testing.memory import peak_bytes
from culture_neurons.testing.tiny import TINY_FAMILIES, tiny_batch, tiny_model, tiny_processor

# Realistic width: a Qwen2-7B layer shrunk 4x in width (7B: hidden 3584, intermediate 18944,
# 28 layers) so that a CPU forward takes about a second.
MID = dict(hidden_size=896, intermediate_size=4736, num_hidden_layers=4, num_attention_heads=14,
           num_key_value_heads=2, vocab_size=4096)  # fmt: skip
MID_TOKENS = (4, 256)  # batch, sequence (--quick: 2 x 128)
CULTURES = [f"c{i}" for i in range(25)]  # CVQA's 25 culture groups
HAS_NNSIGHT = importlib.util.find_spec("nnsight") is not None

Forward = Callable[[], object]


# --- providers: each attach(model, batch, culture) -> (forward, detach) ------------------------


def _rows(batch: dict, culture: list[int]) -> torch.Tensor:
    """int64 [B*T] culture id per token row, -1 on padding (what every provider counts)."""
    mask = batch["attention_mask"].bool()
    ids = torch.tensor(culture, device=mask.device)[:, None].expand_as(mask)
    return torch.where(mask, ids, -1).reshape(-1)


class HandTotals:
    """The by-hand statistics: fp32 per culture per forward, added into int64 / fp64 totals."""

    def __init__(self, model, culture: list[int]):
        fp = adapters.fingerprint(model)
        dev = next(model.parameters()).device
        C, L, N = len(CULTURES), fp.num_layers, fp.num_neurons
        self.K = torch.zeros(C, L, N, dtype=torch.int64, device=dev)
        self.S = torch.zeros(C, L, N, dtype=torch.float64, device=dev)
        self.Q = torch.zeros(C, L, N, dtype=torch.float64, device=dev)
        self.present = sorted({c for c in culture if c >= 0})
        self.rows = None

    def add(self, layer: int, a: torch.Tensor) -> None:
        x = a.detach().float().reshape(-1, a.shape[-1])
        for c in self.present:
            xc = x[self.rows == c]
            self.K[c, layer] += (xc > 0).sum(0)
            self.S[c, layer] += xc.sum(0)
            self.Q[c, layer] += (xc * xc).sum(0)


def _act_hooks(model, hook_of: Callable[[int], Callable]) -> Callable[[], None]:
    handles = [mlp.act_fn.register_forward_hook(hook_of(layer))
               for layer, mlp in enumerate(adapters.decoder_mlps(model))]  # fmt: skip
    return lambda: [h.remove() for h in handles]


def plain(model, batch, culture):
    return (lambda: model(**batch)), (lambda: None)


def hand_hooks(model, batch, culture):
    hand = HandTotals(model, culture)

    def hook_of(layer):
        return lambda module, args, a: hand.add(layer, a)

    def forward():
        hand.rows = _rows(batch, culture)
        return model(**batch)

    return forward, _act_hooks(model, hook_of)


def store(model, batch, culture):
    hand, cache = HandTotals(model, culture), {}

    def hook_of(layer):
        def keep(module, args, a):
            cache[layer] = a.detach()  # run_with_cache keeps the tensor itself

        return keep

    def forward():
        cache.clear()
        out = model(**batch)
        hand.rows = _rows(batch, culture)
        for layer, a in cache.items():
            hand.add(layer, a)
        cache.clear()
        return out

    return forward, _act_hooks(model, hook_of)


def instrument(backend: str):
    def attach(model, batch, culture):
        rec = cn.record(model, CULTURES, backend=backend)
        return (lambda: rec(culture, **batch)), rec.detach

    return attach


def _totals(model) -> Totals:
    """Totals with every layer allocated on its device (as the Instrument's are at attach)."""
    totals = Totals(CULTURES, adapters.fingerprint(model))
    for layer, mlp in enumerate(adapters.decoder_mlps(model)):
        totals.layer(layer, mlp.gate_proj.weight.device)
    return totals


def functional(model, batch, culture):
    totals, state = _totals(model), {}
    item = torch.tensor(culture)

    def hook_of(layer):
        return lambda module, args, a: F.accumulate(totals, layer, a, state["ids"])

    def forward():
        mask = batch["attention_mask"]
        state["ids"] = F.row_ids(item, mask.shape, mask, device=mask.device)
        F.count_tokens(totals, state["ids"])
        F.count_items(totals, item)
        return model(**batch)

    return forward, _act_hooks(model, hook_of)


def nnsight_trace(record: bool):
    def attach(wrapped, batch, culture):
        from culture_neurons.interop import record_in_trace

        lm, model = wrapped
        totals, item = _totals(model), torch.tensor(culture)

        def forward():
            with lm.trace(**batch):
                if record:
                    record_in_trace(lm, totals, item, batch["attention_mask"])

        return forward, lambda: None

    return attach


PROVIDERS = {
    "plain": plain,
    "hand_hooks": hand_hooks,
    "store": store,
    "hooks": instrument("hooks"),
    "functional": functional,
    "nnsight_plain": nnsight_trace(record=False),
    "nnsight": nnsight_trace(record=True),
    "fused": instrument("fused"),
}
NNSIGHT = ("nnsight_plain", "nnsight")


# --- measurement -------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model, batch: dict, culture: list[int], device, repeats: int, names: list[str],
            first_apart: bool = True):
    """(median seconds, median seconds of the first forward after attach, peak MiB) per
    provider; rounds interleaved, the first one dropped. ``first_apart=False``: one forward per
    attach, timed (for forwards of seconds, where one-off costs do not show: bench_width), and
    no first-forward times."""
    wrapped = None
    if any(n in NNSIGHT for n in names):
        import nnsight

        twin = copy.deepcopy(model)  # nnsight patches the modules it wraps: keep them apart
        wrapped = (nnsight.NNsight(twin), twin)
    target = {n: wrapped if n in NNSIGHT else model for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    firsts: dict[str, list[float]] = {n: [] for n in names}
    peaks: dict[str, float] = {}
    with torch.no_grad():
        for rnd in range(repeats + 2):  # round 0 warms up; the last measures memory
            for name in names:
                forward, detach = PROVIDERS[name](target[name], batch, culture)
                try:
                    if rnd == repeats + 1:
                        peaks[name] = peak_bytes(forward, device) / 2**20
                        continue
                    # The first forward after attach pays one-off costs (lazily made buffers,
                    # cold caches of the new hooks) that a run pays once, not per batch: it is
                    # timed apart, and the per-forward time is the next forward's.
                    first = _timed(forward, device) if first_apart else None
                    steady = _timed(forward, device)
                    if rnd:
                        times[name].append(steady)
                        if first_apart:
                            firsts[name].append(first)
                finally:
                    detach()
    median = {n: statistics.median(ts) for n, ts in times.items()}
    first = {n: statistics.median(ts) for n, ts in firsts.items()} if first_apart else None
    return median, first, peaks


def paired(model, batch: dict, culture: list[int], device, pairs: int, name: str) -> dict:
    """:func:`summary` of ``name``'s per-forward time over plain's, from
    pairs of forwards taken back to back: plain on one copy of the model and ``name`` attached
    to another, in alternating order, the copies swapped halfway (neither copy's memory layout
    favours one side). Noise slower than a pair (the machine's load, frequency) hits both of a
    pair alike, so the ratios are far tighter than those of separate medians (on 2 shared
    cores, a few points against up to 7: bench/RESULTS.md)."""
    twin = copy.deepcopy(model)
    ratios = []
    with torch.no_grad():
        for half, (bare, instrumented) in enumerate(((model, twin), (twin, model))):
            forward, detach = PROVIDERS[name](instrumented, batch, culture)
            base_forward, _ = plain(bare, batch, culture)
            try:
                for _ in range(2):  # warm-up: the first forwards after attach pay one-off costs
                    _timed(forward, device)
                    _timed(base_forward, device)
                for i in range((pairs + 1 - half) // 2):
                    if i % 2:
                        theirs = _timed(forward, device)
                        base = _timed(base_forward, device)
                    else:
                        base = _timed(base_forward, device)
                        theirs = _timed(forward, device)
                    ratios.append(theirs / base)
            finally:
                detach()
    return summary(ratios)


def summary(ratios: list[float]) -> dict:
    """Median of the paired ratios, its quartiles, and a distribution-free 95 % interval for the
    median (order statistics k and n - 1 - k of the sorted ratios, k from the binomial's
    normal approximation; None below 6 pairs, too few for one)."""
    r, n = sorted(ratios), len(ratios)
    q = statistics.quantiles(r, n=4) if n > 1 else r * 3
    k = math.floor((n - 1.96 * math.sqrt(n)) / 2)
    ci = [r[k], r[n - 1 - k]] if k >= 0 and n >= 6 else None
    return {"over_plain": statistics.median(r), "quartiles": [q[0], q[2]], "ci95": ci,
            "pairs": n}  # fmt: skip


def _timed(forward: Forward, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    forward()
    _sync(device)
    return time.perf_counter() - t0


def cases(quick: bool, device: torch.device, only: str = ""):
    """(name, model, batch, culture per item) of every case whose name contains ``only``."""
    for family in TINY_FAMILIES[:3] if quick else TINY_FAMILIES:
        if only not in f"tiny-{family}":
            continue
        model = tiny_model(family).to(device).eval()
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                 for k, v in tiny_batch(family, tiny_processor(family), n=4).items()}  # fmt: skip
        yield f"tiny-{family}", model, batch, [i % len(CULTURES) for i in range(4)]
    if not quick and only in "toy":
        from culture_neurons.demo.toy import toy
        from culture_neurons.scoring.prompting import encode

        t = toy()
        items = [t.data.items_by_culture[c][i] for i in range(2) for c in t.data.cultures[:4]]
        model = t.model.to(device).eval()
        culture = [t.data.cultures.index(it.culture) for it in items]
        yield f"toy-{len(items)}items", model, encode(model, t.processor, items, device), culture
    if only not in "mid-qwen2":
        return
    torch.manual_seed(0)
    config = transformers.Qwen2Config(**MID)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = transformers.Qwen2ForCausalLM(config).to(device, dtype).eval()
    B, T = MID_TOKENS if not quick else (2, 128)
    ids = torch.randint(0, MID["vocab_size"], (B, T), device=device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    yield f"mid-qwen2-{B}x{T}", model, batch, [i % len(CULTURES) for i in range(B)]


def _interval(ci: list[float] | None) -> str:
    return f"{ci[0]:.3f}-{ci[1]:.3f}" if ci else ""


def _cpu_name() -> str:
    """The CPU's model name and core count (Linux /proc/cpuinfo), else the platform's."""
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} cores"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="three tiny families and a smaller mid batch, no toy, 3 repeats")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--case", default="", help="run only the cases whose name contains this")
    ap.add_argument("--providers", default=",".join(PROVIDERS),
                    help="comma-separated providers to run (plain is always run: the ratios' base)")
    ap.add_argument("--pairs", type=int, default=0,
                    help="also measure each provider (nnsight's aside) in this many paired "
                         "forwards against plain on a twin copy: <provider>_paired, the "
                         "tighter ratio (see paired())")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    repeats = args.repeats or (3 if args.quick else 10)
    unknown = set(args.providers.split(",")) - set(PROVIDERS)
    if unknown:
        ap.error(f"unknown providers {sorted(unknown)}; known: {', '.join(PROVIDERS)}")
    chosen = {"plain", *args.providers.split(",")}
    names = [n for n in PROVIDERS if n in chosen and (HAS_NNSIGHT or n not in NNSIGHT)]
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "python": platform.python_version()}  # fmt: skip
    if HAS_NNSIGHT:
        import nnsight

        versions["nnsight"] = nnsight.__version__
    load_start = os.getloadavg()[0]  # times are only worth reporting on a quiet machine
    print(f"# bench_record: {device.type} {machine}, {torch.get_num_threads()} threads, "
          f"load {load_start:.2f} at start, "
          + ", ".join(f"{k} {v}" for k, v in versions.items())
          + f"; median of {repeats}; peak MiB above the forward's start")  # fmt: skip
    head = "".join(f"{n:>15}" for n in names)
    both = {"fused", "hand_hooks"} <= set(names)
    print(f"{'case':<24}{'rows':>6}{head}" + ("   fused/hand_hooks" if both else ""))
    rows = []
    for case, model, batch, culture in cases(args.quick, device, args.case):
        t, first, peak = measure(model, batch, culture, device, repeats, names)
        R, N = batch["input_ids"].numel(), adapters.fingerprint(model).num_neurons
        row = {"case": case, "rows": R, "neurons": N, "layer_rows_mib": R * N * 4 / 2**20}
        row.update({f"{n}_s": t[n] for n in names})
        row.update({f"{n}_over_plain": t[n] / t["plain"] for n in names if n != "plain"})
        row.update({f"{n}_first_s": first[n] for n in names})
        if both:
            row["fused_over_hand_hooks"] = t["fused"] / t["hand_hooks"]
        if {"nnsight", "nnsight_plain"} <= set(names):
            row["nnsight_over_nnsight_plain"] = t["nnsight"] / t["nnsight_plain"]
        row["peak_mib"] = peak
        if args.pairs:
            for n in names:
                if n != "plain" and n not in NNSIGHT:
                    row[f"{n}_paired"] = paired(model, batch, culture, device, args.pairs, n)
        rows.append(row)
        ratios = "".join(f"{t[n] / t['plain']:>14.3f}x" for n in names)
        mib = "".join(f"{peak[n]:>12.1f}MiB" for n in names)
        tail = f"   {row['fused_over_hand_hooks']:.3f}" if both else ""
        print(f"{case:<24}{R:>6}{ratios}{tail}")
        print(f"{'  (plain ' + format(t['plain'], '.4f') + ' s)':<30}{mib}")
        firsts = "".join(f"{first[n] / t['plain']:>14.3f}x" for n in names)
        print(f"{'  first after attach':<30}{firsts}")
        if args.pairs:
            pair = "".join(f"{row[n + '_paired']['over_plain']:>14.3f}x" if n + "_paired" in row
                           else f"{'':>15}" for n in names)  # fmt: skip
            print(f"{'  paired (' + str(args.pairs) + ' pairs)':<30}{pair}")
            cis = "".join(f"{_interval(row.get(n + '_paired', {}).get('ci95')):>15}"
                          for n in names)  # fmt: skip
            print(f"{'  paired, 95 % CI of median':<30}{cis}")
    load_end = os.getloadavg()[0]
    print(f"# load {load_end:.2f} at the end (this bench's own threads included)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": f"{device.type}: {machine}", "threads": torch.get_num_threads(),
                       "load_start": load_start, "load_end": load_end,
                       "versions": versions, "repeats": repeats,
                       "peak": "live tensor bytes above the forward's start (testing.memory)",
                       "cases": rows}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
