"""The correctness checks of bench/gpu_check.py's "checks" section, at odd and 7B shapes.

Each returns a verdict ``(ok, name, details)``: ok True (PASS), False (FAIL) or None (WARN).
Comparisons go through ``culture_neurons.kernels.check`` (``first_mismatch``, ``EPS``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from culture_neurons.kernels.check import EPS, first_mismatch
from providers import MLP_PROVIDERS, MlpEnv, batch_ids, build_mlps, sync, zeros_stats
from shapes import DecoderShape

from culture_neurons.kernels import act_and_record, dispatch
from culture_neurons.kernels import reference as ref


def kernel_path(dev, dtype) -> tuple:
    """The kernel runs (forced) and passes its self-check on this device, for the variants the
    later sections use (section 1). On --quick: the interpreter on CPU tensors, forced for this
    step only."""
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
        return (ok, "kernel path", f"Triton kernel self-checked on {len(status['checked'])} "
               f"variants: {status['checked'][:1]}... fallbacks: {status['fallbacks'] or 'none'}")
    finally:
        if scoped:  # --quick: the later sections time the CPU's own path (PyTorch)
            if saved is None:
                os.environ.pop(dispatch.MODE_ENV, None)
            else:
                os.environ[dispatch.MODE_ENV] = saved
            dispatch.reset()


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
    return (not bad, f"act_and_record {R}x{N} C={C} {act_fn}/{record} {dtype}", details)


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
    return (True if diff == 0 else None, "gelu_tanh/post counts vs eager torch in the "
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
    return (err is None, f"masked_down_proj {R}x{N}->{H} {dtype} vs {vs}", err or "ok")


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
    return (not bad, f"hooks vs fused_record on Qwen2MLP, {R} tokens, {dtype}",
                  "K exact, S and y close" if not bad else "; ".join(
                      f"{k}: {v}" for k, v in bad.items()))


def gpu_tests(repo: Path, timeout_s: float) -> tuple[dict, tuple]:
    """The gpu-marked tests (interpreter off), bounded: a hang is a FAIL, not a lost run.
    Returns what ran (the JSON's "tests") and the verdict."""
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
           "tests/kernels", "tests/bench"]  # fmt: skip
    env = dict(os.environ, CULTURE_NEURONS_GPU_TESTS="1")
    env.pop("TRITON_INTERPRET", None)
    env.pop(dispatch.MODE_ENV, None)  # the tests choose their own paths
    try:
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True,
                              timeout=max(10.0, timeout_s))  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        ran = {"command": "pytest -m gpu", "rc": None, "summary": "timeout",
                            "tail": (exc.stdout or b"")[-2000:] if isinstance(exc.stdout, bytes)
                            else (exc.stdout or "")[-2000:]}  # fmt: skip
        return ran, (False, "pytest -m gpu", f"timed out after {timeout_s:.0f} s")
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    summary = lines[-1] if lines else "(no output)"
    ran = {"command": " ".join(cmd[2:]), "rc": proc.returncode, "summary": summary,
                        "tail": (proc.stdout + proc.stderr)[-4000:]}  # fmt: skip
    print(proc.stdout[-3000:], flush=True)
    if proc.returncode != 0:
        return ran, (False, "pytest -m gpu", f"rc {proc.returncode}: {summary}")
    elif torch.cuda.is_available() and " passed" not in summary:
        return ran, (False, "pytest -m gpu", f"nothing ran on the GPU: {summary}")
    else:  # on a CPU every gpu test skips: the step itself worked
        return ran, (True if torch.cuda.is_available() else None, "pytest -m gpu", summary)
