"""The fused Triton kernel (CPU interpreter here, CUDA where marked gpu) against the fp64
reference: counts exactly, sums and h within commented tolerances (see tests/conftest.py)."""

import functools

import pytest
import torch
from culture_neurons.kernels.reference import act_and_record_reference

from culture_neurons.errors import UsageError

act_record = pytest.importorskip("culture_neurons.kernels.act_record")

SHAPES = [(1, 1), (7, 33), (130, 67)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # bf16 is loaded and cast to fp32


def _on(case, device):
    """The case with gate and up on the kernel's device (the checker moves the rest)."""
    case["gate"], case["up"] = case["gate"].to(device), case["up"].to(device)
    return case


def _kernel(block_r=16, block_n=32, **kwargs):
    # Small tiles: 130 x 67 becomes 9 x 3 tiles with masked edges and several cultures per tile.
    return functools.partial(act_record.act_and_record_triton, block_r=block_r, block_n=block_n,
                             **kwargs)


# Row tiles of 16 (the _kernel tile) with 1, 2 and many cultures, gaps between ids, unsorted
# ids, skipped rows, a tile with no counted row and a ragged last tile (C = 7).
TILE_LAYOUTS = {
    "one culture, skipped rows": [3] * 6 + [-1] * 3 + [3] * 7,
    "two cultures with a gap": [0] * 5 + [-1] + [4] * 10,
    "many, unsorted, gaps": [6, 2, 6, 0, 5, -1, 2, 2, 0, 6, 5, 5, -1, 0, 2, 6],
    "nothing counted": [-1] * 16,
    "ragged tail": [1, 1, 5, -1, 5],
}


@pytest.mark.parametrize("R,N", SHAPES[:2])
@pytest.mark.parametrize("act_fn", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("record", ["gate", "post"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_small_shapes_every_variant(R, N, act_fn, record, dtype, mlp_case, device,
                                    act_and_record_checker):
    case = _on(mlp_case(R, N, dtype=dtype, seed=R * 1000 + N), device)
    act_and_record_checker(_kernel(), case, act_fn, record)


@pytest.mark.parametrize(
    "act_fn,record,dtype",
    [
        ("silu", "gate", torch.float32),
        ("gelu_tanh", "post", torch.float16),
        ("silu", "post", torch.bfloat16),
        ("gelu_tanh", "gate", torch.bfloat16),
    ],
)
def test_130x67_several_cultures_per_tile(act_fn, record, dtype, mlp_case, device,
                                          act_and_record_checker):
    case = _on(mlp_case(130, 67, C=7, dtype=dtype, seed=7), device)
    tile_ids = case["culture"][:16]
    assert len(set(tile_ids.tolist()) - {-1}) >= 2, "the first tile should mix cultures"
    act_and_record_checker(_kernel(), case, act_fn, record)


@pytest.mark.parametrize("do_record,do_ablate", [(False, True), (True, False), (False, False)])
def test_switches_off(do_record, do_ablate, mlp_case, device, act_and_record_checker):
    case = _on(mlp_case(7, 33, seed=3), device)
    act_and_record_checker(_kernel(), case, "silu", "gate", do_record, do_ablate)


@pytest.mark.parametrize("factor", [1.5, -0.5])
def test_steering_scales_the_selected_neurons(factor, mlp_case, device, act_and_record_checker):
    """a := (1 + alpha) a on each row's set (factor = 1 + alpha), statistics of the steered a."""
    case = _on(mlp_case(130, 67, C=7, seed=8), device)
    act_and_record_checker(_kernel(), case, "silu", "post", factor=factor)


@pytest.mark.parametrize("record", ["gate", "post"])
def test_tiles_of_one_two_and_many_cultures(record, mlp_case, device, act_and_record_checker):
    """The kernel visits each id a tile holds (one: the loop-free path; several: in increasing
    order, skipping the gaps), and every tile layout adds exactly what the reference adds."""
    layout = [c for rows in TILE_LAYOUTS.values() for c in rows]
    case = _on(mlp_case(len(layout), 67, C=7, seed=21), device)
    case["culture"] = torch.tensor(layout, dtype=torch.int32)
    act_and_record_checker(_kernel(), case, "silu", record)


@pytest.mark.parametrize("name", list(TILE_LAYOUTS))
def test_each_tile_layout_alone(name, mlp_case, device, act_and_record_checker):
    rows = TILE_LAYOUTS[name]
    case = _on(mlp_case(len(rows), 33, C=7, seed=len(name)), device)
    case["culture"] = torch.tensor(rows, dtype=torch.int32)
    act_and_record_checker(_kernel(), case, "gelu_tanh", "gate")


@pytest.mark.parametrize("c", [0, 4])
def test_host_known_single_culture(c, mlp_case, device, act_and_record_checker):
    """one_culture = c (the host knows every counted row is c): no search, same numbers, also
    for tiles of skipped rows only (they add zeros)."""
    case = _on(mlp_case(70, 67, C=5, seed=22 + c), device)
    ids = torch.full((70,), c, dtype=torch.int32)
    ids[3:9] = -1
    ids[16:32] = -1  # a whole row tile of skipped rows
    case["culture"] = ids
    act_and_record_checker(_kernel(one_culture=c), case, "silu", "post")


def test_out_of_range_ids_are_ignored(mlp_case, device, assert_close_stats):
    """Ids >= C (never produced by the package, which checks them) write nothing anywhere."""
    case = _on(mlp_case(32, 33, C=3, seed=23), device)
    culture = torch.tensor([0, 5, 1, 9] * 8, dtype=torch.int32)
    K = torch.zeros(3, 33, dtype=torch.int64, device=device)
    S = torch.zeros(3, 33, dtype=torch.float64, device=device)
    _kernel()(case["gate"], case["up"], culture.to(device), K, S, S.clone(), case["keep"],
              case["set_ids"], "silu", "gate", True, False)
    want = torch.where(culture < 3, culture, -1)
    _, K_ref, _, _ = act_and_record_reference(case["gate"].cpu(), case["up"].cpu(), want, 3)
    assert_close_stats("K", K, K_ref)


def test_one_tile_covers_everything(mlp_case, device, act_and_record_checker):
    """A 64 x 128 tile (the GPU default) over 7 x 33: all rows of all cultures in one program."""
    case = _on(mlp_case(7, 33, seed=4), device)
    act_and_record_checker(_kernel(64, 128), case, "gelu_tanh", "post")


def test_strided_rows(mlp_case, device, act_and_record_checker):
    """gate and up as column slices of one [R, 2N] gate_up projection (row stride 2N)."""
    case = mlp_case(7, 33, seed=5)
    gate_up = torch.cat([case["gate"], case["up"]], dim=1).to(device)
    case["gate"], case["up"] = gate_up[:, :33], gate_up[:, 33:]
    act_and_record_checker(_kernel(), case, "silu", "post")


def test_keep_as_layer_slice(mlp_case, device, act_and_record_checker):
    """keep as keep_all[:, l, :] of a [num_sets, L, N] mask (row stride L * N) is read right."""
    case = _on(mlp_case(7, 33, seed=6), device)
    keep_all = torch.stack([~case["keep"], case["keep"], ~case["keep"]], dim=1)  # L = 3
    case["keep"] = keep_all[:, 1, :]
    assert not case["keep"].is_contiguous()
    act_and_record_checker(_kernel(), case, "silu", "gate")


def test_rejects_non_contiguous_accumulator(mlp_case):
    case = mlp_case(7, 33)
    K = torch.zeros(33, 5, dtype=torch.int64).T  # [C, N] view with the wrong layout
    S = Q = torch.zeros(5, 33, dtype=torch.float64)
    with pytest.raises(UsageError, match="contiguous"):
        act_record.act_and_record_triton(case["gate"], case["up"], case["culture"], K, S, Q,
                                         case["keep"], case["set_ids"], "silu", "gate", True,
                                         True)


@pytest.mark.gpu
@pytest.mark.parametrize("R,N", [(1, 1), (130, 67), (1000, 4099)])
@pytest.mark.parametrize("record", ["gate", "post"])
def test_cuda_bf16(R, N, record, mlp_case, act_and_record_checker):
    case = mlp_case(R, N, C=7, dtype=torch.bfloat16, seed=R)
    case["gate"], case["up"] = case["gate"].cuda(), case["up"].cuda()
    act_and_record_checker(act_record.act_and_record_triton, case, "gelu_tanh", record)


@pytest.mark.parametrize("act_fn", ["silu", "gelu_tanh"])
def test_counts_match_eager_torch_where_fp32_saturates(act_fn, mlp_case, device,
                                                       eager_counts_fn, assert_close_stats):
    """g in [-9, 3] crosses the band where fp32 GELU-tanh is exactly 0 (g < -5.06): there the
    hooks backend (eager torch) counts nothing for record="post", and so must the kernel.
    On a GPU both sides run there (fast exp vs tanhf): they could split one ulp apart at the
    band's edge; bench/gpu_check.py reports that case as WARN, not FAIL."""
    case = mlp_case(33, 67, C=3, seed=12)
    case["gate"] = torch.linspace(-9, 3, 33 * 67).reshape(33, 67)
    case = _on(case, device)
    C = case["C"]
    K = torch.zeros(C, 67, dtype=torch.int64, device=device)
    S = torch.zeros(C, 67, dtype=torch.float64, device=device)
    Q = torch.zeros(C, 67, dtype=torch.float64, device=device)
    _kernel()(case["gate"], case["up"], case["culture"].to(device), K, S, Q,
              case["keep"].to(device), case["set_ids"].to(device), act_fn, "post", True, False)
    want = eager_counts_fn(case["gate"], case["up"], case["culture"].to(device), C, act_fn,
                           "post")
    assert_close_stats("K", K, want)
