"""GPU check of the kernels: bf16 correctness first, then timings at 7B decoder shapes.

Run once, blind, on one GPU: ``bash bench/gpu_check.sh`` (guarded to stay under 8 minutes).
``--quick`` runs tiny shapes on the CPU through the PyTorch op paths (no Triton) to test the
plumbing of this script anywhere.

(a) checks, each printing PASS/FAIL (WARN where only rounding can differ):
    act_and_record (Triton) vs ``kernels.reference`` (fp64) at odd shapes and 2048 x 18944:
    K exact, S/Q/h within tolerances; masked_down_proj vs the reference (odd shapes) and vs
    fp32 cuBLAS (2048 x 18944 -> 3584); hooks vs fused counts on a real ``Qwen2MLP``.
(b) timings of the providers ``plain``, ``hooks``, ``fused_record``, ``fused_ablate`` and
    ``masked_gemm`` on one layer and a 28-layer stack of random-weight ``Qwen2MLP`` (bf16),
    2048 and 8192 tokens, 25 cultures: median ms, ratio to plain, peak extra memory.
    The table comes LAST.
(c) (GPU only, between a and b) the fused kernel alone over a few tiles, in GB/s. One function per provider: the lead adds a model-level one later.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from shapes import QWEN25_VL_7B, TINY, DecoderShape  # noqa: E402

# Run from the repository root, culture_neurons imports from this checkout (kernels/ included,
# see culture_neurons/_source_tree.py) or from an install.
sys.path.insert(0, str(REPO))
from culture_neurons.kernels import act_and_record  # noqa: E402
from culture_neurons.kernels import reference as ref  # noqa: E402
from masked_down import masked_down_proj, masked_down_reference  # noqa: E402  (bench/)

RESULTS: dict = {"checks": [], "timings": []}


# --- data --------------------------------------------------------------------------------------


def batch_ids(R: int, C: int, num_sets: int, gen: torch.Generator, item_len=(1, 10)):
    """Per-row culture and ablation-set ids in runs, like items of a batch: [R] int32 each.

    ~10% of runs are -1 (padding / out of scope) for cultures; sets are -1 or 0..num_sets-1.
    """
    cultures, sets = [], []
    while len(cultures) < R:
        run = int(torch.randint(item_len[0], item_len[1], (1,), generator=gen))
        c = int(torch.randint(0, C, (1,), generator=gen))
        if float(torch.rand(1, generator=gen)) < 0.1:
            c = -1
        cultures += [c] * run
        sets += [int(torch.randint(-1, num_sets, (1,), generator=gen))] * run
    return torch.tensor(cultures[:R], dtype=torch.int32), torch.tensor(sets[:R], dtype=torch.int32)


def first_mismatch(got, want, atol=0.0, rtol=0.0):
    """``None`` or a line naming the first differing (culture, neuron) / (row, neuron)."""
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    bad = ((got - want).abs() > atol + rtol * want.abs()) | (got.isnan() != want.isnan())
    if not bad.any():
        return None
    idx = tuple(int(i) for i in bad.nonzero()[0])
    return (f"{int(bad.sum())} bad, first at {idx}: got {got[idx].item():.6g}, "
            f"want {want[idx].item():.6g}")


def report(ok: bool | None, name: str, details: str) -> bool:
    status = {True: "PASS", False: "FAIL", None: "WARN"}[ok]
    print(f"{status} {name}: {details}", flush=True)
    RESULTS["checks"].append({"status": status, "name": name, "details": details})
    return bool(ok)


# --- (a) checks --------------------------------------------------------------------------------


EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def check_act_and_record(dev, dtype, R, N, C, act_fn, record, seed=0):
    gen = torch.Generator().manual_seed(seed)
    gate = torch.randn(R, N, generator=gen) * 2
    if act_fn == "gelu_tanh" and record == "post":
        # Below g ~ -5.06 fp32 GELU-tanh rounds to 0 (torch and the kernel) where fp64 has a
        # tiny a with the sign of -u: the count there is rounding, checked vs eager instead.
        gate.clamp_(min=-4.5)
    gate, up = gate.to(dtype), torch.randn(R, N, generator=gen).to(dtype)
    culture, set_ids = batch_ids(R, C, 3, gen)
    keep = torch.rand(3, N, generator=gen) > 0.3
    K = torch.zeros(C, N, dtype=torch.int64, device=dev)
    S = torch.zeros(C, N, dtype=torch.float64, device=dev)
    Q = torch.zeros(C, N, dtype=torch.float64, device=dev)
    h = act_and_record(gate.to(dev), up.to(dev), act_fn=act_fn, activation=record,
                       culture=culture.to(dev), K=K, S=S, Q=Q, keep=keep.to(dev),
                       set_ids=set_ids.to(dev))
    h_ref, K_ref, S_ref, Q_ref = ref.act_and_record_reference(gate, up, culture, C, act_fn,
                                                              record, keep, set_ids)
    # fp32 sums over <= R rows in another order than fp64, plus ~1e-6 relative error of the
    # GPU's fast exp per term: 1e-4 of the largest sum of squares' scale is generous and still
    # catches a lost or doubled row.
    scale = float((Q_ref.max() * R).sqrt()) + 1e-6
    errs = {
        "K": first_mismatch(K, K_ref),
        "S": first_mismatch(S, S_ref, atol=1e-4 * scale, rtol=1e-4),
        "Q": first_mismatch(Q, Q_ref, atol=1e-4 * float(Q_ref.max()) + 1e-6, rtol=1e-4),
        # h is the fp32 value rounded to the dtype: within one ulp of the fp64 value.
        "h": first_mismatch(h, h_ref, atol=1e-6, rtol=EPS[dtype]),
    }
    bad = {k: v for k, v in errs.items() if v}
    s_err = float((S.cpu().double() - S_ref).abs().max())
    details = (f"K exact {'no' if 'K' in bad else 'yes'}, S max abs err {s_err:.2e}"
               + "".join(f"; {k}: {v}" for k, v in bad.items()))
    return report(not bad, f"act_and_record {R}x{N} C={C} {act_fn}/{record} {dtype}", details)


def check_gelu_saturation(dev, N=4099):
    """Over g in [-9, 3] (fp32 GELU-tanh is exactly 0 below ~-5.06) count as eager torch does."""
    R = 256
    gen = torch.Generator().manual_seed(3)
    gate = torch.linspace(-9, 3, R * N).reshape(R, N)
    up = torch.randn(R, N, generator=gen)
    rc = torch.randint(0, 4, (R,), generator=gen, dtype=torch.int32)
    K = torch.zeros(4, N, dtype=torch.int64, device=dev)
    S = torch.zeros(4, N, dtype=torch.float64, device=dev)
    Q = torch.zeros(4, N, dtype=torch.float64, device=dev)
    act_and_record(gate.to(dev), up.to(dev), act_fn="gelu_tanh", activation="post",
                   culture=rc.to(dev), K=K, S=S, Q=Q)
    a = F.gelu(gate.to(dev), approximate="tanh") * up.to(dev)  # eager torch on the same device
    K_eager = torch.stack([(a[rc.to(dev) == c] > 0).sum(0) for c in range(4)])
    diff = int((K.long() - K_eager.long()).abs().sum())
    # The boundary rows differ only if the fast exp and tanhf round one ulp apart there.
    return report(True if diff == 0 else None, "gelu_tanh/post counts vs eager torch in the "
                  "fp32-saturating band", f"{diff} of {R * N} signs differ")


def check_masked_down(dev, dtype, R, N, H, seed=0, vs="reference"):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(R, N, generator=gen).to(dtype)
    weight = (torch.randn(H, N, generator=gen) / N**0.5).to(dtype)  # outputs ~ N(0, 1)
    keep = torch.rand(4, N, generator=gen) > 0.005
    _, set_ids = batch_ids(R, 25, 4, gen)
    out = masked_down_proj(h.to(dev), weight.to(dev), keep.to(dev), set_ids.to(dev))
    if vs == "reference":
        want = masked_down_reference(h, weight, keep, set_ids)
    else:  # fp32 cuBLAS: the fp64 reference is minutes of CPU time at 7B shapes
        hd, kd, rsd = h.to(dev).float(), keep.to(dev), set_ids.to(dev).long()
        mask = torch.where((rsd >= 0)[:, None], kd[rsd.clamp(min=0)].float(), 1.0)
        want = F.linear(hd * mask, weight.to(dev).float())
    # Output rounded to the dtype (half an ulp) after fp32 accumulation in another order.
    err = first_mismatch(out, want, atol=1e-2, rtol=EPS[dtype])
    return report(err is None, f"masked_down_proj {R}x{N}->{H} {dtype} vs {vs}", err or "ok")


def check_hooks_vs_fused(dev, dtype, shape: DecoderShape, R: int):
    """On a real Qwen2MLP: the hooks provider and fused_record count the same (gate, exact)."""
    mlps = build_mlps(shape, 1, dev, dtype)
    env = make_env(shape, mlps, R, dev, dtype)
    outs = {}
    for name in ("hooks", "fused_record"):
        env.zero_stats()
        run, cleanup = PROVIDERS[name](env)
        y = run()
        cleanup()
        outs[name] = (y.float(), env.K[0].clone(), env.S[0].clone())
    (y_h, K_h, S_h), (y_f, K_f, S_f) = outs["hooks"], outs["fused_record"]
    errs = {
        "K": first_mismatch(K_f, K_h),
        # hooks see act in bf16 (the module's output), fused in fp32: 2^-8 relative per term.
        "S": first_mismatch(S_f, S_h, atol=1e-2 * float(S_h.abs().max()) + 1e-3, rtol=1e-2),
        "y": first_mismatch(y_f, y_h, atol=1e-2 * float(y_h.abs().max()), rtol=2 * EPS[dtype]),
    }
    bad = {k: v for k, v in errs.items() if v}
    return report(not bad, f"hooks vs fused_record on Qwen2MLP, {R} tokens, {dtype}",
                  "K exact, S and y close" if not bad else "; ".join(
                      f"{k}: {v}" for k, v in bad.items()))


@torch.no_grad()
def run_checks(dev, dtype, quick: bool, deadline: float) -> None:
    big = (256, 160) if quick else (2048, 18944)
    cases = [((1, 1), "silu", "gate"), ((7, 33), "gelu_tanh", "post"),
             ((130, 67), "silu", "post"), ((1000, 4099), "gelu_tanh", "gate"),
             (big, "silu", "gate"), (big, "silu", "post")]
    if quick:
        cases = [c for c in cases if c[0] != (1000, 4099)]
    for (R, N), act_fn, record in cases:
        guarded(deadline, check_act_and_record, dev, dtype, R, N, 25, act_fn, record, seed=R)
    guarded(deadline, check_gelu_saturation, dev, 67 if quick else 4099)
    for R, N, H in [(1, 1, 1), (130, 67, 40)] + ([] if quick else [(257, 4099, 1031)]):
        guarded(deadline, check_masked_down, dev, dtype, R, N, H, seed=R)
    R, N = big
    guarded(deadline, check_masked_down, dev, dtype, R, N, 64 if quick else 3584,
            vs="reference" if quick else "fp32 cuBLAS")
    shape = TINY if quick else QWEN25_VL_7B
    guarded(deadline, check_hooks_vs_fused, dev, dtype, shape, shape.tokens[0])


def guarded(deadline, fn, *args, **kwargs):
    if time.monotonic() > deadline:
        return report(None, fn.__name__, "skipped: time budget spent")
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        traceback.print_exc()
        return report(False, fn.__name__, f"raised {type(exc).__name__}: {exc}")


# --- (b) providers -----------------------------------------------------------------------------


def build_mlps(shape: DecoderShape, layers: int, dev, dtype):
    """``layers`` random-weight transformers ``Qwen2MLP``s (initialised on the device: fast)."""
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

    cfg = Qwen2Config(hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                      hidden_act=shape.act_fn, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4)  # divide any hidden size
    torch.manual_seed(0)
    with torch.device(dev):
        return [Qwen2MLP(cfg).to(dtype).eval() for _ in range(layers)]


class Env:
    """What every provider gets: the MLPs, one batch and per-layer accumulators."""

    def __init__(self, shape, mlps, x, culture, set_ids, keep):
        self.shape, self.mlps, self.x = shape, mlps, x
        self.culture, self.set_ids, self.keep = culture, set_ids, keep
        L, C, N, dev = len(mlps), shape.cultures, shape.intermediate, x.device
        # [L, C, N]: K[l] is the contiguous [C, N] total the op adds into.
        self.K = torch.zeros(L, C, N, dtype=torch.int64, device=dev)
        self.S = torch.zeros(L, C, N, dtype=torch.float64, device=dev)
        self.Q = torch.zeros(L, C, N, dtype=torch.float64, device=dev)

    def zero_stats(self):
        self.K.zero_()
        self.S.zero_()
        self.Q.zero_()


def make_env(shape: DecoderShape, mlps, R: int, dev, dtype) -> Env:
    gen = torch.Generator().manual_seed(R)
    x = torch.randn(R, shape.hidden, generator=gen).to(dtype).to(dev)
    # Items of 50..400 tokens, as CVQA prompts with an image; 4 ablation sets.
    culture, set_ids = batch_ids(R, shape.cultures, 4, gen, item_len=(50, 400))
    keep = torch.rand(4, shape.intermediate, generator=gen) > 0.005  # 0.5% ablated per set
    return Env(shape, mlps, x, culture.to(dev), set_ids.to(dev), keep.to(dev))


def _no_cleanup():
    return None


def provider_plain(env: Env):
    """transformers' Qwen2MLP as is."""

    def run():
        for mlp in env.mlps:
            y = mlp(env.x)
        return y

    return run, _no_cleanup


def provider_hooks(env: Env):
    """What people write by hand: a forward hook on act_fn reducing K/S/Q with index_add_."""
    counted = (env.culture >= 0).nonzero().squeeze(1)
    culture = env.culture[counted].long()
    N = env.shape.intermediate
    handles = []
    for layer, mlp in enumerate(env.mlps):

        def hook(module, inputs, out, layer=layer):
            a = out.reshape(-1, N)[counted].float()
            env.K[layer].index_add_(0, culture, (a > 0).long())
            env.S[layer].index_add_(0, culture, a.double())
            env.Q[layer].index_add_(0, culture, (a * a).double())

        handles.append(mlp.act_fn.register_forward_hook(hook))
    run, _ = provider_plain(env)
    return run, lambda: [h.remove() for h in handles]


def _fused_forward(env: Env, layer: int, mlp, record: bool, ablate: bool):
    g, u = mlp.gate_proj(env.x), mlp.up_proj(env.x)
    stats = dict(culture=env.culture, K=env.K[layer], S=env.S[layer],
                 Q=env.Q[layer]) if record else {}
    mask = dict(keep=env.keep, set_ids=env.set_ids) if ablate else {}
    h = act_and_record(g, u, act_fn=env.shape.act_fn, activation="gate", **stats, **mask)
    return mlp.down_proj(h)


def provider_fused_record(env: Env):
    """gate/up linears + act_and_record (statistics) + down_proj."""

    def run():
        for layer, mlp in enumerate(env.mlps):
            y = _fused_forward(env, layer, mlp, record=True, ablate=False)
        return y

    return run, _no_cleanup


def provider_fused_ablate(env: Env):
    """gate/up linears + act_and_record (mask only, no statistics) + cuBLAS down_proj."""

    def run():
        for layer, mlp in enumerate(env.mlps):
            y = _fused_forward(env, layer, mlp, record=False, ablate=True)
        return y

    return run, _no_cleanup


def provider_masked_gemm(env: Env):
    """gate/up linears + act_and_record (plain act * up) + masked_down_proj (mask in the GEMM)."""

    def run():
        for mlp in env.mlps:
            g, u = mlp.gate_proj(env.x), mlp.up_proj(env.x)
            h = act_and_record(g, u, act_fn=env.shape.act_fn)
            y = masked_down_proj(h, mlp.down_proj.weight, env.keep, env.set_ids)
        return y

    return run, _no_cleanup


PROVIDERS = {
    "plain": provider_plain,
    "hooks": provider_hooks,
    "fused_record": provider_fused_record,
    "fused_ablate": provider_fused_ablate,
    "masked_gemm": provider_masked_gemm,
}


# --- timing ------------------------------------------------------------------------------------


def median_ms(run, dev, target_s: float, max_reps: int) -> float:
    """Median wall time of run() in ms: CUDA events on a GPU, perf_counter on a CPU."""
    cuda = dev.type == "cuda"

    def once():
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        run()
        return (time.perf_counter() - t0) * 1e3

    once()  # warm-up: Triton compiles, cuBLAS picks its kernels
    first = once()
    reps = max(3, min(max_reps, int(target_s * 1e3 / max(first, 1e-3))))
    return statistics.median([first] + [once() for _ in range(reps)])


def run_timings(dev, dtype, quick: bool, deadline: float, providers) -> list[dict]:
    shape = TINY if quick else QWEN25_VL_7B
    rows = []
    mlps = build_mlps(shape, shape.layers, dev, dtype)
    for layers in (1, shape.layers):
        for R in shape.tokens:
            env = make_env(shape, mlps[:layers], R, dev, dtype)
            for name in providers:
                row = {"layers": layers, "tokens": R, "provider": name}
                if time.monotonic() > deadline:
                    row["error"] = "skipped: time budget spent"
                    rows.append(row)
                    continue
                try:
                    run, cleanup = PROVIDERS[name](env)
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                        base = torch.cuda.memory_allocated()
                    with torch.no_grad():
                        row["ms"] = median_ms(run, dev, 0.2 if quick else 1.0, 50)
                    if dev.type == "cuda":
                        row["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
                    cleanup()
                except Exception as exc:
                    traceback.print_exc()
                    row["error"] = f"{type(exc).__name__}: {exc}"[:80]
                rows.append(row)
                print(f"  timed {row}", flush=True)
            del env
    for row in rows:
        plain = next((r for r in rows if r["provider"] == "plain" and r["layers"] == row["layers"]
                      and r["tokens"] == row["tokens"] and "ms" in r), None)
        if plain and "ms" in row:
            row["ratio"] = row["ms"] / plain["ms"]
    RESULTS["timings"] = rows
    return rows


def print_table(rows: list[dict]) -> None:
    print()
    print(f"{'layers':>6} {'tokens':>6}  {'provider':<13} {'median ms':>10} {'x plain':>8} "
          f"{'peak extra MiB':>15}")
    for r in rows:
        if "ms" in r:
            peak = f"{r['peak_extra_mib']:15.0f}" if "peak_extra_mib" in r else f"{'-':>15}"
            print(f"{r['layers']:>6} {r['tokens']:>6}  {r['provider']:<13} {r['ms']:10.3f} "
                  f"{r.get('ratio', float('nan')):8.3f} {peak}")
        else:
            print(f"{r['layers']:>6} {r['tokens']:>6}  {r['provider']:<13} {r['error']}")


# --- (c) tile sweep of the fused kernel (GPU only) ------------------------------------------


@torch.no_grad()
def sweep_act_record(dev, dtype, deadline: float, R: int = 8192, N: int = 18944, C: int = 25):
    """The fused kernel alone at 7B shapes over a few tiles, against eager ``silu(g) * u``.

    Traffic is read g, u + write h = 6 R N bytes in bf16 (931 MB at 8192 x 18944), so GB/s
    says how close each tile runs to the memory bound; K/S/Q atomics are C x N per tile row.
    """
    from culture_neurons.kernels.act_record import act_and_record_triton

    gen = torch.Generator().manual_seed(0)
    g = (torch.randn(R, N, generator=gen) * 2).to(dtype).to(dev)
    u = torch.randn(R, N, generator=gen).to(dtype).to(dev)
    rc, rs = batch_ids(R, C, 4, gen, item_len=(50, 400))
    rc, rs = rc.to(dev), rs.to(dev)
    keep = (torch.rand(4, N, generator=gen) > 0.005).to(dev)
    K = torch.zeros(C, N, dtype=torch.int64, device=dev)
    S = torch.zeros(C, N, dtype=torch.float64, device=dev)
    Q = torch.zeros(C, N, dtype=torch.float64, device=dev)
    gbytes = 3 * R * N * g.element_size() / 1e9
    rows = []

    def add(name, fn):
        if time.monotonic() > deadline:
            return
        try:
            ms = median_ms(fn, dev, 0.3, 50)
            rows.append({"name": name, "ms": ms, "GBps": gbytes / (ms / 1e3)})
            print(f"  sweep {name:<40} {ms:8.3f} ms {gbytes / (ms / 1e3):8.0f} GB/s", flush=True)
        except Exception as exc:
            traceback.print_exc()
            rows.append({"name": name, "error": f"{type(exc).__name__}: {exc}"[:80]})

    add("eager silu(g) * u", lambda: F.silu(g) * u)
    args = (g, u, rc, K, S, Q, keep, rs, "silu", "gate")
    add("kernel, no record, no ablation", lambda: act_and_record_triton(*args, False, False))
    add("kernel, ablation only", lambda: act_and_record_triton(*args, False, True))
    for block_r, block_n, warps in [(64, 128, 8), (32, 128, 4), (32, 256, 8), (64, 256, 8),
                                    (128, 128, 8), (128, 64, 8), (16, 256, 4)]:
        add(f"kernel, record, tile {block_r}x{block_n} w{warps}",
            lambda b=(block_r, block_n, warps): act_and_record_triton(
                *args, True, False, block_r=b[0], block_n=b[1], num_warps=b[2]))
    RESULTS["sweep"] = rows


# --- main --------------------------------------------------------------------------------------


def header(dev) -> str:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    import transformers

    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    return (f"# gpu_check | {name} | torch {torch.__version__} | triton {triton_version} | "
            f"transformers {transformers.__version__} | TRITON_INTERPRET="
            f"{os.environ.get('TRITON_INTERPRET', '0')}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes on the CPU (PyTorch op paths, no Triton)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="stop starting new work after this many seconds (default 420)")
    parser.add_argument("--skip-checks", action="store_true")
    parser.add_argument("--skip-timings", action="store_true")
    parser.add_argument("--skip-sweep", action="store_true", help="no tile sweep (GPU only)")
    parser.add_argument("--providers", default=",".join(PROVIDERS),
                        help=f"comma list of {', '.join(PROVIDERS)}")
    parser.add_argument("--json", type=Path, help="also write checks and timings here")
    args = parser.parse_args(argv)

    t0 = time.monotonic()
    if args.quick:
        os.environ["TRITON_INTERPRET"] = "0"
        dev = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("FAIL no CUDA device: run with --quick on a CPU")
        return 2
    else:
        dev = torch.device("cuda")
    dtype = torch.bfloat16
    print(header(dev), flush=True)
    if dev.type == "cuda":
        import masked_down
        from culture_neurons.kernels import act_record

        print(f"# act_record tile {act_record.BLOCK_R_GPU}x{act_record.BLOCK_N_GPU} "
              f"warps {act_record.NUM_WARPS_GPU}; masked_down tile {masked_down.BLOCK_M_GPU}x"
              f"{masked_down.BLOCK_H_GPU}x{masked_down.BLOCK_K_GPU}", flush=True)
    # Checks get up to 40% of the budget; timings the rest.
    if not args.skip_checks:
        run_checks(dev, dtype, args.quick, t0 + 0.4 * args.budget_s)
    if dev.type == "cuda" and not args.skip_sweep:
        sweep_act_record(dev, dtype, t0 + 0.55 * args.budget_s)
    rows = []
    if not args.skip_timings:
        providers = [p for p in args.providers.split(",") if p]
        unknown = set(providers) - set(PROVIDERS)
        if unknown:
            parser.error(f"unknown providers {sorted(unknown)}; choose from {list(PROVIDERS)}")
        rows = run_timings(dev, dtype, args.quick, t0 + args.budget_s, providers)
    failed = [c for c in RESULTS["checks"] if c["status"] == "FAIL"]
    print(f"\n# checks: {len(RESULTS['checks']) - len(failed)} ok/warn, {len(failed)} FAIL; "
          f"{time.monotonic() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"header": header(dev), **RESULTS}, indent=1))
    print_table(rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
