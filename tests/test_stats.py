"""Stats container: derived quantities, merge, save/load, refusals."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from culture_neurons.errors import DataError, StatsMismatchError
from culture_neurons.stats import Fingerprint, Stats, load_stats

FP = Fingerprint("llama", "llama", num_layers=3, num_neurons=5, hidden_size=8, act_fn="silu",
                 config_hash="abc")  # fmt: skip


def random_stats(seed: int, cultures=("a", "b"), fp: Fingerprint = FP, **kw) -> Stats:
    g = torch.Generator().manual_seed(seed)
    C, L, N = len(cultures), fp.num_layers, fp.num_neurons
    T = torch.randint(50, 100, (C,), generator=g)
    K = torch.randint(0, 50, (C, L, N), generator=g)
    S = torch.randn(C, L, N, generator=g, dtype=torch.float64)
    return Stats(list(cultures), fp, kw.pop("activation", "gate"), kw.pop("scope", "all"),
                 T=T, K=K, S=S, Q=S.abs() * 3, items=torch.randint(1, 9, (C,), generator=g),
                 **kw)  # fmt: skip


def test_derived_quantities():
    s = random_stats(0)
    torch.testing.assert_close(s.P, s.K.double() / s.T.double().view(-1, 1, 1))
    torch.testing.assert_close(s.M, s.S / s.T.double().view(-1, 1, 1))
    assert (s.var >= 0).all()
    z = Stats.zeros(["a"], FP)
    assert torch.isnan(z.P).all()  # no tokens: no probability, never a silent 0


def test_merge_adds_and_save_load_round_trip(tmp_path):
    a, b = random_stats(1), random_stats(2)
    m = a.merge(b)
    for n in ("T", "K", "S", "Q", "items"):
        assert torch.equal(getattr(m, n), getattr(a, n) + getattr(b, n))
    m.save(tmp_path)
    meta = json.loads((tmp_path / "stats.json").read_text())
    assert meta["cultures"] == ["a", "b"] and meta["fingerprint"]["num_layers"] == 3
    back = load_stats(tmp_path)
    for n in ("T", "K", "S", "Q", "items"):
        assert torch.equal(getattr(back, n), getattr(m, n))
    assert back.fingerprint == FP and back.options == m.options
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(
    "other, field",
    [
        (random_stats(3, fp=dataclasses.replace(FP, config_hash="zzz")), "config_hash"),
        (random_stats(3, fp=dataclasses.replace(FP, family="qwen2")), "family"),
        (random_stats(3, cultures=("b", "a")), "cultures"),
        (random_stats(3, scope="text"), "scope"),
        (random_stats(3, activation="post"), "activation"),
        (random_stats(3, options={"items": "all"}), "options"),
    ],
)
def test_merge_refuses_mismatch_naming_the_field(other, field):
    with pytest.raises(StatsMismatchError, match=field):
        random_stats(4).merge(other)


def test_require_model_and_bad_files(tmp_path):
    s = random_stats(5)
    with pytest.raises(StatsMismatchError, match="num_neurons"):
        s.require_model(dataclasses.replace(FP, num_neurons=6))
    with pytest.raises(DataError, match="missing"):
        load_stats(tmp_path)
    s.save(tmp_path)
    (tmp_path / "stats.json").write_text("{}")
    with pytest.raises(DataError, match="does not hold"):
        load_stats(tmp_path)


def test_wrong_shapes_are_refused():
    with pytest.raises(StatsMismatchError, match="expected"):
        Stats(["a"], FP, "gate", "all", T=torch.zeros(1, dtype=torch.int64),
              K=torch.zeros(1, 3, 4, dtype=torch.int64), S=torch.zeros(1, 3, 5, dtype=torch.float64),
              Q=torch.zeros(1, 3, 5, dtype=torch.float64), items=torch.zeros(1, dtype=torch.int64))  # fmt: skip


def test_unreadable_files_are_one_line_naming_them(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path / 'nope'} does not exist"):
        load_stats(tmp_path / "nope")
    s = random_stats(6)
    s.save(tmp_path)
    data = (tmp_path / "stats.safetensors").read_bytes()
    (tmp_path / "stats.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cannot read .*stats.safetensors .*truncated") as e:
        load_stats(tmp_path / "stats.json")
    assert "\n" not in str(e.value)


def test_files_from_before_weight_fingerprints_are_refused(tmp_path):
    random_stats(7).save(tmp_path)
    meta = json.loads((tmp_path / "stats.json").read_text())
    del meta["fingerprint"]["weights_hash"]
    (tmp_path / "stats.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="did not cover the weights.*record the statistics again"):
        load_stats(tmp_path)


def test_content_hash_identifies_the_statistics():
    a = random_stats(8)
    assert a.content_hash() == a.clone().content_hash() == random_stats(8).content_hash()
    b = a.clone()
    b.K[0, 0, 0] += 1  # one count more
    assert b.content_hash() != a.content_hash()
    assert random_stats(8, options={"items": "all"}).content_hash() != a.content_hash()
