"""GPU check of the fused path: correctness first, then interleaved timings; table last.

Run once, blind, on one GPU: ``bash bench/gpu_check.sh`` (guarded to stay under 8 minutes on an
H100; it installs nothing: torch >= 2.4, triton >= 3.0 and transformers 5.x as found).
``--quick`` runs the same sections at tiny shapes on the CPU (the kernel-path check through
Triton's interpreter, the rest through the PyTorch path) to test this script anywhere.

Sections, in order; each writes the JSON again when it ends, so a run that dies keeps what it
measured (``$OUT/gpu_check.json`` when ``$OUT`` is set, else ``bench/gpu_check.json``):

 1. kernel path: the Triton kernel is forced (``CULTURE_NEURONS_KERNEL=triton``), so a missing or
    broken triton, or a kernel that disagrees with the PyTorch path in its self-check
    (kernels/dispatch.py), is a FAIL here and in every later step: never a silent fallback timed
    as "fused".
 2. checks: act_and_record vs ``kernels.reference`` (fp64) at odd shapes and 2048 x 18944 (counts
    exact), the GELU saturation band vs eager torch, masked_down_proj, hooks vs fused counts.
 3. pytest -m gpu: the gpu-marked tests, bounded by a timeout.
 4. model: a Qwen2-shaped decoder stack (random weights, bf16) through the real backend
    (``cn.record`` / ``cn.ablate``: every per-forward cost paid), a prompt batch: providers
    ``plain``, ``hooks_record``, ``fused_record``, ``hooks_ablate``, ``fused_ablate``.
 5. decode: the same stack at decode size (8 rows x 1 token, 28 layers): ``plain``,
    ``hooks_ablate``, ``fused_ablate``; and the fused op alone per layer (``op_plain`` act * u,
    ``op_layer`` the bound LayerOp, ``op_face`` act_and_record) to see the dispatch cost.
 6. mlp: 1 and 28 random-weight ``Qwen2MLP``s, 2048 and 8192 tokens: ``plain``, ``hooks`` (the
    hand-written hook), ``fused_record``, ``fused_ablate``, ``masked_gemm``.
 7. sweep (GPU only): the kernel alone at 8192 x 18944 over candidate tiles (GB/s).

Providers of a case are interleaved per repetition (the order rotates), so machine noise hits
them alike; each reports its median, its spread (IQR / median) and, against ``plain``, the
median of per-repetition ratios. Every setup step is guarded: a failure is a FAIL line and the
rest goes on. Exit status 1 when anything FAILed.
"""

from __future__ import annotations

import os
import sys

QUICK = "--quick" in sys.argv[1:]
# Before anything imports triton: real kernels on a GPU; on --quick the kernel-path check runs
# Triton's interpreter on CPU tensors.
os.environ["TRITON_INTERPRET"] = "1" if QUICK else "0"

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
# Run from the repository root, culture_neurons imports from this checkout (kernels/ included,
# see culture_neurons/kernels/__init__.py) or from an install.
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from culture_neurons.kernels import LayerOp, act_and_record, dispatch  # noqa: E402
from culture_neurons.kernels import reference as ref  # noqa: E402
from shapes import QWEN25_VL_7B, TINY, DecoderShape  # noqa: E402

import culture_neurons as cn  # noqa: E402

RESULTS: dict = {"header": None, "sections": {}, "checks": [], "tests": None, "timings": [],
                 "sweep": [], "dispatch": None}  # fmt: skip
JSON_PATH: Path = REPO / "bench" / "gpu_check.json"
INJECT: set[str] = set()  # --inject-fail names: steps that raise on purpose (tests the guards)
SHARED: dict = {}  # objects one section hands the next (the model), never written out


# --- bookkeeping -------------------------------------------------------------------------------


def write_json() -> None:
    """Rewrite the JSON with everything so far (after every section and every failure)."""
    try:
        JSON_PATH.parent.mkdir(parents=True, exist_ok=True)
        tmp = JSON_PATH.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(RESULTS, indent=1, default=str))
        tmp.replace(JSON_PATH)  # atomic: a kill mid-write leaves the previous version
    except Exception as exc:  # never lose the run over its report
        print(f"FAIL writing {JSON_PATH}: {exc}", flush=True)


def report(ok: bool | None, name: str, details: str) -> bool:
    status = {True: "PASS", False: "FAIL", None: "WARN"}[ok]
    print(f"{status} {name}: {details}", flush=True)
    RESULTS["checks"].append({"status": status, "name": name, "details": details})
    return bool(ok)


def inject(name: str) -> None:
    """Raise (or die, for ``kill:<section>``) where --inject-fail asks: proves the guards."""
    if name in INJECT:
        if name.startswith("kill:"):
            print(f"# injected: killed after {name[5:]}", flush=True)
            os._exit(137)
        raise RuntimeError(f"injected failure in {name}")


def guarded(deadline: float, name: str, fn, *args, **kwargs):
    """``fn(*args)``, or a FAIL line (and None) if it raises; skipped past the deadline."""
    if time.monotonic() > deadline:
        report(None, name, "skipped: time budget spent")
        return None
    try:
        inject(name)
        return fn(*args, **kwargs)
    except Exception as exc:
        traceback.print_exc()
        report(False, name, f"raised {type(exc).__name__}: {exc}"[:300])
        write_json()
        return None


def section(name: str, fn, *args) -> None:
    """Run one section; record how it ended and rewrite the JSON."""
    t0 = time.monotonic()
    print(f"\n## {name}", flush=True)
    try:
        inject(f"section:{name}")
        fn(*args)
        state = "done"
    except Exception as exc:
        traceback.print_exc()
        report(False, f"section {name}", f"raised {type(exc).__name__}: {exc}"[:300])
        state = "failed"
    RESULTS["sections"][name] = {"state": state, "seconds": round(time.monotonic() - t0, 1)}
    RESULTS["dispatch"] = dispatch.status()
    write_json()
    inject(f"kill:{name}")


def sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


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


def zeros_stats(C: int, N: int, dev, L: int | None = None):
    shape = (C, N) if L is None else (L, C, N)
    return (torch.zeros(shape, dtype=torch.int64, device=dev),
            torch.zeros(shape, dtype=torch.float64, device=dev),
            torch.zeros(shape, dtype=torch.float64, device=dev))  # fmt: skip


# --- 1. kernel path ----------------------------------------------------------------------------


def kernel_path(dev, dtype) -> None:
    """The kernel runs (forced) and passes its self-check on this device, for the variants the
    later sections use. On --quick: the interpreter on CPU tensors, forced for this step only."""
    scoped = dev.type != "cuda"
    saved = os.environ.get(dispatch.MODE_ENV)
    os.environ[dispatch.MODE_ENV] = "triton"
    dispatch.reset()
    try:
        gen = torch.Generator().manual_seed(0)
        R, N, C = 70, 300, 5
        g = (torch.randn(R, N, generator=gen) * 2).to(dtype).to(dev)
        u = torch.randn(R, N, generator=gen).to(dtype).to(dev)
        rc, rs = batch_ids(R, C, 3, gen)
        keep = (torch.rand(3, N, generator=gen) > 0.3).to(dev)
        K, S, Q = zeros_stats(C, N, dev)
        for record, ablate in ((True, False), (False, True), (True, True)):
            act_and_record(g, u, culture=rc.to(dev) if record else None,
                           K=K if record else None, S=S if record else None,
                           Q=Q if record else None, keep=keep if ablate else None,
                           set_ids=rs.to(dev) if ablate else None)  # fmt: skip
        sync(dev)
        status = dispatch.status()
        ok = bool(status["checked"]) and not status["fallbacks"]
        report(ok, "kernel path", f"Triton kernel self-checked on {len(status['checked'])} "
               f"variants: {status['checked'][:1]}... fallbacks: {status['fallbacks'] or 'none'}")
    finally:
        if scoped:  # --quick: the later sections time the CPU's own path (PyTorch)
            if saved is None:
                os.environ.pop(dispatch.MODE_ENV, None)
            else:
                os.environ[dispatch.MODE_ENV] = saved
            dispatch.reset()


# --- 2. checks ---------------------------------------------------------------------------------


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
    K, S, Q = zeros_stats(C, N, dev)
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
    K, S, Q = zeros_stats(4, N, dev)
    act_and_record(gate.to(dev), up.to(dev), act_fn="gelu_tanh", activation="post",
                   culture=rc.to(dev), K=K, S=S, Q=Q)
    a = F.gelu(gate.to(dev), approximate="tanh") * up.to(dev)  # eager torch on the same device
    K_eager = torch.stack([(a[rc.to(dev) == c] > 0).sum(0) for c in range(4)])
    diff = int((K.long() - K_eager.long()).abs().sum())
    # The boundary rows differ only if the fast exp and tanhf round one ulp apart there.
    return report(True if diff == 0 else None, "gelu_tanh/post counts vs eager torch in the "
                  "fp32-saturating band", f"{diff} of {R * N} signs differ")


def check_masked_down(dev, dtype, R, N, H, seed=0, vs="reference"):
    from masked_down import masked_down_proj, masked_down_reference  # bench/

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
    env = MlpEnv(shape, mlps, R, dev, dtype)
    outs = {}
    for name in ("hooks", "fused_record"):
        env.zero_stats()
        run, cleanup = MLP_PROVIDERS[name](env)
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
        guarded(deadline, f"check:act_and_record {R}x{N}", check_act_and_record, dev, dtype, R,
                N, 25, act_fn, record, seed=R)  # fmt: skip
    guarded(deadline, "check:gelu_saturation", check_gelu_saturation, dev, 67 if quick else 4099)
    for R, N, H in [(1, 1, 1), (130, 67, 40)] + ([] if quick else [(257, 4099, 1031)]):
        guarded(deadline, f"check:masked_down {R}x{N}", check_masked_down, dev, dtype, R, N, H,
                seed=R)  # fmt: skip
    R, N = big
    guarded(deadline, "check:masked_down big", check_masked_down, dev, dtype, R, N,
            64 if quick else 3584, vs="reference" if quick else "fp32 cuBLAS")  # fmt: skip
    shape = TINY if quick else QWEN25_VL_7B
    guarded(deadline, "check:hooks_vs_fused", check_hooks_vs_fused, dev, dtype, shape,
            shape.tokens[0])  # fmt: skip


# --- 3. pytest -m gpu --------------------------------------------------------------------------


def run_gpu_tests(timeout_s: float) -> None:
    """The gpu-marked tests (interpreter off), bounded: a hang is a FAIL, not a lost run."""
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
           "tests/kernels", "tests/bench"]  # fmt: skip
    env = dict(os.environ, CULTURE_NEURONS_GPU_TESTS="1")
    env.pop("TRITON_INTERPRET", None)
    env.pop(dispatch.MODE_ENV, None)  # the tests choose their own paths
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=max(10.0, timeout_s))  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        RESULTS["tests"] = {"command": "pytest -m gpu", "rc": None, "summary": "timeout",
                            "tail": (exc.stdout or b"")[-2000:] if isinstance(exc.stdout, bytes)
                            else (exc.stdout or "")[-2000:]}  # fmt: skip
        report(False, "pytest -m gpu", f"timed out after {timeout_s:.0f} s")
        return
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    summary = lines[-1] if lines else "(no output)"
    RESULTS["tests"] = {"command": " ".join(cmd[2:]), "rc": proc.returncode, "summary": summary,
                        "tail": (proc.stdout + proc.stderr)[-4000:]}  # fmt: skip
    print(proc.stdout[-3000:], flush=True)
    if proc.returncode != 0:
        report(False, "pytest -m gpu", f"rc {proc.returncode}: {summary}")
    elif torch.cuda.is_available() and " passed" not in summary:
        report(False, "pytest -m gpu", f"nothing ran on the GPU: {summary}")
    else:  # on a CPU every gpu test skips: the step itself worked
        report(True if torch.cuda.is_available() else None, "pytest -m gpu", summary)


# --- timing ------------------------------------------------------------------------------------


class Provider:
    """``setup() -> run`` (untimed: attach, allocate), ``run()`` timed, ``cleanup()`` untimed."""

    def __init__(self, setup, cleanup=None):
        self.setup, self.cleanup = setup, cleanup or (lambda: None)


def interleaved(case: dict, providers: dict[str, Provider], dev, reps: int,
                deadline: float) -> list[dict]:  # fmt: skip
    """Time each provider ``reps`` times, interleaved (order rotating each repetition) after one
    warm-up round; one row per provider with median, spread and the paired ratio to plain."""
    times: dict[str, list[float]] = {name: [] for name in providers}
    errors: dict[str, str] = {}
    peak: dict[str, float] = {}
    names = list(providers)
    for rep in range(reps + 1):  # round 0 warms up (Triton compiles, cuBLAS picks kernels)
        if time.monotonic() > deadline and rep > 1:
            break
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            if name in errors:
                continue
            provider = providers[name]
            try:
                inject(f"provider:{name}")
                run = provider.setup()
                sync(dev)
                if dev.type == "cuda" and rep == 1:
                    torch.cuda.reset_peak_memory_stats(dev)
                    base = torch.cuda.memory_allocated(dev)
                t0 = time.perf_counter()
                run()
                sync(dev)
                dt = (time.perf_counter() - t0) * 1e3
                if dev.type == "cuda" and rep == 1:
                    peak[name] = (torch.cuda.max_memory_allocated(dev) - base) / 2**20
                provider.cleanup()
                if rep:
                    times[name].append(dt)
            except Exception as exc:
                traceback.print_exc()
                errors[name] = f"{type(exc).__name__}: {exc}"[:200]
                report(False, f"{case['case']} {name}", errors[name])
                try:
                    provider.cleanup()
                except Exception:
                    pass
    rows = []
    plain = times.get("plain", [])
    for name in names:
        row = dict(case, provider=name)
        ts = times[name]
        if name in errors:
            row["error"] = errors[name]
        elif not ts:
            row["error"] = "skipped: time budget spent"
        else:
            q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
            row.update(ms=statistics.median(ts), min_ms=min(ts), max_ms=max(ts), n=len(ts),
                       iqr_pct=100 * (q[2] - q[0]) / statistics.median(ts))  # fmt: skip
            if name in peak:
                row["peak_extra_mib"] = peak[name]
            if plain and name != "plain":
                ratios = [t / p for t, p in zip(ts, plain, strict=False)]
                row["ratio"] = statistics.median(ratios)
                row["ratio_range"] = [min(ratios), max(ratios)]
        rows.append(row)
        print(f"  timed {row}", flush=True)
    RESULTS["timings"] += rows
    write_json()
    return rows


# --- 4 and 5. model through the real backend ---------------------------------------------------


def build_model(shape: DecoderShape, dev, dtype):
    """A random-weight Qwen2ForCausalLM of ``shape`` built on the device in ``dtype``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                      num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                      num_key_value_heads=shape.kv_heads, vocab_size=shape.vocab,
                      hidden_act=shape.act_fn, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in bf16: no fp32 copy of 7B weights on the way
    try:
        with torch.device(dev):
            model = Qwen2ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    return model.to(dev, dtype).eval()


def model_masks(model, num_sets: int = 4, share: float = 0.005):
    """``num_sets`` random sets of ``share`` of all L x N neurons (0.5 %: the paper's ratio)."""
    from culture_neurons.masks import Masks
    from culture_neurons.models import adapters

    fp = adapters.fingerprint(model)
    total = fp.num_layers * fp.num_neurons
    gen = torch.Generator().manual_seed(1)
    sets = [torch.randperm(total, generator=gen)[: max(1, int(share * total))]
            for _ in range(num_sets)]  # fmt: skip
    return Masks.from_sets([f"s{i}" for i in range(num_sets)], sets, fp, method="gpu_check")


def model_providers(model, inputs: dict, cultures: list[str], masks, kinds) -> dict:
    """Providers through the package's real backends; each attaches before and detaches after
    its timed forward (attach is not timed; set_batch and every per-forward cost are)."""
    B = inputs["input_ids"].shape[0]
    culture = [i % len(cultures) for i in range(B)]
    set_ids = [i % (len(masks) + 1) - 1 for i in range(B)]  # -1 (none) and every set
    held = {}

    def plain():
        return lambda: model(**inputs)

    def recorder(backend):
        def setup():
            held["inst"] = cn.record(model, cultures, backend=backend)
            return lambda: held["inst"](culture, **inputs)

        return Provider(setup, lambda: held.pop("inst").detach() if "inst" in held else None)

    def ablator(backend):
        def setup():
            held["inst"] = cn.ablate(model, masks, backend=backend)
            return lambda: held["inst"](set_ids=set_ids, **inputs)

        return Provider(setup, lambda: held.pop("inst").detach() if "inst" in held else None)

    table = {"plain": Provider(plain), "hooks_record": recorder("hooks"),
             "fused_record": recorder("fused"), "hooks_ablate": ablator("hooks"),
             "fused_ablate": ablator("fused")}  # fmt: skip
    return {k: table[k] for k in kinds}


def op_providers(shape: DecoderShape, dev, dtype, R: int) -> dict:
    """The fused op alone, once per layer over ``shape.layers`` layers at R rows (ablation):
    what an eager decode step pays per MLP beside its GEMMs."""
    gen = torch.Generator().manual_seed(2)
    N, L = shape.intermediate, shape.layers
    g = torch.randn(R, N, generator=gen).to(dtype).to(dev)
    u = torch.randn(R, N, generator=gen).to(dtype).to(dev)
    keep = (torch.rand(L, 4, N, generator=gen) > 0.005).to(torch.uint8).to(dev)
    set_ids = (torch.arange(R) % 5 - 1).to(torch.int32).to(dev)
    ops = [LayerOp(N, dev, act_fn=shape.act_fn, keep=keep[layer]) for layer in range(L)]

    def op_plain():
        return lambda: [F.silu(g) * u for _ in range(L)]

    def op_layer():
        return lambda: [op(g, u, None, set_ids) for op in ops]

    def op_face():
        return lambda: [act_and_record(g, u, act_fn=shape.act_fn, keep=keep[layer],
                                       set_ids=set_ids) for layer in range(L)]  # fmt: skip

    return {"op_plain": Provider(op_plain), "op_layer": Provider(op_layer),
            "op_face": Provider(op_face)}  # fmt: skip


@torch.no_grad()
def run_model(dev, dtype, shape: DecoderShape, reps: int, deadline: float) -> None:
    model = guarded(deadline, "setup:model", build_model, shape, dev, dtype)
    if model is None:
        return
    masks = guarded(deadline, "setup:masks", model_masks, model)
    cultures = [f"c{i}" for i in range(shape.cultures)]
    B, T = shape.prefill
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, shape.vocab, (B, T), generator=gen).to(dev)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    kinds = ["plain", "hooks_record", "fused_record"]
    if masks is not None:
        kinds += ["hooks_ablate", "fused_ablate"]
    providers = guarded(deadline, "setup:model providers", model_providers, model, inputs,
                        cultures, masks, kinds)  # fmt: skip
    if providers:
        case = {"section": "model", "case": f"model {shape.layers}L prefill {B}x{T}",
                "layers": shape.layers, "tokens": B * T}  # fmt: skip
        interleaved(case, providers, dev, reps, deadline)
    SHARED["model"] = (model, masks)  # reused by the decode section, dropped after


@torch.no_grad()
def run_decode(dev, dtype, shape: DecoderShape, reps: int, deadline: float) -> None:
    model, masks = SHARED.pop("model", (None, None))
    R = shape.decode_rows
    if model is not None and masks is not None:
        gen = torch.Generator().manual_seed(4)
        ids = torch.randint(0, shape.vocab, (R, 1), generator=gen).to(dev)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}
        providers = guarded(deadline, "setup:decode providers", model_providers, model, inputs,
                            [f"c{i}" for i in range(shape.cultures)], masks,
                            ["plain", "hooks_ablate", "fused_ablate"])  # fmt: skip
        if providers:
            case = {"section": "decode", "case": f"model {shape.layers}L decode {R}x1",
                    "layers": shape.layers, "tokens": R}  # fmt: skip
            interleaved(case, providers, dev, reps, deadline)
    else:  # its failure is already a FAIL line of the model section
        report(None, "decode model", "skipped: no model or masks from the model section")
    del model, masks
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    providers = guarded(deadline, "setup:op providers", op_providers, shape, dev, dtype, R)
    if providers:
        case = {"section": "decode", "case": f"op x{shape.layers} layers, {R} rows",
                "layers": shape.layers, "tokens": R}  # fmt: skip
        interleaved(case, {"plain" if k == "op_plain" else k: v for k, v in providers.items()},
                    dev, reps, deadline)  # fmt: skip


# --- 6. MLP stack ------------------------------------------------------------------------------


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


class MlpEnv:
    """What every MLP provider gets: the MLPs, one batch and per-layer accumulators."""

    def __init__(self, shape, mlps, R: int, dev, dtype):
        gen = torch.Generator().manual_seed(R)
        self.shape, self.mlps = shape, mlps
        self.x = torch.randn(R, shape.hidden, generator=gen).to(dtype).to(dev)
        # Items of 50..400 tokens, as CVQA prompts with an image; 4 ablation sets.
        culture, set_ids = batch_ids(R, shape.cultures, 4, gen, item_len=(50, 400))
        self.culture, self.set_ids = culture.to(dev), set_ids.to(dev)
        self.keep = (torch.rand(4, shape.intermediate, generator=gen) > 0.005).to(dev)
        # [L, C, N]: K[l] is the contiguous [C, N] total the op adds into.
        self.K, self.S, self.Q = zeros_stats(shape.cultures, shape.intermediate, dev, len(mlps))

    def zero_stats(self):
        self.K.zero_()
        self.S.zero_()
        self.Q.zero_()


def _no_cleanup():
    return None


def mlp_plain(env: MlpEnv):
    """transformers' Qwen2MLP as is."""

    def run():
        for mlp in env.mlps:
            y = mlp(env.x)
        return y

    return run, _no_cleanup


def mlp_hooks(env: MlpEnv):
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
    run, _ = mlp_plain(env)
    return run, lambda: [h.remove() for h in handles]


def _fused_forward(env: MlpEnv, layer: int, mlp, record: bool, ablate: bool):
    g, u = mlp.gate_proj(env.x), mlp.up_proj(env.x)
    stats = dict(culture=env.culture, K=env.K[layer], S=env.S[layer],
                 Q=env.Q[layer]) if record else {}
    mask = dict(keep=env.keep, set_ids=env.set_ids) if ablate else {}
    h = act_and_record(g, u, act_fn=env.shape.act_fn, activation="gate", **stats, **mask)
    return mlp.down_proj(h)


def mlp_fused_record(env: MlpEnv):
    """gate/up linears + act_and_record (statistics) + down_proj."""

    def run():
        for layer, mlp in enumerate(env.mlps):
            y = _fused_forward(env, layer, mlp, record=True, ablate=False)
        return y

    return run, _no_cleanup


def mlp_fused_ablate(env: MlpEnv):
    """gate/up linears + act_and_record (mask only, no statistics) + cuBLAS down_proj."""

    def run():
        for layer, mlp in enumerate(env.mlps):
            y = _fused_forward(env, layer, mlp, record=False, ablate=True)
        return y

    return run, _no_cleanup


def mlp_masked_gemm(env: MlpEnv):
    """gate/up linears + act_and_record (plain act * u) + masked_down_proj (mask in the GEMM)."""
    from masked_down import masked_down_proj  # bench/

    def run():
        for mlp in env.mlps:
            g, u = mlp.gate_proj(env.x), mlp.up_proj(env.x)
            h = act_and_record(g, u, act_fn=env.shape.act_fn)
            y = masked_down_proj(h, mlp.down_proj.weight, env.keep, env.set_ids)
        return y

    return run, _no_cleanup


MLP_PROVIDERS = {
    "plain": mlp_plain,
    "hooks": mlp_hooks,
    "fused_record": mlp_fused_record,
    "fused_ablate": mlp_fused_ablate,
    "masked_gemm": mlp_masked_gemm,
}


def _mlp_provider(env: MlpEnv, make) -> Provider:
    held = {}

    def setup():
        run, held["cleanup"] = make(env)
        return run

    return Provider(setup, lambda: held.pop("cleanup", _no_cleanup)())


@torch.no_grad()
def run_mlp(dev, dtype, shape: DecoderShape, providers: list[str], reps: int,
            deadline: float) -> None:  # fmt: skip
    mlps = guarded(deadline, "setup:mlp stack", build_mlps, shape, shape.layers, dev, dtype)
    if mlps is None:
        return
    for layers in (1, shape.layers):
        for R in shape.tokens:
            env = guarded(deadline, f"setup:mlp env {layers}x{R}", MlpEnv, shape, mlps[:layers],
                          R, dev, dtype)  # fmt: skip
            if env is None:
                continue
            case = {"section": "mlp", "case": f"mlp {layers}L {R} tokens", "layers": layers,
                    "tokens": R}  # fmt: skip
            interleaved(case, {name: _mlp_provider(env, MLP_PROVIDERS[name])
                               for name in providers}, dev, reps, deadline)  # fmt: skip
            del env
    del mlps
    if dev.type == "cuda":
        torch.cuda.empty_cache()


# --- 7. tile sweep of the fused kernel (GPU only) ----------------------------------------------

SWEEP_TILES = [(32, 128, 4), (64, 128, 8), (16, 128, 2), (32, 64, 2), (16, 64, 1), (64, 64, 4),
               (32, 256, 8), (128, 128, 8)]  # fmt: skip


@torch.no_grad()
def run_sweep(dev, dtype, reps: int, deadline: float, R: int = 8192, N: int = 18944,
              C: int = 25) -> None:  # fmt: skip
    """The fused kernel alone at 7B shapes over candidate tiles, against eager ``silu(g) * u``.

    Traffic is read g, u + write h = 6 R N bytes in bf16 (931 MB at 8192 x 18944), so GB/s
    says how close each tile runs to the memory bound; the K/S/Q atomics are C_tile x N per
    row tile. Also: a one-culture batch with the kernel's search vs the host naming the culture.
    """
    from culture_neurons.kernels.act_record import act_and_record_triton, tile_for

    gen = torch.Generator().manual_seed(0)
    g = (torch.randn(R, N, generator=gen) * 2).to(dtype).to(dev)
    u = torch.randn(R, N, generator=gen).to(dtype).to(dev)
    rc, rs = batch_ids(R, C, 4, gen, item_len=(50, 400))
    rc, rs = rc.to(dev), rs.to(dev)
    one = torch.where(rc >= 0, 7, -1).to(torch.int32)
    keep = (torch.rand(4, N, generator=gen) > 0.005).to(dev)
    K, S, Q = zeros_stats(C, N, dev)
    args = (g, u, rc, K, S, Q, keep, rs, "silu", "gate")
    gbytes = 3 * R * N * g.element_size() / 1e9
    tile = tile_for(dev)
    providers = {
        "plain": Provider(lambda: lambda: F.silu(g) * u),
        "no record, no ablation": Provider(lambda: lambda: act_and_record_triton(*args, False,
                                                                                 False)),
        "ablation only": Provider(lambda: lambda: act_and_record_triton(*args, False, True)),
        "one culture, searched": Provider(lambda: lambda: act_and_record_triton(
            g, u, one, K, S, Q, keep, rs, "silu", "gate", True, False)),
        "one culture, host-known": Provider(lambda: lambda: act_and_record_triton(
            g, u, one, K, S, Q, keep, rs, "silu", "gate", True, False, one_culture=7)),
    }  # fmt: skip
    for br, bn, w in SWEEP_TILES:
        providers[f"record {br}x{bn}x{w}"] = Provider(
            lambda b=(br, bn, w): lambda: act_and_record_triton(
                *args, True, False, block_r=b[0], block_n=b[1], num_warps=b[2]))
    case = {"section": "sweep", "case": f"kernel {R}x{N} C={C}, production tile "
            f"{tile.block_r}x{tile.block_n}x{tile.num_warps}", "layers": 1, "tokens": R}
    rows = interleaved(case, providers, dev, reps, deadline)
    for row in rows:
        if "ms" in row:
            row["GBps"] = gbytes / (row["ms"] / 1e3)
    RESULTS["sweep"] = rows
    best = min((r for r in rows if r["provider"].startswith("record ") and "ms" in r),
               key=lambda r: r["ms"], default=None)
    if best:
        print(f"# fastest recording tile on this card: {best['provider'][7:]} "
              f"({best['ms']:.3f} ms, {best['GBps']:.0f} GB/s); production tile "
              f"{tile.block_r}x{tile.block_n}x{tile.num_warps}", flush=True)


# --- main --------------------------------------------------------------------------------------


def header(dev) -> dict:
    info = {"torch": torch.__version__, "device": str(dev),
            "kernel_mode": os.environ.get(dispatch.MODE_ENV, "auto"),
            "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0")}  # fmt: skip
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as exc:
        info["triton"] = f"absent ({type(exc).__name__}: {exc})"
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except Exception as exc:
        info["transformers"] = f"absent ({exc})"
    if dev.type == "cuda":
        info["name"] = torch.cuda.get_device_name(dev)
        major, minor = torch.cuda.get_device_capability(dev)
        info["capability"] = f"sm_{major}{minor}"
        try:
            from culture_neurons.kernels.act_record import tile_for

            t = tile_for(dev)
            info["tile"] = f"{t.block_r}x{t.block_n}x{t.num_warps}"
        except Exception as exc:
            info["tile"] = f"unavailable ({type(exc).__name__}: {exc})"
    else:
        info["name"] = f"CPU ({os.cpu_count()} cores)"
    return info


def print_table(rows: list[dict]) -> None:
    print()
    print(f"{'case':<32} {'provider':<24} {'median ms':>10} {'x plain':>8} {'ratio range':>13} "
          f"{'IQR %':>6} {'n':>3} {'peak MiB':>9}")
    for r in rows:
        head = f"{r['case'][:32]:<32} {r['provider'][:24]:<24}"
        if "ms" not in r:
            print(f"{head} {r.get('error', '?')[:60]}")
            continue
        ratio = f"{r['ratio']:8.3f}" if "ratio" in r else f"{'-':>8}"
        spread = (f"{r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f}" if "ratio_range" in r
                  else "-")  # fmt: skip
        peak = f"{r['peak_extra_mib']:9.0f}" if "peak_extra_mib" in r else f"{'-':>9}"
        print(f"{head} {r['ms']:10.3f} {ratio} {spread:>13} {r['iqr_pct']:6.1f} {r['n']:>3} "
              f"{peak}")


def main(argv=None) -> int:
    global JSON_PATH
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes on the CPU (kernel path via the interpreter)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="stop starting new work after this many seconds (default 420)")
    parser.add_argument("--skip", default="", help="comma list of sections to skip: " +
                        "kernel_path,checks,tests,model,decode,mlp,sweep")
    parser.add_argument("--providers", default=",".join(MLP_PROVIDERS),
                        help=f"MLP-stack providers, comma list of {', '.join(MLP_PROVIDERS)}")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per case")
    parser.add_argument("--json", type=Path, help="write here instead of $OUT/gpu_check.json")
    parser.add_argument("--inject-fail", default="",
                        help="comma list of step names that raise on purpose (tests the guards),"
                             " e.g. setup:model,provider:fused_record,kill:checks")
    args = parser.parse_args(argv)
    out = os.environ.get("OUT")
    JSON_PATH = args.json or (Path(out) / "gpu_check.json" if out else JSON_PATH)
    INJECT.update(n for n in args.inject_fail.split(",") if n)
    skip = {s for s in args.skip.split(",") if s}
    providers = [p for p in args.providers.split(",") if p]
    unknown = set(providers) - set(MLP_PROVIDERS)
    if unknown:
        parser.error(f"unknown providers {sorted(unknown)}; choose from {list(MLP_PROVIDERS)}")

    t0 = time.monotonic()
    budget_end = t0 + args.budget_s
    if args.quick:
        dev = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("FAIL no CUDA device: run with --quick on a CPU")
        return 2
    else:
        dev = torch.device("cuda")
        # Forced: a missing, broken or wrong Triton kernel raises in every step that would
        # otherwise time the PyTorch path as "fused".
        os.environ[dispatch.MODE_ENV] = "triton"
    dtype = torch.bfloat16
    shape = TINY if args.quick else QWEN25_VL_7B
    reps = args.reps or (3 if args.quick else 10)
    RESULTS["header"] = header(dev)
    RESULTS["config"] = {"quick": args.quick, "budget_s": args.budget_s, "reps": reps,
                         "shape": shape.name, "json": str(JSON_PATH),
                         "inject_fail": sorted(INJECT)}  # fmt: skip
    print("# gpu_check | " + " | ".join(f"{k} {v}" for k, v in RESULTS["header"].items()),
          flush=True)
    write_json()

    def until(share: float) -> float:  # a section's deadline: a share of the budget from now
        return min(budget_end, time.monotonic() + share * args.budget_s)

    plan = [
        ("kernel_path", lambda: kernel_path(dev, dtype)),
        ("checks", lambda: run_checks(dev, dtype, args.quick, until(0.20))),
        ("tests", lambda: run_gpu_tests(min(150.0, max(10.0, budget_end - time.monotonic())))),
        ("model", lambda: run_model(dev, dtype, shape, reps, until(0.15))),
        ("decode", lambda: run_decode(dev, dtype, shape, 3 * reps, until(0.08))),
        ("mlp", lambda: run_mlp(dev, dtype, shape, providers, reps, until(0.15))),
    ]
    if dev.type == "cuda":
        plan.append(("sweep", lambda: run_sweep(dev, dtype, reps, until(0.12))))
    for name, run in plan:
        if name in skip:
            RESULTS["sections"][name] = {"state": "skipped (--skip)"}
            continue
        if time.monotonic() > budget_end:
            RESULTS["sections"][name] = {"state": "skipped: time budget spent"}
            report(None, f"section {name}", "skipped: time budget spent")
            continue
        section(name, run)
    SHARED.clear()

    status = dispatch.status()
    if dev.type == "cuda" and status["fallbacks"]:
        report(False, "kernel fallbacks", f"{status['fallbacks']}")
    failed = [c for c in RESULTS["checks"] if c["status"] == "FAIL"]
    RESULTS["summary"] = {"fail": len(failed), "checks": len(RESULTS["checks"]),
                          "seconds": round(time.monotonic() - t0, 1)}  # fmt: skip
    write_json()
    print(f"\n# {len(failed)} FAIL of {len(RESULTS['checks'])} checks; "
          f"{time.monotonic() - t0:.0f} s; JSON {JSON_PATH}")
    for c in failed:
        print(f"#   FAIL {c['name']}: {c['details'][:120]}")
    print_table(RESULTS["timings"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
