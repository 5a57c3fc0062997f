"""Masks: CSR layout, the derived views, files (safetensors and LAPE's format) and refusals."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from safetensors.torch import save_file

from culture_neurons.errors import DataError, StatsMismatchError, UsageError
from culture_neurons.masks import Masks, load_masks
from culture_neurons.stats import Fingerprint

FP = Fingerprint("test", "test", 3, 5, 8, "silu", "abc")  # L = 3, N = 5


@pytest.fixture
def masks() -> Masks:
    # flat = l * 5 + n. "a": (0,1) (2,4) (1,0); "b": empty; "c": (0,1) (0,2)
    sets = [torch.tensor([1, 14, 5]), torch.tensor([], dtype=torch.int64), torch.tensor([2, 1])]
    return Masks.from_sets(["a", "b", "c"], sets, FP, "cas", {"ratio": 0.2})


def test_csr_layout_and_views(masks):
    assert masks.indptr.tolist() == [0, 3, 3, 5]
    assert masks.flat.tolist() == [1, 5, 14, 1, 2]  # sorted within each set
    assert len(masks) == 3 and masks.sizes().tolist() == [3, 0, 2]
    assert masks.pairs("a").tolist() == [[0, 1], [1, 0], [2, 4]]
    assert masks.pairs(2).tolist() == [[0, 1], [0, 2]]
    assert masks.pairs("b").shape == (0, 2)
    assert masks.layer_counts().tolist() == [[1, 1, 1], [0, 0, 0], [2, 0, 0]]
    dense = masks.dense()
    assert dense.shape == (3, 3, 5) and dense.dtype == torch.bool
    assert torch.nonzero(dense).tolist() == [[0, 0, 1], [0, 1, 0], [0, 2, 4], [2, 0, 1], [2, 0, 2]]
    assert "3 sets over 3 layers x 5 neurons" in repr(masks) and "'cas'" in repr(masks)
    with pytest.raises(UsageError, match="unknown set 'z'"):
        masks.pairs("z")


def test_keep_mask_is_layer_major(masks):
    keep = masks.keep_mask("cpu")
    assert keep.shape == (3, 3, 5) and keep.dtype == torch.uint8 and keep.is_contiguous()
    assert torch.equal(keep, (~masks.dense()).permute(1, 0, 2).to(torch.uint8))
    assert keep[2, 0, 4] == 0 and keep[2, 2, 4] == 1  # layer 2: set a ablates n=4, set c keeps it
    assert masks.keep_mask(dtype=torch.bfloat16).dtype == torch.bfloat16


def test_jaccard(masks):
    other = Masks.from_sets(["x", "y"], [torch.tensor([1, 2, 3]), torch.tensor([14])], FP)
    j = masks.jaccard(other)
    assert j.shape == (3, 2)
    assert j[0].tolist() == [1 / 5, 1 / 3]  # {1,5,14} vs {1,2,3}: 1 of 5; vs {14}: 1 of 3
    assert j[1].tolist() == [0.0, 0.0]
    assert j[2].tolist() == [2 / 3, 0.0]
    self_j = masks.jaccard()
    assert self_j[0, 0] == 1 and math.isnan(self_j[1, 1])  # two empty sets: NaN, not 0 or 1
    other_model = Masks.from_sets(
        ["x"], [torch.tensor([1])], dataclasses.replace(FP, num_neurons=6)
    )
    with pytest.raises(StatsMismatchError, match="num_neurons"):
        masks.jaccard(other_model)


def test_validation():
    with pytest.raises(DataError, match="outside"):
        Masks.from_sets(["a"], [torch.tensor([15])], FP)
    with pytest.raises(DataError, match="twice"):
        Masks.from_sets(["a"], [torch.tensor([3, 3])], FP)
    with pytest.raises(DataError, match="sorted and unique"):
        Masks(["a", "b"], FP, torch.tensor([0, 2, 3]), torch.tensor([4, 1, 0]))
    with pytest.raises(DataError, match="unique"):
        Masks.from_sets(["a", "a"], [torch.tensor([1]), torch.tensor([2])], FP)
    with pytest.raises(DataError, match="indptr"):
        Masks(["a"], FP, torch.tensor([0, 1]), torch.tensor([1, 2]))
    # A set boundary may go down: [4] then [1].
    assert Masks(
        ["a", "b"], FP, torch.tensor([0, 1, 2]), torch.tensor([4, 1])
    ).sizes().tolist() == [1, 1]


def test_save_load_round_trip(masks, tmp_path):
    path = masks.save(tmp_path / "masks" / "cas.safetensors")
    back = load_masks(path, FP)
    assert back == masks
    assert back.options == {"ratio": 0.2} and back.names == ["a", "b", "c"]


def test_load_refuses_another_model(masks, tmp_path):
    path = masks.save(tmp_path / "cas.safetensors")
    other = dataclasses.replace(FP, num_layers=4, config_hash="def")
    with pytest.raises(StatsMismatchError, match="num_layers: 3 vs 4") as err:
        load_masks(path, other)
    assert "config_hash" in str(err.value)


def test_load_malformed(tmp_path):
    with pytest.raises(DataError, match="no masks"):
        load_masks(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    save_file({"x": torch.zeros(2)}, bad, metadata={"format": "something-else"})
    with pytest.raises(DataError, match="not a culture-neurons masks file"):
        load_masks(bad)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(DataError):
        load_masks(tmp_path / "junk.safetensors")


def test_lape_round_trip(masks, tmp_path):
    path = masks.to_lape(tmp_path / "lape.neuron.pth")
    nested = torch.load(path, weights_only=True)
    assert len(nested) == 3 and all(len(layers) == 3 for layers in nested)
    assert [t.tolist() for t in nested[0]] == [[1], [0], [4]]
    assert all(t.dtype == torch.int64 for layers in nested for t in layers)
    back = Masks.from_lape(path, FP, ["a", "b", "c"])
    assert torch.equal(back.indptr, masks.indptr) and torch.equal(back.flat, masks.flat)
    assert back.method == "lape"


def test_from_lape_reads_their_layout(tmp_path):
    # As in their README: neuron[i][j] = indices of language i in layer j, unsorted is allowed.
    nested = [[torch.tensor([3, 1]), torch.tensor([]).long(), torch.tensor([4])],
              [torch.tensor([]).long()] * 3]  # fmt: skip
    torch.save(nested, tmp_path / "x.pth")
    m = Masks.from_lape(tmp_path / "x.pth", FP, ["en", "zh"])
    assert m.pairs("en").tolist() == [[0, 1], [0, 3], [2, 4]] and m.sizes().tolist() == [3, 0]


@pytest.mark.parametrize(
    "content,match",
    [
        ({"not": "a list"}, "expected a list of 2 sets"),
        ([[torch.tensor([1])] * 3], "expected a list of 2 sets"),
        ([[torch.tensor([1])] * 2] * 2, "list of 3 per-layer tensors"),
        ([[torch.tensor([0.5])] * 3] * 2, "1-D integer tensor"),
        ([[torch.tensor([5])] * 3] * 2, r"outside \[0, 5\)"),
        ([[torch.tensor([1, 1])] * 3] * 2, "twice"),
    ],
)
def test_from_lape_malformed(tmp_path, content, match):
    torch.save(content, tmp_path / "bad.pth")
    with pytest.raises(DataError, match=match):
        Masks.from_lape(tmp_path / "bad.pth", FP, ["en", "zh"])


class _NotATensor:
    pass


def test_from_lape_never_unpickles_objects(tmp_path):
    torch.save([_NotATensor()], tmp_path / "evil.pth")
    with pytest.raises(DataError, match="readable safely"):
        Masks.from_lape(tmp_path / "evil.pth", FP, ["en"])
    with pytest.raises(DataError, match="no LAPE neuron file"):
        Masks.from_lape(tmp_path / "missing.pth", FP, ["en"])


def test_content_hash_is_the_sets_not_their_sizes(masks):
    same = Masks.from_sets(masks.names, [masks.flat_of(s) for s in range(len(masks))], FP,
                           method="other", options={"x": 1})  # fmt: skip
    assert same.content_hash() == masks.content_hash()  # method and options are not content
    moved = [masks.flat_of(s).clone() for s in range(len(masks))]
    moved[0][0] = (int(moved[0][0]) + 1) % (FP.num_layers * FP.num_neurons)
    while len(set(moved[0].tolist())) < moved[0].numel():  # keep it a set
        moved[0][0] = (int(moved[0][0]) + 1) % (FP.num_layers * FP.num_neurons)
    other = Masks.from_sets(masks.names, moved, FP)
    assert other.sizes().tolist() == masks.sizes().tolist()
    assert other.content_hash() != masks.content_hash()
