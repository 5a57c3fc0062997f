"""The language-modelling task (``--task lm``): Faker sentences, the NLL metric against a plain
forward, ablation of some rows only, and the whole pipeline through the CLI on a tiny Llama.

Never loads the real Gemma 3 270M (that is bench/real_lm.py): every model here is the tiny one.
"""

from __future__ import annotations

import json
import shutil
import unicodedata

import pytest
import torch
import torch.nn.functional as F

from culture_neurons.data.faker_text import LOCALES, SCRIPTS, TextItem, make_faker_data
from culture_neurons.errors import UsageError
from culture_neurons.instrument.instrument import Instrument
from culture_neurons.masks import Masks
from culture_neurons.models import adapters
from culture_neurons.models.loading import save_processor
from culture_neurons.pipeline import cli
from culture_neurons.pipeline.run import RunConfig
from culture_neurons.scoring.lm import LMGroup, culture_nll, encode_text, text_lengths
from culture_neurons.testing.tiny import tiny_model, tiny_processor

pytest.importorskip("faker")

# Few locales of different scripts and few sentences: a whole run takes seconds on 2 CPU cores.
CULTURES = ["de_DE", "ja_JP", "ru_RU"]
SMALL = ["--task", "lm", "--data", "faker", "--cultures", ",".join(CULTURES), "--max-items", "6",
         "--ratio", "0.05", "--rnd-draws", "2", "--batch-size", "4", "--quiet"]  # fmt: skip
# fp32 sums of a few dozen log-probs, batched (padded) against unpadded forwards: the matmul
# shapes differ, so the last bits do; 1e-4 nats is far below any ablation effect tested here.
ATOL = 1e-4


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model("llama").eval()
    return model, tiny_processor("llama")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny):
    path = tmp_path_factory.mktemp("lm") / "model"
    tiny[0].save_pretrained(path)
    save_processor(tiny[1], path)
    return str(path)


def eval_json(out, name: str) -> dict:
    return json.loads((out / "eval" / f"{name}.json").read_text())


def plain_nll(model, processor, text: str) -> tuple[float, int]:
    """Independent reference: one unpadded forward, full logits, summed cross-entropy."""
    ids = processor(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    return F.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum").item(), ids.shape[1] - 1


# -- data ------------------------------------------------------------------------------------------
def script_share(text: str, script: str) -> float:
    """Share of the letters of ``text`` whose Unicode name starts with ``script``."""
    letters = [ch for ch in text if ch.isalpha()]
    names = [unicodedata.name(ch, "") for ch in letters]
    hits = [n for n in names if n.startswith(script) or (script == "CJK" and
            n.startswith(("HIRAGANA", "KATAKANA")))]  # fmt: skip
    return len(hits) / max(1, len(letters))


def test_faker_data_is_deterministic_split_and_in_each_locales_script():
    a = make_faker_data(["ja_JP", "ru_RU", "ar_SA", "de_DE"], per_culture=8, seed=0)
    b = make_faker_data(["de_DE", "ja_JP", "ru_RU", "ar_SA"], per_culture=8, seed=0)
    assert a.items_by_culture == b.items_by_culture  # order of locales given does not matter
    other = make_faker_data(["ja_JP"], per_culture=8, seed=1)
    assert other.items_by_culture["ja_JP"] != a.items_by_culture["ja_JP"]
    assert a.cultures == ["ar_SA", "de_DE", "ja_JP", "ru_RU"]
    for culture, items in a.items_by_culture.items():
        assert len(items) == 8 and len({it.text for it in items}) == 8
        assert all(isinstance(it, TextItem) and it.culture == culture for it in items)
    ident, evaluation = a.split(0.5, seed=0)
    for c in a.cultures:
        ids_i = {it.id for it in ident.items_by_culture[c]}
        ids_e = {it.id for it in evaluation.items_by_culture[c]}
        assert len(ids_i) == len(ids_e) == 4 and not ids_i & ids_e
    for c in ("ja_JP", "ru_RU", "ar_SA"):
        share = min(script_share(it.text, SCRIPTS[c]) for it in a.items_by_culture[c])
        assert share > 0.6, f"{c}: a sentence is only {share:.0%} {SCRIPTS[c]}"


def test_faker_data_is_the_same_in_every_process():
    """Another process (another PYTHONHASHSEED: string hashing, set order) draws the same
    sentences of every locale; it_IT's cities once followed the hash seed."""
    import hashlib
    import os
    import subprocess
    import sys

    script = ("import hashlib; from culture_neurons.data.faker_text import make_faker_data; "
              "d = make_faker_data(per_culture=6); "
              "print(hashlib.sha256(repr([(c, [i.text for i in d.items_by_culture[c]]) "
              "for c in d.cultures]).encode()).hexdigest())")  # fmt: skip
    digests = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                             text=True, check=True)  # fmt: skip
        digests.add(out.stdout.strip())
    here = make_faker_data(per_culture=6)
    mine = repr([(c, [i.text for i in here.items_by_culture[c]]) for c in here.cultures])
    assert digests == {hashlib.sha256(mine.encode()).hexdigest()}


def test_every_locale_generates_in_its_script():
    assert len(LOCALES) >= 20
    data = make_faker_data(per_culture=2, seed=0)
    assert data.cultures == sorted(LOCALES)
    for c, script in SCRIPTS.items():
        text = " ".join(it.text for it in data.items_by_culture[c])
        assert script_share(text, script) > 0.6, f"{c}: {text!r} is not mostly {script}"


def test_faker_data_refuses_unknown_locale_and_tiny_counts():
    with pytest.raises(UsageError, match="xx_XX"):
        make_faker_data(["xx_XX"], per_culture=4)
    with pytest.raises(UsageError, match="at least 2"):
        make_faker_data(["de_DE"], per_culture=1)


# -- the metric --------------------------------------------------------------------------------------
def sample_items(n_per: int = 3) -> list[TextItem]:
    data = make_faker_data(CULTURES, per_culture=n_per, seed=3)
    return [it for c in data.cultures for it in data.items_by_culture[c]]


def test_summed_nll_matches_a_plain_forward(tiny):
    model, processor = tiny
    items = sample_items()
    got = LMGroup(model, processor, items).predict([-1])[0]
    lengths = encode_text(model, processor, items)["attention_mask"].sum(1)
    assert lengths.min() < lengths.max(), "the batch must be padded for this test to mean much"
    for i, it in enumerate(items):
        want, _ = plain_nll(model, processor, it.text)
        assert abs(got[i].item() - want) < ATOL, f"item {it.id}: {got[i].item()} vs {want}"


def test_culture_nll_is_token_weighted():
    sums = torch.tensor([[3.0, 1.0, 8.0]], dtype=torch.float64)
    tokens = torch.tensor([3, 1, 2])
    culture = torch.tensor([0, 0, 1])
    got = culture_nll(sums, tokens, culture, 2)
    assert torch.allclose(got, torch.tensor([[4.0 / 4, 8.0 / 2]], dtype=torch.float64))


def test_ablation_changes_the_ablated_rows_only(tiny):
    model, processor = tiny
    items = sample_items(2)
    fp = adapters.fingerprint(model)
    big = torch.arange(0, fp.num_layers * fp.num_neurons, 2)  # every other neuron: a real change
    masks = Masks.from_sets(["big", "empty"], [big, torch.zeros(0, dtype=torch.int64)], fp)
    with Instrument(model, masks=masks, backend="hooks") as ablator:
        out = LMGroup(model, processor, items).predict([-1, 0, 1, -1], ablator)
    alone = LMGroup(model, processor, items).predict([-1])[0]  # no instrument at all
    for row in (0, 2, 3):  # full, empty set, full again: all the unablated model
        assert torch.allclose(out[row], alone, atol=ATOL), f"row {row} moved"
    assert ((out[1] - alone).abs() > 1e-3).all(), "ablating half the neurons changed nothing"


# -- the pipeline ------------------------------------------------------------------------------------
def test_run_writes_nll_matrices_that_match_a_plain_forward(model_dir, tiny, tmp_path):
    out = tmp_path / "run"
    assert cli.main(["run", "--model", model_dir, "--out", str(out), *SMALL]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["task"] == "lm" and run["config"]["identify_on"] == "all"
    stats = json.loads((out / "stats.json").read_text())
    assert stats["items_counted"] == 3 * len(CULTURES)  # every identification sentence
    full = json.loads((out / "eval" / "full.json").read_text())
    model, processor = tiny
    data = make_faker_data(CULTURES, per_culture=6, seed=0)
    text = {it.id: it.text for it in data}
    ref_sum, ref_tok = torch.zeros(len(CULTURES), dtype=torch.float64), torch.zeros(len(CULTURES))
    for item_id, c in zip(full["items"], full["culture"], strict=True):
        s, t = plain_nll(model, processor, text[item_id])
        ref_sum[c] += s
        ref_tok[c] += t
    for name in ("cas", "lap", "lape", "mad"):
        ev = eval_json(out, name)
        assert ev["task"] == "lm" and ev["cultures"] == CULTURES
        nll_full = torch.tensor(ev["nll_full"], dtype=torch.float64)
        assert torch.allclose(nll_full, ref_sum / ref_tok, atol=ATOL), name
        nll, delta = (torch.tensor(ev[k], dtype=torch.float64) for k in ("nll", "delta"))
        assert nll.shape == delta.shape == (len(CULTURES), len(CULTURES))
        assert torch.allclose(delta, nll - nll_full, atol=1e-12)
        diag = torch.eye(len(CULTURES), dtype=torch.bool)
        assert ev["self"] == pytest.approx(delta[diag].mean().item())
        assert ev["cross"] == pytest.approx(delta[~diag].mean().item())
        assert ev["gap"] == pytest.approx(ev["self"] - ev["cross"])
        assert ev["rnd"]["draws"] == 2 and ev["rnd"]["set_sizes"] == ev["set_sizes"]
        lo, hi = ev["gap_ci"]
        assert lo <= hi and ev["p_gap_vs_rnd"] >= 1 / 3  # the floor with 2 draws
        assert len(ev["delta_ci"]) == len(CULTURES) and ev["direction"]["gap"] == "higher"
    assert (out / "masks" / "cas.safetensors").exists()
    report = (out / "report.md").read_text()
    assert "positive = hurt" in report and "accuracy" not in report.lower()
    assert "RND gap" in report and "[" in report  # intervals and the control are shown
    assert "## Split-half stability" in report and "stability" in eval_json(out, "lap")


def test_resume_after_a_torn_matrix_gives_the_same_numbers(model_dir, tmp_path):
    out = tmp_path / "run"
    argv = ["run", "--model", model_dir, "--out", str(out), *SMALL, "--methods", "cas"]
    assert cli.main(argv) == 0
    before = eval_json(out, "cas")
    log = out / "progress" / "matrix.jsonl"
    lines = log.read_text().splitlines()
    assert len(lines) > 2
    log.write_text("\n".join(lines[:2]) + "\n" + lines[2][:10])  # two groups kept, one torn
    shutil.rmtree(out / "eval")
    assert cli.main([*argv, "--resume"]) == 0
    assert eval_json(out, "cas") == before


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--identify-on", "correct"], "does not apply to --task lm"),
        (["--data", "./cvqa"], "--data faker"),
    ],
)
def test_cli_refuses_lm_misuse_in_one_line(model_dir, tmp_path, capsys, extra, message):
    argv = ["run", "--model", model_dir, "--out", str(tmp_path / "x"), *SMALL, *extra]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_cli_lm_needs_a_model(tmp_path, capsys):
    assert cli.main(["run", "--out", str(tmp_path / "x"), *SMALL]) == 2
    assert "needs --model" in capsys.readouterr().err


def test_runconfig_lm_records_every_item():
    assert RunConfig(task="lm").identify_on == "all"
    assert RunConfig().identify_on == "correct" and RunConfig().task == "mc"
    with pytest.raises(UsageError, match="task"):
        RunConfig(task="qa")


def test_text_lengths_equal_the_encoded_sentences(tiny):
    """The lengths the LM task batches by: each sentence's real tokens in a padded batch."""
    model, processor = tiny
    items = sample_items(4)
    batch = encode_text(model, processor, items)
    want = batch["attention_mask"].sum(dim=1).tolist()
    assert len(set(want)) > 2  # sentences of different lengths: the test can fail
    assert text_lengths(model, processor, items) == want
