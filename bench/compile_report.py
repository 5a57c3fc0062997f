"""Registers, spills, barriers and occupancy of the Triton kernels, compiled ahead of time.

No GPU needed: ``triton.compile`` builds PTX and cubin for a ``GPUTarget`` (sm_80 Ampere,
sm_90 Hopper) and ptxas reports what it allocated; its log is read from the compile itself
(``knobs.nvidia.dump_ptxas_log`` with a fresh compile), so the numbers are those of the cubin a
GPU would load. Occupancy (CTAs per SM) is computed from registers, warps and shared memory
with the architecture's limits (CUDA occupancy rules: registers allocated per warp in units of
256, at most 64 warps and 32 CTAs per SM).

    python bench/compile_report.py [--tiles 32x128x4,64x128x8] [--json PATH]

Run it under each triton version that matters (the device image has 3.6, torch 2.13's CUDA
build pins 3.7.1); tests/kernels/test_compile.py uses it to fail on spills in the production
tiles. Compiling needs the interpreter off: set ``TRITON_INTERPRET=0`` (this script does).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # before triton is imported: real JIT functions
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # masked_down.py

PTR = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}
# Per-SM limits: registers, warps, CTAs, shared memory usable by CTAs (bytes), reserved per CTA.
SM_LIMITS = {80: (65536, 64, 32, 164 * 1024, 1024), 90: (65536, 64, 32, 228 * 1024, 1024)}
# (act_fn, activation, do_record, do_ablate, steer, dtype): every switch both ways, every dtype.
ACT_RECORD_VARIANTS = [
    ("silu", "gate", True, True, False, "bf16"),
    ("gelu_tanh", "post", True, True, False, "bf16"),
    ("gelu_tanh", "post", True, False, False, "fp16"),
    ("silu", "post", False, True, True, "fp32"),
]
# masked_down (bench/, measured only): (dtype, do_ablate)
MASKED_DOWN_VARIANTS = [("bf16", True), ("fp16", False), ("fp32", True)]


def occupancy(arch: int, regs: int, num_warps: int, shared: int) -> int:
    """CTAs per SM that registers, warps and shared memory allow."""
    sm_regs, sm_warps, sm_ctas, sm_shared, reserved = SM_LIMITS[arch]
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = (sm_regs // regs_per_warp) // num_warps
    by_warps = sm_warps // num_warps
    by_shared = sm_shared // (shared + reserved)
    return max(0, min(sm_ctas, by_regs, by_warps, by_shared))


def parse_ptxas(log: str) -> dict:
    """Registers and spill bytes from a ``ptxas -v`` log (one kernel)."""
    regs = re.search(r"Used (\d+) registers", log)
    stores = re.search(r"(\d+) bytes spill stores", log)
    loads = re.search(r"(\d+) bytes spill loads", log)
    if not (regs and stores and loads):
        raise RuntimeError(f"unexpected ptxas log:\n{log}")
    return {"regs": int(regs.group(1)),
            "spill_bytes": int(stores.group(1)) + int(loads.group(1))}  # fmt: skip


def compile_act_record(variant, arch: int, tile) -> dict:
    """Compile the act_record kernel for ``sm_<arch>`` with ``tile``; its ptxas numbers."""
    from triton.compiler import ASTSource

    from culture_neurons.kernels import act_record as m

    act_fn, record, do_record, do_ablate, steer, dtype = variant
    p = PTR[dtype]
    stats = ("*i64", "*fp64", "*fp64") if do_record else (p, p, p)  # launcher passes gate
    sig = {
        "gate_ptr": p, "up_ptr": p, "culture_ptr": "*i32" if do_record else p,
        "keep_ptr": "*u8" if do_ablate else p, "set_ids_ptr": "*i32" if do_ablate else p,
        "h_ptr": p, "K_ptr": stats[0], "S_ptr": stats[1], "Q_ptr": stats[2],
        "R": "i32", "N": "i32", "C": "i32", "num_sets": "i32", "one_culture": "i32",
        "factor": "fp32", "stride_gate_r": "i32", "stride_up_r": "i32", "stride_h_r": "i32",
        "stride_keep_s": "i32", "stride_keep_n": "constexpr",
        "ACT_FN": "constexpr", "RECORD_POST": "constexpr", "DO_RECORD": "constexpr",
        "DO_ABLATE": "constexpr", "STEER": "constexpr", "BLOCK_R": "constexpr",
        "BLOCK_N": "constexpr",
    }  # fmt: skip
    constexprs = {
        "stride_keep_n": 1, "ACT_FN": m.ACT_IDS[act_fn], "RECORD_POST": record == "post",
        "DO_RECORD": do_record, "DO_ABLATE": do_ablate, "STEER": steer,
        "BLOCK_R": tile.block_r, "BLOCK_N": tile.block_n,
    }  # fmt: skip
    # As the JIT specialises at 7B shapes: N = 18944 and R = 2048/8192 are multiples of 16 too.
    aligned = [k for k, v in sig.items() if v.startswith("*") or k.startswith("stride")
               or k in ("R", "N")]
    fn = m._act_record_kernel
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in aligned
             if sig[k] != "constexpr"}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    return _compile(src, arch, {"num_warps": tile.num_warps})


def compile_masked_down(variant, arch: int) -> dict:
    """Compile bench/masked_down.py's GEMM for ``sm_<arch>`` at its own tile."""
    import masked_down as m  # bench/, beside this file
    from triton.compiler import ASTSource

    dtype, do_ablate = variant
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
    return _compile(src, arch, {"num_warps": m.NUM_WARPS_GPU, "num_stages": m.NUM_STAGES_GPU})


def _compile(src, arch: int, options: dict) -> dict:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    log = io.StringIO()
    # A fresh compile (not the cache) so that ptxas runs and prints its log.
    with knobs.compilation.scope(), knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        knobs.compilation.always_compile = True
        knobs.nvidia.dump_ptxas_log = True
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    if "cubin" not in compiled.asm or not compiled.asm["ptx"]:
        raise RuntimeError("no cubin")
    numbers = parse_ptxas(log.getvalue())
    shared = int(compiled.metadata.shared)
    numbers.update(
        shared=shared,
        barriers=compiled.asm["ptx"].count("bar.sync") + compiled.asm["ptx"].count("barrier.sync"),
        atomics=compiled.asm["ptx"].count("atom."),
        ctas_per_sm=occupancy(arch, numbers["regs"], options["num_warps"], shared),
    )
    numbers["occupancy"] = numbers["ctas_per_sm"] * options["num_warps"] / SM_LIMITS[arch][1]
    return numbers


def _row(kernel: str, arch: int, tile: str, variant, build) -> dict:
    """One report row: ptxas numbers and occupancy, or the error (one bad config leaves the
    rest)."""
    import triton

    row = {"kernel": kernel, "triton": triton.__version__, "arch": f"sm_{arch}", "tile": tile,
           "variant": "-".join(map(str, variant))}  # fmt: skip
    try:
        row.update(build())
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"[-2000:]
    return row


def report(tiles, archs=(80, 90), variants=ACT_RECORD_VARIANTS) -> list[dict]:
    """act_record at each (arch, tile, variant)."""
    return [_row("act_record", arch, f"{t.block_r}x{t.block_n}x{t.num_warps}", v,
                 lambda v=v, arch=arch, t=t: compile_act_record(v, arch, t))
            for arch in archs for t in tiles for v in variants]  # fmt: skip


def production_report(archs=(80, 90)) -> list[dict]:
    """What a GPU of each architecture would load: act_record at its production tile in every
    variant, and bench/masked_down.py's GEMM (every variant on sm_90, the fullest on sm_80:
    its codegen differences sit in the dot, not in the switches)."""
    import masked_down as m

    rows = []
    for arch, tile in production_tiles().items():
        if arch in archs:
            rows += report([tile], archs=(arch,))
    for arch in archs:
        variants = MASKED_DOWN_VARIANTS if arch == 90 else MASKED_DOWN_VARIANTS[:1]
        tile = f"{m.BLOCK_M_GPU}x{m.BLOCK_H_GPU}x{m.BLOCK_K_GPU}x{m.NUM_WARPS_GPU}"
        rows += [_row("masked_down", arch, tile, v, lambda v=v, arch=arch:
                      compile_masked_down(v, arch)) for v in variants]  # fmt: skip
    return rows


def production_tiles():
    """The tiles the launcher picks on sm_80 and sm_90: ``{arch: Tile}``."""
    from culture_neurons.kernels import act_record as m

    return {arch: m.TILES.get((arch // 10, arch % 10), m.DEFAULT_TILE) for arch in (80, 90)}


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'kernel':<11} {'triton':<7} {'arch':<6} {'tile':<13} {'variant':<36} {'regs':>4} "
             f"{'spill B':>7} {'smem':>6} {'bar':>4} {'CTA/SM':>6} {'occ':>5}"]
    for r in rows:
        head = (f"{r['kernel']:<11} {r['triton']:<7} {r['arch']:<6} {r['tile']:<13} "
                f"{r['variant']:<36}")
        if "error" in r:
            lines.append(f"{head} ERROR {r['error'].splitlines()[0][:80]}")
        else:
            lines.append(f"{head} {r['regs']:>4} {r['spill_bytes']:>7} {r['shared']:>6} "
                         f"{r['barriers']:>4} {r['ctas_per_sm']:>6} {r['occupancy']:>5.0%}")
    return "\n".join(lines)


def main(argv=None) -> int:
    from culture_neurons.kernels.act_record import Tile

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", default="production",
                    help="'production' (the launcher's tiles per arch, and masked_down) or "
                         "act_record tiles to compare, e.g. 32x128x4,64x128x8")
    ap.add_argument("--variants", default="all", help="'all' or 'first' (with --tiles)")
    ap.add_argument("--json", type=Path, help="write the rows here")
    args = ap.parse_args(argv)
    variants = ACT_RECORD_VARIANTS if args.variants == "all" else ACT_RECORD_VARIANTS[:1]
    if args.tiles == "production":
        rows = production_report()
    else:
        tiles = [Tile(*map(int, t.split("x"))) for t in args.tiles.split(",")]
        rows = report(tiles, variants=variants)
    print(format_rows(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
