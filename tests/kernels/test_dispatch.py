"""Which path runs (kernels/dispatch.py): the self-check, the loud fallback and the forced kernel.

On this CPU the Triton kernel runs in the interpreter. "A kernel device" is made of the CPU by
adding it to ``dispatch.KERNEL_DEVICES`` (what CUDA is in production), and a wrong kernel by
wrapping the launcher: the self-check must catch it, warn once naming the device and the
difference, and give the PyTorch path's numbers from then on (or raise when forced).
"""

import warnings

import pytest
import torch
from culture_neurons.kernels.dispatch import KernelFallbackWarning
from culture_neurons.kernels.ops import LayerOp
from culture_neurons.kernels.reference import act_and_record_reference

from culture_neurons.errors import KernelError, UsageError
from culture_neurons.kernels import act_and_record, dispatch

act_record = pytest.importorskip("culture_neurons.kernels.act_record")


@pytest.fixture(autouse=True)
def fresh_decisions(monkeypatch):
    monkeypatch.delenv(dispatch.MODE_ENV, raising=False)
    dispatch.reset()
    yield
    dispatch.reset()


@pytest.fixture
def cpu_is_a_kernel_device(monkeypatch):
    """Under "auto", CPU tensors take the (interpreted) kernel as CUDA tensors do."""
    monkeypatch.setattr(dispatch, "KERNEL_DEVICES", ("cuda", "cpu"))


@pytest.fixture
def launches(monkeypatch):
    """Count the kernel's launches; ``launches.wrong`` = a function applied after each one."""

    class Spy:
        calls = 0
        wrong = None

    real = act_record.launch

    def launch(*args, **kwargs):
        Spy.calls += 1
        h = real(*args, **kwargs)
        if Spy.wrong is not None:
            Spy.wrong(args)
        return h

    monkeypatch.setattr(act_record, "launch", launch)
    return Spy


def _record(case, C=5):
    """One act_and_record call with fresh totals: (h, K, S, Q)."""
    K = torch.zeros(C, case["gate"].shape[1], dtype=torch.int64)
    S = torch.zeros(C, case["gate"].shape[1], dtype=torch.float64)
    Q = torch.zeros_like(S)
    h = act_and_record(case["gate"], case["up"], act_fn="silu", activation="gate",
                       culture=case["culture"], K=K, S=S, Q=Q, keep=case["keep"],
                       set_ids=case["set_ids"])
    return h, K, S, Q


def _assert_reference(case, out, assert_close_stats, C=5):
    h, K, S, _ = out
    h_ref, K_ref, S_ref, _ = act_and_record_reference(case["gate"], case["up"], case["culture"],
                                                      C, "silu", "gate", case["keep"],
                                                      case["set_ids"])
    assert_close_stats("K", K, K_ref)
    assert_close_stats("S", S, S_ref, atol=1e-4, rtol=1e-5)  # fp32 sums of <= R terms
    assert_close_stats("h", h, h_ref, atol=1e-6, rtol=1e-5)


def test_cpu_takes_the_pytorch_path_quietly(launches, mlp_case, assert_close_stats):
    case = mlp_case(7, 33)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the designed CPU path is no fallback: no warning
        out = _record(case)
    assert launches.calls == 0
    assert dispatch.status() == {"mode": "auto", "checked": [], "fallbacks": {}}
    _assert_reference(case, out, assert_close_stats)


def test_kernel_device_runs_the_checked_kernel(cpu_is_a_kernel_device, launches, mlp_case,
                                               assert_close_stats):
    case = mlp_case(40, 67, seed=1)
    out = _record(case)
    assert launches.calls == 3  # the self-check (an aligned and a ragged shape), then the call
    _record(case)
    assert launches.calls == 4  # checked once per (device, dtype, variant)
    status = dispatch.status()
    assert status["fallbacks"] == {} and len(status["checked"]) == 1
    assert "cpu, torch.float32, silu/gate record ablate" in status["checked"][0]
    _assert_reference(case, out, assert_close_stats)


def _wrong_count(args):
    K = args[0].K  # launch(args: OpArgs, ...)
    K.view(-1)[0] += 1  # one count off, as a miscompiled kernel might be


@pytest.mark.parametrize("forced", [False, True])
def test_wrong_count_is_caught(forced, cpu_is_a_kernel_device, monkeypatch, launches, mlp_case,
                               assert_close_stats):
    case = mlp_case(40, 67, seed=2)
    launches.wrong = _wrong_count
    if forced:
        monkeypatch.setenv(dispatch.MODE_ENV, "triton")
        with pytest.raises(KernelError, match=r"29 x 64: K differs in 1 of .*culture 0, neuron 0"):
            _record(case)
        return
    with pytest.warns(KernelFallbackWarning, match=r"NOT used on cpu, .*K differs in 1 of"):
        out = _record(case)
    assert launches.calls == 1  # the self-check's first shape only: the call ran in PyTorch
    _assert_reference(case, out, assert_close_stats)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning, not one per call
        out = _record(case)
    assert launches.calls == 1
    _assert_reference(case, out, assert_close_stats)
    (reason,) = dispatch.status()["fallbacks"].values()
    assert reason.startswith("the self-check found the kernel wrong: 29 x 64: K differs in 1 of")


def test_sum_outside_tolerance_is_caught(cpu_is_a_kernel_device, launches, mlp_case):
    launches.wrong = lambda args: args[0].S.mul_(1.01)  # S 1 % off
    with pytest.warns(KernelFallbackWarning, match="S differs"):
        _record(mlp_case(40, 67, seed=3))


def test_missing_triton_is_loud(cpu_is_a_kernel_device, monkeypatch, mlp_case,
                                assert_close_stats):
    def broken():
        raise ImportError("No module named 'triton'")

    monkeypatch.setattr(dispatch, "triton_kernels", broken)
    case = mlp_case(7, 33, seed=4)
    with pytest.warns(KernelFallbackWarning, match="triton is unavailable .*No module named"):
        out = _record(case)
    _assert_reference(case, out, assert_close_stats)
    monkeypatch.setenv(dispatch.MODE_ENV, "triton")
    dispatch.reset()
    with pytest.raises(KernelError, match="triton is unavailable"):
        _record(case)


def test_launch_error_after_the_check_falls_back_for_that_call(cpu_is_a_kernel_device,
                                                               monkeypatch, mlp_case,
                                                               assert_close_stats):
    case = mlp_case(40, 67, seed=5)
    _record(case)  # checked and used
    monkeypatch.setattr(act_record, "launch",
                        lambda *a, **k: (_ for _ in ()).throw(RuntimeError("launch failed")))
    with pytest.warns(KernelFallbackWarning, match="raised RuntimeError: launch failed"):
        out = _record(case)
    _assert_reference(case, out, assert_close_stats)  # counted once, in PyTorch


def test_forced_kernel_needs_a_triton_device(monkeypatch, mlp_case):
    monkeypatch.setenv(dispatch.MODE_ENV, "triton")
    monkeypatch.setattr(dispatch, "interpreting", lambda: False)
    with pytest.raises(KernelError, match="cpu tensors have no Triton backend"):
        _record(mlp_case(7, 33))


def test_forced_kernel_on_the_interpreter(monkeypatch, launches, mlp_case, assert_close_stats):
    monkeypatch.setenv(dispatch.MODE_ENV, "triton")
    case = mlp_case(40, 67, seed=6)
    out = _record(case)
    assert launches.calls == 3
    _assert_reference(case, out, assert_close_stats)


def test_torch_mode_never_launches(cpu_is_a_kernel_device, monkeypatch, launches, mlp_case):
    monkeypatch.setenv(dispatch.MODE_ENV, "torch")
    _record(mlp_case(7, 33))
    assert launches.calls == 0


def test_unknown_mode_is_refused(monkeypatch, mlp_case):
    monkeypatch.setenv(dispatch.MODE_ENV, "fast")
    with pytest.raises(UsageError, match="CULTURE_NEURONS_KERNEL='fast' is not one of"):
        _record(mlp_case(7, 33))


def test_layer_op_follows_the_same_decision(cpu_is_a_kernel_device, launches, mlp_case,
                                            assert_close_stats):
    """After a fallback the bound per-layer op takes the PyTorch path too (one decision)."""
    case = mlp_case(40, 67, seed=7)
    launches.wrong = _wrong_count
    with pytest.warns(KernelFallbackWarning):
        _record(case)
    K = torch.zeros(5, 67, dtype=torch.int64)
    S, Q = torch.zeros(5, 67, dtype=torch.float64), torch.zeros(5, 67, dtype=torch.float64)
    op = LayerOp(67, "cpu", act_fn="silu", K=K, S=S, Q=Q, keep=case["keep"])
    h = op(case["gate"], case["up"], case["culture"], case["set_ids"])
    assert launches.calls == 1
    _assert_reference(case, (h, K, S, Q), assert_close_stats)
