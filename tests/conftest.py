"""Shared test setup.

Triton runs in its CPU interpreter unless ``CULTURE_NEURONS_GPU_TESTS=1``: the variable must be
set before anything imports triton, hence here, at the top of the first conftest.
Tests marked ``@pytest.mark.gpu`` launch real CUDA kernels; they are skipped, with the reason
shown (``-ra``), where CUDA is absent or the interpreter is on.
"""

import os

GPU_TESTS = os.environ.get("CULTURE_NEURONS_GPU_TESTS", "0") == "1"
if not GPU_TESTS:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from culture_neurons.kernels.check import H_RTOL, first_mismatch  # noqa: E402


def kernel_device() -> str:
    """Where the Triton kernel tests run: "cpu" under the interpreter, "cuda" otherwise (then
    the whole interpreter matrix of test_act_record / test_masked_down runs on the GPU too)."""
    return "cpu" if os.environ.get("TRITON_INTERPRET", "0") == "1" else "cuda"


def gpu_skip_reason() -> str | None:
    """Why GPU tests cannot run here, or None when they can."""
    if not torch.cuda.is_available():
        return "needs CUDA (no GPU on this machine)"
    if not GPU_TESTS:
        return "needs CULTURE_NEURONS_GPU_TESTS=1 (Triton runs in the CPU interpreter otherwise)"
    return None


def pytest_collection_modifyitems(config, items):
    reason = gpu_skip_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture
def device():
    """The device the Triton kernel tests put their tensors on (see kernel_device)."""
    if kernel_device() == "cuda" and not torch.cuda.is_available():
        pytest.skip("CULTURE_NEURONS_GPU_TESTS=1 turns the interpreter off, but there is no CUDA")
    return kernel_device()


@pytest.fixture
def assert_close_stats():
    """``check(name, got, want, atol=0, rtol=0)``: exact by default (counts), verbose on failure."""

    def check(name, got, want, atol=0.0, rtol=0.0):
        msg = first_mismatch(got, want, atol, rtol)
        assert msg is None, f"{name}: {msg}"

    return check


def make_mlp_case(R: int, N: int, C: int = 5, num_sets: int = 3, dtype=torch.float32,
                  seed: int = 0) -> dict:
    """Random ``gate, up [R, N]`` (never zeros) and per-row ids shaped like real batches.

    ``culture`` comes in runs (items) of 1..9 rows with random ids in [-1, C), so 16-row
    tiles hold several cultures, skipped rows, and gaps between ids (e.g. 0 and 3 without 1, 2).
    ``set_ids`` is random in [-1, num_sets) per row; ``keep`` drops ~30% of neurons per set.
    """
    gen = torch.Generator().manual_seed(seed)
    gate = (torch.randn(R, N, generator=gen) * 2).to(dtype)
    up = torch.randn(R, N, generator=gen).to(dtype)
    ids = []
    while len(ids) < R:
        run = int(torch.randint(1, 10, (1,), generator=gen))
        ids += [int(torch.randint(-1, C, (1,), generator=gen))] * run
    culture = torch.tensor(ids[:R], dtype=torch.int32)
    set_ids = torch.randint(-1, num_sets, (R,), generator=gen, dtype=torch.int32)
    keep = torch.rand(num_sets, N, generator=gen) > 0.3
    return dict(gate=gate, up=up, culture=culture, set_ids=set_ids, keep=keep, C=C)


@pytest.fixture
def mlp_case():
    """The factory ``make_mlp_case(R, N, C=5, num_sets=3, dtype=fp32, seed=0)``."""
    return make_mlp_case


def check_act_and_record(op, case: dict, act_fn: str, record: str, do_record: bool = True,
                         do_ablate: bool = True, factor: float = 0.0) -> None:
    """Run ``op`` (the 2D op contract) on ``case`` and compare with the fp64 reference.

    Counts must match EXACTLY; sums and h within the tolerances commented below. Accumulators
    start from nonzero values, so ``+=`` (not ``=``) is what gets tested.
    """
    from culture_neurons.kernels.ops import act
    from culture_neurons.kernels.reference import act_and_record_reference, keep_rows_reference

    gate, up, C = case["gate"], case["up"], case["C"]
    if act_fn == "gelu_tanh" and (record == "post" or factor < 0):
        # Below g ~ -5.06 fp32 GELU-tanh rounds 1 + tanh(z) to 0 (torch and the kernels alike),
        # where fp64 keeps a tiny a whose sign is that of -u ("post") or that a negative
        # steering factor flips: K would differ by rounding. The fp32 agreement there is tested
        # against eager torch (test_counts_match_eager_*).
        gate = gate.clamp(min=-4.5)
    R, N = gate.shape
    keep, set_ids = case["keep"], case["set_ids"]
    culture = case["culture"]
    K0 = torch.randint(0, 100, (C, N), dtype=torch.int64)
    S0 = torch.randn(C, N, dtype=torch.float64)
    Q0 = torch.rand(C, N, dtype=torch.float64)
    K, S, Q = K0.clone(), S0.clone(), Q0.clone()
    dev = gate.device  # a CUDA case runs on the GPU; the reference always runs on the CPU
    K, S, Q = K.to(dev), S.to(dev), Q.to(dev)
    h = op(gate, up, culture.to(dev), K, S, Q, keep.to(dev), set_ids.to(dev), act_fn, record,
           do_record, do_ablate, factor)
    assert h.shape == (R, N) and h.dtype == gate.dtype

    ref_keep = keep if do_ablate else None
    ref_set = set_ids if do_ablate else None
    h_ref, K_ref, S_ref, Q_ref = act_and_record_reference(
        gate.cpu(), up.cpu(), culture, C, act_fn, record, ref_keep, ref_set, factor)
    mask = keep_rows_reference(ref_keep, ref_set, R, N, factor)
    h = h.cpu()

    # Ablated neurons are exactly zero; the rest match eager act(g) * u (H_RTOL: kernels/check).
    assert (h[mask == 0] == 0).all(), "ablated h must be exactly 0"
    h_eager = (act(gate.cpu().float(), act_fn) * up.cpu().float() * mask.float())
    h_eager = h_eager.to(gate.dtype)
    msg = first_mismatch(h, h_eager, atol=1e-6, rtol=H_RTOL[gate.dtype])
    assert msg is None, f"h vs eager: {msg}"

    K, S, Q = K.cpu(), S.cpu(), Q.cpu()
    if not do_record:
        assert (K == K0).all() and (S == S0).all() and (Q == Q0).all(), "stats must not move"
        return
    K_inc = K.long() - K0.long()
    msg = first_mismatch(K_inc, K_ref)
    assert msg is None, f"K (exact): {msg}"
    # fp32 sums of <= R terms in another order than fp64 differ by <= R * 2^-24 * sum|a|
    # (< 1e-5 * sum|a| here); the fp32 act itself is a few ulp off: 1e-5 relative covers both.
    S_abs = Q_ref.sqrt() * (R**0.5)  # >= sum|a| by Cauchy-Schwarz: a scale for the atol
    msg = first_mismatch(S.double() - S0.double(), S_ref, atol=1e-5 * float(S_abs.max())
                         + 1e-6, rtol=1e-5)
    assert msg is None, f"S: {msg}"
    msg = first_mismatch(Q.double() - Q0.double(), Q_ref,
                         atol=1e-5 * float(Q_ref.max()) + 1e-6, rtol=1e-5)
    assert msg is None, f"Q: {msg}"


@pytest.fixture
def act_and_record_checker():
    """``check(op, case, act_fn, record, do_record=True, do_ablate=True)``, see above."""
    return check_act_and_record


def eager_counts(gate, up, culture, C, act_fn, record):
    """K ``[C, N]`` int64 as the hooks backend sees it: eager torch in fp32, no ablation."""
    from culture_neurons.kernels.ops import act as act_fn_of

    act = act_fn_of(gate.float(), act_fn)  # on gate's device: what hooks would see there
    a = act if record == "gate" else act * up.float()
    K = torch.zeros(C, gate.shape[1], dtype=torch.int64)
    for c in range(C):
        K[c] = (a[culture == c] > 0).sum(0).cpu()
    return K


@pytest.fixture
def eager_counts_fn():
    """``eager_counts(gate, up, culture, C, act_fn, record) -> K``: torch fp32 counts."""
    return eager_counts


def save_cli_assets(root, family: str, cultures: int = 3, items: int = 8, seed: int = 0) -> dict:
    """A tiny ``family`` model + processor saved as a local folder and synthetic CVQA parquet:
    what a user hands the command line (``--model DIR --data DIR``)."""
    from culture_neurons.data import write_synthetic_cvqa
    from culture_neurons.models.loading import save_processor
    from culture_neurons.testing.tiny import tiny_model, tiny_processor

    model_dir = root / "model"
    tiny_model(family).save_pretrained(model_dir)
    save_processor(tiny_processor(family), model_dir)
    data = write_synthetic_cvqa(root / "cvqa", cultures=cultures, items_per_culture=items,
                                seed=seed)  # fmt: skip
    return {"model": str(model_dir), "data": str(data), "root": root}


def short_batch() -> dict:
    """Three left-padded prompts of 3..12 tokens for the tiny Llama: padding is exercised, the
    forward is cheap (tiny_batch's chat prompts of ~110 tokens cost ~1 s on 2 busy cores)."""
    from culture_neurons.testing.tiny import tiny_processor

    tok = tiny_processor("llama")
    tok.padding_side = "left"
    texts = ["What is shown?", "Which traditional dish is shown in this picture? A. rice B. tea",
             "the festival"]  # fmt: skip
    return dict(tok(texts, return_tensors="pt", padding=True))


def snapshot(root) -> dict:
    """Every file and folder under ``root``: relative path -> (mtime_ns, sha256) for files,
    "dir" for folders. "Nothing written or changed" is an equal snapshot before and after."""
    import hashlib
    from pathlib import Path

    root = Path(root)
    if not root.exists():
        return {}
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else (p.stat().st_mtime_ns,
                                             hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def assert_refused(argv: list[str], capsys, *needles: str, watch=(), alone: bool = True) -> str:
    """Run the CLI on ``argv`` in this process and check a refusal: exit code 2, one
    ``error:`` line on stderr (the only line when ``alone``; else the last, after warnings)
    holding every needle, no traceback, nothing on stdout, nothing written or changed under
    the ``watch`` paths. Returns the error line."""
    from culture_neurons.pipeline import cli

    before = [snapshot(w) for w in watch]
    capsys.readouterr()  # what earlier commands printed
    code = cli.main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, (argv, captured.err)
    assert "Traceback" not in captured.err and captured.out == "", captured
    assert lines and lines[-1].startswith("error: "), captured.err
    assert sum(line.startswith("error:") for line in lines) == 1, captured.err
    if alone:
        assert len(lines) == 1, captured.err
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])
    assert [snapshot(w) for w in watch] == before, "a refused command wrote or changed files"
    return lines[-1]
