"""The custom ops: the PyTorch path (CPU) against the fp64 reference, the Python faces'
validation, torch.compile and opcheck; on CUDA (marked gpu) the Triton path and CUDA graphs."""

import functools

import pytest
import torch
from culture_neurons.kernels.ops import LayerOp, act_and_record_torch
from culture_neurons.kernels.reference import act_and_record_reference

from culture_neurons.errors import UsageError
from culture_neurons.kernels import act_and_record, custom_op

OP = torch.ops.culture_neurons.act_and_record.default


@pytest.mark.parametrize("R,N", [(1, 1), (7, 33), (130, 67)])
@pytest.mark.parametrize("act_fn", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("record", ["gate", "post"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_op_against_reference(R, N, act_fn, record, dtype, mlp_case,
                                  act_and_record_checker):
    case = mlp_case(R, N, C=7, dtype=dtype, seed=R + N)
    act_and_record_checker(OP, case, act_fn, record)


@pytest.mark.parametrize("record", ["gate", "post"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_chunks(record, dtype, mlp_case, act_and_record_checker):
    """Chunks of 16 rows (130 rows = 8 full chunks and a ragged one) give the same numbers."""
    case = mlp_case(130, 67, C=7, dtype=dtype, seed=11)
    op = functools.partial(act_and_record_torch, chunk_rows=16)
    act_and_record_checker(op, case, "silu", record)


@pytest.mark.parametrize("factor", [1.5, -0.5])
@pytest.mark.parametrize("record", ["gate", "post"])
def test_cpu_steering(factor, record, mlp_case, act_and_record_checker):
    act_and_record_checker(OP, mlp_case(130, 67, C=7, seed=13), "gelu_tanh", record, factor=factor)


@pytest.mark.parametrize("do_record,do_ablate", [(False, True), (True, False), (False, False)])
def test_cpu_switches_off(do_record, do_ablate, mlp_case, act_and_record_checker):
    act_and_record_checker(OP, mlp_case(7, 33), "gelu_tanh", "gate", do_record, do_ablate)


def _through_layer_op(gate, up, culture, K, S, Q, keep, set_ids, act_fn, activation, do_record,
                      do_ablate, factor=0.0):
    """The 2D op contract through a LayerOp bound to K, S, Q and keep (one per call here)."""
    op = LayerOp(gate.shape[1], gate.device, act_fn=act_fn, activation=activation, factor=factor,
                 K=K if do_record else None, S=S if do_record else None,
                 Q=Q if do_record else None, keep=keep if do_ablate else None)
    return op(gate, up, culture if do_record else None, set_ids if do_ablate else None)


@pytest.mark.parametrize("R,N", [(1, 1), (130, 67)])
@pytest.mark.parametrize("record", ["gate", "post"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_op_against_reference(R, N, record, dtype, mlp_case, act_and_record_checker):
    case = mlp_case(R, N, C=7, dtype=dtype, seed=R + 2 * N)
    act_and_record_checker(_through_layer_op, case, "gelu_tanh", record)


@pytest.mark.parametrize("do_record,do_ablate,factor",
                         [(False, True, 0.0), (True, False, 0.0), (False, False, 0.0),
                          (True, True, 1.5)])
def test_layer_op_switches(do_record, do_ablate, factor, mlp_case, act_and_record_checker):
    act_and_record_checker(_through_layer_op, mlp_case(130, 67, C=7, seed=17), "silu", "post",
                           do_record, do_ablate, factor)


def test_layer_op_leading_dims_and_one_culture(mlp_case, assert_close_stats):
    """[B, T, N] inputs with flat per-row ids (as Batch gives them) and a known single culture."""
    case = mlp_case(130, 67, C=7, seed=18)
    culture = torch.where(case["culture"] >= 0, 3, -1).int()
    K, S, Q = _accumulators(7, 67)
    op = LayerOp(67, "cpu", act_fn="silu", activation="post", K=K, S=S, Q=Q, keep=case["keep"])
    h = op(case["gate"].reshape(2, 65, 67), case["up"].reshape(2, 65, 67), culture,
           case["set_ids"], one_culture=3)
    h_ref, K_ref, S_ref, _ = act_and_record_reference(case["gate"], case["up"], culture, 7,
                                                      "silu", "post", case["keep"],
                                                      case["set_ids"])
    assert h.shape == (2, 65, 67)
    assert_close_stats("h", h.reshape(130, 67), h_ref, atol=1e-6, rtol=1e-5)
    assert_close_stats("K", K, K_ref)
    assert_close_stats("S", S, S_ref, atol=1e-4, rtol=1e-5)  # fp32 sums of <= 130 terms


@pytest.mark.parametrize(
    "bind,call,match",
    [
        (dict(K=torch.zeros(33, 5, dtype=torch.int64).T), {}, "contiguous"),
        (dict(S=torch.zeros(5, 33, dtype=torch.float32)), {}, "float64"),
        (dict(act_fn="relu"), {}, "act_fn"),
        (dict(keep=torch.ones(3, 32, dtype=torch.bool)), {}, "num_sets, N"),
        ({}, dict(gate=torch.randn(7, 34), up=torch.randn(7, 34)), r"\[\.\.\., N\]"),
        ({}, dict(up=torch.randn(7, 33, dtype=torch.float64)), "one float dtype"),
        ({}, dict(culture=torch.zeros(6, dtype=torch.int32)), "one id per row"),
        (dict(K=None, S=None, Q=None), {}, "recording op"),
        (dict(keep=None), {}, "bound to a keep mask"),
    ],
)
def test_layer_op_errors_name_the_problem(bind, call, match, mlp_case):
    """Bind-time checks (totals, mask, options) once; call-time checks (inputs, ids) cheap."""
    case = mlp_case(7, 33, C=5)
    K, S, Q = _accumulators(5, 33)
    bound = dict(act_fn="silu", K=K, S=S, Q=Q, keep=case["keep"])
    bound.update(bind)
    args = dict(gate=case["gate"], up=case["up"], culture=case["culture"],
                set_ids=case["set_ids"])
    args.update(call)
    with pytest.raises(UsageError, match=match):
        LayerOp(33, "cpu", **bound)(**args)


def test_eager_faces_skip_the_custom_op(monkeypatch, mlp_case, act_and_record_checker):
    """Outside torch.compile neither face goes through the op's dispatcher (its per-call cost)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the custom op was called eagerly")

    monkeypatch.setattr(custom_op, "_act_and_record_op", refuse)
    case = mlp_case(7, 33, C=5)
    act_and_record_checker(_through_layer_op, case, "silu", "gate")
    K, S, Q = _accumulators(5, 33)
    act_and_record(case["gate"], case["up"], culture=case["culture"], K=K, S=S, Q=Q)


def _accumulators(C, N):
    return (torch.zeros(C, N, dtype=torch.int64), torch.zeros(C, N, dtype=torch.float64),
            torch.zeros(C, N, dtype=torch.float64))


def test_wrapper_leading_dims_and_keywords(mlp_case, assert_close_stats):
    case = mlp_case(130, 67, C=7, seed=2)
    K, S, Q = _accumulators(7, 67)
    gate, up = case["gate"].reshape(2, 65, 67), case["up"].reshape(2, 65, 67)
    h = act_and_record(gate, up, act_fn="silu", activation="post",
                       culture=case["culture"].long().reshape(2, 65), K=K, S=S, Q=Q,
                       keep=case["keep"], set_ids=case["set_ids"].long().reshape(2, 65))
    h_ref, K_ref, S_ref, _ = act_and_record_reference(
        case["gate"], case["up"], case["culture"], 7, "silu", "post", case["keep"],
        case["set_ids"])
    assert h.shape == (2, 65, 67)
    assert_close_stats("h", h.reshape(130, 67), h_ref, atol=1e-6, rtol=1e-5)
    assert_close_stats("K", K, K_ref)
    assert_close_stats("S", S, S_ref, atol=1e-4, rtol=1e-5)  # fp32 sums of <= 130 terms


def test_wrapper_without_stats_or_mask_is_plain_mlp_activation():
    gate, up = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    h = act_and_record(gate, up)
    torch.testing.assert_close(h, torch.nn.functional.silu(gate) * up, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(act_fn="relu"), "act_fn"),
        (dict(activation="both"), "activation"),
        (dict(K=None), "K, S and Q"),
        (dict(set_ids=None), "keep and set_ids"),
        (dict(K=torch.zeros(33, 5, dtype=torch.int64).T), "contiguous"),
        (dict(S=torch.zeros(5, 33)), "float64"),
        (dict(Q=torch.zeros(5, 34)), r"\[C, N\]"),
        (dict(culture=torch.zeros(6, dtype=torch.int32)), "leading dims"),
        (dict(culture=torch.full((7,), 5, dtype=torch.int32)), "culture id 5 >= C = 5"),
        (dict(set_ids=torch.full((7,), 3, dtype=torch.int32)), "set id 3 >= num_sets = 3"),
        (dict(keep=torch.ones(3, 32, dtype=torch.bool)), "num_sets, N"),
        (dict(up=torch.randn(7, 33, dtype=torch.float64)), "float dtype"),
    ],
)
def test_wrapper_errors_name_the_problem(change, match, mlp_case):
    case = mlp_case(7, 33, C=5)
    K, S, Q = _accumulators(5, 33)
    kwargs = dict(gate=case["gate"], up=case["up"], act_fn="silu", activation="gate",
                  culture=case["culture"], K=K, S=S, Q=Q, keep=case["keep"],
                  set_ids=case["set_ids"])
    kwargs.update(change)
    with pytest.raises(UsageError, match=match):
        act_and_record(kwargs.pop("gate"), kwargs.pop("up"), **kwargs)


def test_opcheck(mlp_case):
    """Schema, mutation annotations, fake (meta) kernels and AOT dispatch are consistent."""
    case = mlp_case(7, 33, C=5)
    K, S, Q = _accumulators(5, 33)
    args = (case["gate"], case["up"], case["culture"], K, S, Q, case["keep"].to(torch.uint8),
            case["set_ids"], "silu", "post", True, True, 1.5)
    torch.library.opcheck(OP, args)


def test_layer_op_under_torch_compile(mlp_case, assert_close_stats):
    """The bound op goes through the custom op when compiling: same numbers as eagerly."""
    case = mlp_case(7, 33, C=5, seed=3)
    weight = torch.randn(4, 33)
    eager_acc, compiled_acc = _accumulators(5, 33), _accumulators(5, 33)
    outs = []
    for acc, compile_it in ((eager_acc, False), (compiled_acc, True)):
        op = LayerOp(33, "cpu", act_fn="silu", K=acc[0], S=acc[1], Q=acc[2], keep=case["keep"])

        def mlp_tail(gate, up, culture, set_ids, op=op):
            return torch.nn.functional.linear(op(gate, up, culture, set_ids), weight)

        run = torch.compile(mlp_tail, fullgraph=True, backend="aot_eager") if compile_it else mlp_tail
        outs.append(run(case["gate"], case["up"], case["culture"], case["set_ids"]))
    assert_close_stats("out", outs[1], outs[0], atol=1e-6, rtol=1e-6)
    for name, a, b in zip("KSQ", compiled_acc, eager_acc, strict=True):
        assert_close_stats(name, a, b, atol=1e-6, rtol=1e-6)  # same PyTorch path, same order


def test_torch_compile_fullgraph(mlp_case, assert_close_stats):
    case = mlp_case(7, 33, C=5)
    weight = torch.randn(4, 33)

    def mlp_tail(gate, up, culture, K, S, Q, keep, set_ids):
        h = act_and_record(gate, up, culture=culture, K=K, S=S, Q=Q, keep=keep,
                           set_ids=set_ids)
        return torch.nn.functional.linear(h, weight)

    args = [case[k] for k in ("gate", "up", "culture")]
    eager_acc, compiled_acc = _accumulators(5, 33), _accumulators(5, 33)
    want = mlp_tail(*args, *eager_acc, case["keep"], case["set_ids"])
    compiled = torch.compile(mlp_tail, fullgraph=True, backend="aot_eager")
    got = compiled(*args, *compiled_acc, case["keep"], case["set_ids"])
    assert_close_stats("out", got, want, atol=1e-6, rtol=1e-6)
    for name, a, b in zip("KSQ", compiled_acc, eager_acc, strict=True):
        assert_close_stats(name, a, b, atol=1e-6, rtol=1e-6)  # same PyTorch path, same order


# --- CUDA ----------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("record", ["gate", "post"])
def test_cuda_op_matches_cpu_op(record, mlp_case, assert_close_stats):
    case = mlp_case(1000, 4099, C=25, num_sets=4, dtype=torch.bfloat16, seed=9)
    outs = {}
    for dev in ("cpu", "cuda"):
        K, S, Q = (t.to(dev) for t in _accumulators(25, 4099))
        h = act_and_record(case["gate"].to(dev), case["up"].to(dev), act_fn="silu",
                           activation=record, culture=case["culture"].to(dev), K=K, S=S, Q=Q,
                           keep=case["keep"].to(dev), set_ids=case["set_ids"].to(dev))
        outs[dev] = (h.cpu(), K.cpu(), S.cpu(), Q.cpu())
    (h_c, K_c, S_c, Q_c), (h_g, K_g, S_g, Q_g) = outs["cpu"], outs["cuda"]
    assert_close_stats("K", K_g, K_c)
    assert_close_stats("S", S_g, S_c, atol=1e-3, rtol=1e-4)  # fp32 sums of ~40 rows
    assert_close_stats("Q", Q_g, Q_c, atol=1e-3, rtol=1e-4)
    assert_close_stats("h", h_g, h_c, atol=1e-6, rtol=2 * 2.0**-7)  # one bf16 ulp


@pytest.mark.gpu
def test_cuda_graph_capture(mlp_case, assert_close_stats):
    case = mlp_case(256, 1024, C=5, dtype=torch.bfloat16, seed=1)
    gate, up = case["gate"].cuda(), case["up"].cuda()
    rc, keep, rs = case["culture"].cuda(), case["keep"].cuda(), case["set_ids"].cuda()
    K, S, Q = (t.cuda() for t in _accumulators(5, 1024))
    run = lambda: act_and_record(gate, up, culture=rc, K=K, S=S, Q=Q, keep=keep, set_ids=rs)
    run()  # compile the kernel outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        h = run()
    K.zero_()
    S.zero_()
    graph.replay()
    graph.replay()
    torch.cuda.synchronize()
    K_once = K.clone() // 2
    K.zero_()
    run()
    assert_close_stats("K after 2 replays", K_once, K)
    assert h.shape == (256, 1024)


@pytest.mark.parametrize("act_fn", ["silu", "gelu_tanh"])
def test_cpu_counts_match_eager_torch_where_fp32_saturates(act_fn, mlp_case, eager_counts_fn,
                                                           assert_close_stats):
    """Same band as test_act_record: the CPU op counts exactly what eager torch counts."""
    case = mlp_case(33, 67, C=3, seed=12)
    gate = torch.linspace(-9, 3, 33 * 67).reshape(33, 67)
    K, S, Q = _accumulators(3, 67)
    act_and_record(gate, case["up"], act_fn=act_fn, activation="post",
                   culture=case["culture"], K=K, S=S, Q=Q)
    want = eager_counts_fn(gate, case["up"], case["culture"], 3, act_fn, "post")
    assert_close_stats("K", K, want)
