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
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
# Run from the repository root, culture_neurons imports from this checkout (kernels/ included,
# see culture_neurons/kernels/__init__.py) or from an install.
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from environment import header  # noqa: E402
from gpu_checks import (  # noqa: E402
    check_act_and_record,
    check_gelu_saturation,
    check_hooks_vs_fused,
    check_masked_down,
    gpu_tests,
    kernel_path,
)
from providers import (  # noqa: E402
    MLP_PROVIDERS,
    MlpEnv,
    Provider,
    build_mlps,
    build_model,
    mlp_provider,
    model_masks,
    model_providers,
    op_providers,
    sweep_providers,
    sync,
)
from shapes import QWEN25_VL_7B, TINY, DecoderShape  # noqa: E402

from culture_neurons.kernels import dispatch  # noqa: E402

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


def verdict(check):
    """``check`` (returning ``(ok, name, details)``, see gpu_checks.py), its verdict reported."""
    return lambda *args, **kwargs: report(*check(*args, **kwargs))


# --- 1. kernel path ----------------------------------------------------------------------------


# --- 2. checks ---------------------------------------------------------------------------------


@torch.no_grad()
def run_checks(dev, dtype, quick: bool, deadline: float) -> None:
    big = (256, 160) if quick else (2048, 18944)
    cases = [((1, 1), "silu", "gate"), ((7, 33), "gelu_tanh", "post"),
             ((130, 67), "silu", "post"), ((1000, 4099), "gelu_tanh", "gate"),
             (big, "silu", "gate"), (big, "silu", "post")]
    if quick:
        cases = [c for c in cases if c[0] != (1000, 4099)]
    for (R, N), act_fn, record in cases:
        guarded(deadline, f"check:act_and_record {R}x{N}", verdict(check_act_and_record), dev,
                dtype, R, N, 25, act_fn, record, seed=R)  # fmt: skip
    guarded(deadline, "check:gelu_saturation", verdict(check_gelu_saturation), dev,
            67 if quick else 4099)  # fmt: skip
    for R, N, H in [(1, 1, 1), (130, 67, 40)] + ([] if quick else [(257, 4099, 1031)]):
        guarded(deadline, f"check:masked_down {R}x{N}", verdict(check_masked_down), dev, dtype,
                R, N, H, seed=R)  # fmt: skip
    R, N = big
    guarded(deadline, "check:masked_down big", verdict(check_masked_down), dev, dtype, R, N,
            64 if quick else 3584, vs="reference" if quick else "fp32 cuBLAS")  # fmt: skip
    shape = TINY if quick else QWEN25_VL_7B
    guarded(deadline, "check:hooks_vs_fused", verdict(check_hooks_vs_fused), dev, dtype, shape,
            shape.tokens[0])  # fmt: skip


# --- 3. pytest -m gpu --------------------------------------------------------------------------


def run_gpu_tests(timeout_s: float) -> None:
    """Section 3: the gpu-marked tests (see gpu_checks.gpu_tests), recorded and reported."""
    RESULTS["tests"], result = gpu_tests(REPO, timeout_s)
    report(*result)


# --- timing ------------------------------------------------------------------------------------


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
            interleaved(case, {name: mlp_provider(env, MLP_PROVIDERS[name])
                               for name in providers}, dev, reps, deadline)  # fmt: skip
            del env
    del mlps
    if dev.type == "cuda":
        torch.cuda.empty_cache()


# --- 7. tile sweep of the fused kernel (GPU only) ----------------------------------------------

@torch.no_grad()
def run_sweep(dev, dtype, reps: int, deadline: float, R: int = 8192, N: int = 18944,
              C: int = 25) -> None:  # fmt: skip
    """The fused kernel alone at 7B shapes over candidate tiles, against eager ``silu(g) * u``.

    Traffic is read g, u + write h = 6 R N bytes in bf16 (931 MB at 8192 x 18944), so GB/s
    says how close each tile runs to the memory bound; the K/S/Q atomics are C_tile x N per
    row tile. Also: a one-culture batch with the kernel's search vs the host naming the culture.
    """
    from culture_neurons.kernels.act_record import tile_for

    providers = sweep_providers(dev, dtype, R, N, C)
    gbytes = 3 * R * N * torch.empty(0, dtype=dtype).element_size() / 1e9
    tile = tile_for(dev)
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
        ("kernel_path", lambda: verdict(kernel_path)(dev, dtype)),
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

