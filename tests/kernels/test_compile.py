"""The Triton kernels compile to PTX and cubin for Ampere (sm_80) and Hopper (sm_90) without a GPU.

``triton.compile`` needs real ``JITFunction``s, but tests/conftest.py turns the interpreter on
(which swaps them for interpreted ones) before anything imports triton. So the compiles run once
in a subprocess with the interpreter off, this file being its script; each variant reports
ok or its error. Arguments are typed as the launchers pass them on a GPU (pointers and strides
divisible by 16, unit column strides specialised to 1).
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
# ~25 s with a cold Triton cache on 2 cores (~8 s warm): deselect with -m "not slow".
pytestmark = pytest.mark.slow

TARGETS = [(80, 32), (90, 32)]
PTR = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}

# (act_fn, activation, do_record, do_ablate, steer, dtype): every switch both ways, every dtype.
ACT_RECORD_VARIANTS = [
    ("silu", "gate", True, True, False, "bf16"),
    ("gelu_tanh", "post", True, True, False, "bf16"),
    ("gelu_tanh", "post", True, False, False, "fp16"),
    ("silu", "post", False, True, True, "fp32"),
]
# (dtype, do_ablate)
MASKED_DOWN_VARIANTS = [("bf16", True), ("fp16", False), ("fp32", True)]


def _compile_act_record(act_fn, record, do_record, do_ablate, steer, dtype, arch, warp):
    import triton
    from culture_neurons.kernels import act_record as m
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    p = PTR[dtype]
    stats = ("*i64", "*fp64", "*fp64") if do_record else (p, p, p)  # launcher passes gate
    sig = {
        "gate_ptr": p, "up_ptr": p, "culture_ptr": "*i32" if do_record else p,
        "keep_ptr": "*u8" if do_ablate else p, "set_ids_ptr": "*i32" if do_ablate else p,
        "h_ptr": p, "K_ptr": stats[0], "S_ptr": stats[1], "Q_ptr": stats[2],
        "R": "i32", "N": "i32", "C": "i32", "num_sets": "i32", "factor": "fp32",
        "stride_gate_r": "i32", "stride_up_r": "i32", "stride_h_r": "i32",
        "stride_keep_s": "i32", "stride_keep_n": "constexpr",
        "ACT_FN": "constexpr", "RECORD_POST": "constexpr", "DO_RECORD": "constexpr",
        "DO_ABLATE": "constexpr", "STEER": "constexpr", "BLOCK_R": "constexpr",
        "BLOCK_N": "constexpr",
    }  # fmt: skip
    constexprs = {
        "stride_keep_n": 1, "ACT_FN": m.ACT_IDS[act_fn], "RECORD_POST": record == "post",
        "DO_RECORD": do_record, "DO_ABLATE": do_ablate, "STEER": steer, "BLOCK_R": m.BLOCK_R_GPU,
        "BLOCK_N": m.BLOCK_N_GPU,
    }  # fmt: skip
    # As the JIT specialises at 7B shapes: N = 18944 and R = 2048/8192 are multiples of 16 too.
    aligned = [k for k, v in sig.items() if v.startswith("*") or k.startswith("stride")
               or k in ("R", "N")]
    fn = m._act_record_kernel
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in aligned
             if sig[k] != "constexpr"}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, warp),
                          options={"num_warps": m.NUM_WARPS_GPU})


def _compile_masked_down(dtype, do_ablate, arch, warp):
    import triton
    m = _bench_module("masked_down")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    p = PTR[dtype]
    sig = {
        "h_ptr": p, "w_ptr": p, "keep_ptr": "*u8", "set_ids_ptr": "*i32", "out_ptr": p,
        "R": "i32", "H": "i32", "N": "i32", "num_sets": "i32",
        "stride_h_r": "i32", "stride_h_n": "constexpr", "stride_w_h": "i32",
        "stride_w_n": "constexpr", "stride_keep_s": "i32", "stride_keep_n": "constexpr",
        "stride_out_r": "i32", "stride_out_h": "constexpr",
        "DO_ABLATE": "constexpr", "DOT_FP32": "constexpr", "BLOCK_M": "constexpr",
        "BLOCK_H": "constexpr", "BLOCK_K": "constexpr", "GROUP_M": "constexpr",
    }  # fmt: skip
    constexprs = {
        "stride_h_n": 1, "stride_w_n": 1, "stride_keep_n": 1, "stride_out_h": 1,
        "DO_ABLATE": do_ablate, "DOT_FP32": dtype == "fp32", "BLOCK_M": m.BLOCK_M_GPU,
        "BLOCK_H": m.BLOCK_H_GPU, "BLOCK_K": m.BLOCK_K_GPU, "GROUP_M": m.GROUP_M,
    }  # fmt: skip
    fn = m._masked_down_kernel
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k, v in sig.items()
             if v.startswith("*") or (k.startswith("stride") and v != "constexpr")
             or k in ("R", "H", "N")}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, warp),
                          options={"num_warps": m.NUM_WARPS_GPU, "num_stages": m.NUM_STAGES_GPU})


def _bench_module(name: str):
    """A kernel kept in bench/ (measured there, not part of the package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _variant_ids():
    """Every variant for Hopper; on Ampere only the fullest of each kernel (cold compiles cost
    ~2 s each on 2 shared cores, and codegen differences sit in the dot/layout, not the switches)."""
    ids = []
    for arch, warp in TARGETS:
        act_variants = ACT_RECORD_VARIANTS if arch == 90 else ACT_RECORD_VARIANTS[1:2]
        down_variants = MASKED_DOWN_VARIANTS if arch == 90 else MASKED_DOWN_VARIANTS[:1]
        ids += [("act_record", v, arch, warp) for v in act_variants]
        ids += [("masked_down", v, arch, warp) for v in down_variants]
    return ids


def compile_all() -> dict:
    """Compile every variant for every target; ``{key: "ok" | error text}``."""
    results = {}
    for kernel, variant, arch, warp in _variant_ids():
        key = f"{kernel}-{'-'.join(map(str, variant))}-sm{arch}"
        try:
            build = _compile_act_record if kernel == "act_record" else _compile_masked_down
            compiled = build(*variant, arch, warp)
            results[key] = "ok" if "cubin" in compiled.asm and compiled.asm["ptx"] else "no cubin"
        except Exception as exc:  # reported per variant by the test below
            results[key] = f"{type(exc).__name__}: {exc}"[-2000:]
    return results


@pytest.fixture(scope="module")
def compile_results():
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "key",
    [f"{k}-{'-'.join(map(str, v))}-sm{a}" for k, v, a, _ in _variant_ids()],
)
def test_compiles_for_gpu(key, compile_results):
    assert compile_results[key] == "ok", compile_results[key]


if __name__ == "__main__":
    print(json.dumps(compile_all()))
