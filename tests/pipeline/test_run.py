"""The pipeline's controls and interventions: every method gets RND draws of its own sizes,
steering runs through the same per-row sets (alpha = -1 equals ablation exactly; another alpha
equals an independent forward hook), and a run never mixes two interventions."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import save_cli_assets

from culture_neurons.data import load_cvqa
from culture_neurons.errors import UsageError
from culture_neurons.masks import load_masks
from culture_neurons.models import adapters
from culture_neurons.models.loading import load_model
from culture_neurons.pipeline import cli
from culture_neurons.pipeline.config import RunConfig
from culture_neurons.pipeline.group_log import _read_groups
from culture_neurons.pipeline.run import rnd_draws_of, select_all
from culture_neurons.scoring.multiple_choice import predict
from culture_neurons.stats import Fingerprint, Stats

SMALL = ["--min-items", "4", "--ratio", "0.05", "--rnd-draws", "2", "--batch-size", "4",
         "--identify-on", "all", "--methods", "cas,lap", "--resamples", "50", "--quiet"]  # fmt: skip


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return save_cli_assets(tmp_path_factory.mktemp("run"), "qwen2_5_vl")


def args_for(assets, out, *extra) -> list[str]:
    return ["--model", assets["model"], "--data", assets["data"], "--out", str(out), *SMALL,
            *extra]  # fmt: skip


def eval_json(out, method: str) -> dict:
    return json.loads((out / "eval" / f"{method}.json").read_text())


# -- RND: each method's own sizes ----------------------------------------------------------
def _stats(C: int = 4, L: int = 3, N: int = 40, seed: int = 0) -> Stats:
    """Random statistics (never zeros) in which culture 0 owns few argmax neurons, so cas's
    sets have other sizes than lap's and mad's."""
    gen = torch.Generator().manual_seed(seed)
    fp = Fingerprint("llama", "llama", L, N, 16, "silu", "0" * 64)
    st = Stats.zeros([f"c{i}" for i in range(C)], fp)
    st.T[:] = 1000
    K = torch.randint(1, 900, (C, L, N), generator=gen)
    K[0] = K[0] // 4  # culture 0 rarely the argmax
    st.K[:] = K
    st.S[:] = torch.rand(C, L, N, generator=gen, dtype=torch.float64) * 100
    st.Q[:] = st.S * 2
    return st


@pytest.mark.parametrize("per_layer", [False, True])
def test_every_method_gets_rnd_draws_of_its_own_sizes(per_layer):
    # lape ranks its own share (top_rate): 10 % here too, else 1 % of 40 neurons per layer is 0
    config = RunConfig(ratio=0.1, lape_top_rate=0.1, rnd_draws=3, per_layer=per_layer)
    masks = select_all(_stats(), config)
    methods = {m: masks[m] for m in config.methods}
    nulls = rnd_draws_of(methods, config)
    assert set(nulls) == set(config.methods)
    assert masks["cas"].sizes().tolist() != masks["lap"].sizes().tolist()  # else untested
    for method, names in nulls.items():
        assert len(names) == 3 and len(set(names)) == 3
        for name in names:
            got, want = masks[name], masks[method]
            assert got.method == "rnd"
            assert torch.equal(got.sizes(), want.sizes()), (method, name)
            if per_layer:
                assert torch.equal(got.layer_counts(), want.layer_counts()), (method, name)
    # lap and mad always take k per culture: one series of draws serves both (no extra cost);
    # cas and lape have sizes of their own, hence draws of their own.
    assert nulls["lap"] == nulls["mad"] and nulls["lap"][0].startswith("rnd-lap+mad-")
    assert nulls["cas"] != nulls["lap"] and nulls["lape"] != nulls["lap"]
    # The draws are uniform: independent of the method's own sets beyond their sizes.
    overlap = [len(set(masks[n].flat_of(s).tolist()) & set(masks["cas"].flat_of(s).tolist()))
               for n in nulls["cas"] for s in range(4)]  # fmt: skip
    assert sum(overlap) < sum(masks["cas"].sizes().tolist()) * 3 / 2


def same_sets(a, b) -> bool:
    return torch.equal(a.indptr, b.indptr) and torch.equal(a.flat, b.flat)


def test_rnd_draws_are_seeded_by_sizes_not_by_method_order():
    st = _stats()
    a = select_all(st, RunConfig(ratio=0.1, rnd_draws=2, methods=("lap", "cas")))
    b = select_all(st, RunConfig(ratio=0.1, rnd_draws=2, methods=("cas",)))
    # The same sets (their options name the run's methods, which differ here).
    assert same_sets(a["rnd-cas-0"], b["rnd-cas-0"]) and same_sets(a["rnd-cas-1"], b["rnd-cas-1"])
    c = select_all(st, RunConfig(ratio=0.1, rnd_draws=2, methods=("cas",), seed=1))
    assert not same_sets(c["rnd-cas-0"], b["rnd-cas-0"])
    none = select_all(st, RunConfig(ratio=0.1, rnd_draws=0, methods=("cas",)))
    assert list(none) == ["cas"]


def test_selector_options_reach_the_selectors():
    st = _stats()
    config = RunConfig(ratio=0.1, cas_normalize=True, mad_contrast="max", lape_top_rate=0.05,
                       lape_filter_rate=0.5, lape_bar_ratio=0.6, rnd_draws=0)  # fmt: skip
    masks = select_all(st, config)
    assert masks["cas"].options["normalize"] is True
    assert masks["mad"].options["contrast"] == "max"
    lape = masks["lape"].options
    assert (lape["top_rate"], lape["filter_rate"], lape["bar_ratio"]) == (0.05, 0.5, 0.6)
    assert masks["lap"].options["ratio"] == 0.1 and "top_rate" not in masks["lap"].options
    default = select_all(st, RunConfig(ratio=0.1, rnd_draws=0, methods=("lape",)))
    assert default["lape"].options["top_rate"] == 0.01  # its own option, not --ratio


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"mad_contrast": "min"}, "--mad-contrast"),
    ({"lape_top_rate": 1.5}, "--lape-top-rate"),
    ({"rnd_draws": -1}, "--rnd-draws"),
    ({"resamples": 0}, "--resamples"),
    ({"intervention": "zero"}, "--intervention"),
    ({"alpha": 0.5}, "--intervention steer"),
    ({"intervention": "steer", "alpha": 0}, "changes nothing"),
    ({"methods": ("rnd",)}, "size-matched control"),
])  # fmt: skip
def test_bad_options_are_refused_naming_them(kwargs, message):
    with pytest.raises(UsageError, match=message):
        RunConfig(**kwargs)


def test_intervention_defaults():
    assert RunConfig().alpha == -1.0 and RunConfig(intervention="steer").alpha == 0.5
    assert RunConfig(intervention="steer", alpha=-0.5).alpha == -0.5


def test_progress_of_another_key_is_never_reused(tmp_path):
    """The matrix log is keyed on everything that changes a prediction (the intervention and
    alpha among them): groups of another key are dropped, a torn last line ignored."""
    log = tmp_path / "matrix.jsonl"
    recs = [{"key": "ablate", "group": 0, "items": ["a"], "preds": [[1], [2]]},
            {"key": "steer 0.5", "group": 1, "items": ["b"], "preds": [[1], [2]]},
            {"group": 2, "items": ["c"], "preds": [[1], [2]]}]  # fmt: skip
    log.write_text("\n".join(json.dumps(r) for r in recs) + '\n{"key": "abl')
    assert sorted(_read_groups(log, "ablate")) == [0]
    assert sorted(_read_groups(log, "steer 0.5")) == [1]


# -- the command line: methods without cas, steering ---------------------------------------
@pytest.mark.parametrize("methods", ["lap", "lape,mad"])
def test_methods_without_cas_run_with_their_own_controls(assets, tmp_path, methods):
    out = tmp_path / "run"
    argv = args_for(assets, out)
    argv[argv.index("--methods") + 1] = methods
    assert cli.main(["run", *argv]) == 0
    for method in methods.split(","):
        ev = eval_json(out, method)
        assert ev["rnd"]["draws"] == 2 and ev["rnd"]["set_sizes"] == ev["set_sizes"]
        assert ev["p_resolution"] == pytest.approx(1 / 3**3)  # 3 sets per culture, 3 cultures


def test_options_reach_run_json_masks_and_report(assets, tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('mad_contrast = "max"\nlape_top_rate = 0.05\nresamples = 60\n')
    out = tmp_path / "run"
    argv = args_for(assets, out, "--methods", "mad,lape,cas", "--cas-normalize", "--config",
                    str(cfg), "--lape-bar-ratio", "0.9")  # fmt: skip
    assert cli.main(["run", *argv]) == 0
    config = json.loads((out / "run.json").read_text())["config"]
    assert (config["mad_contrast"], config["lape_top_rate"], config["lape_bar_ratio"],
            config["cas_normalize"], config["resamples"]) == ("max", 0.05, 0.9, True, 50)
    assert eval_json(out, "mad")["options"]["contrast"] == "max"
    assert eval_json(out, "lape")["options"]["top_rate"] == 0.05
    assert eval_json(out, "cas")["options"]["normalize"] is True
    assert eval_json(out, "cas")["resamples"] == 50  # the command line beats the file
    report = (out / "report.md").read_text()
    assert "mad contrast = max" in report and "cas normalize = True" in report
    assert "lape top_rate / filter_rate / bar_ratio = 0.05 / 0.95 / 0.9" in report


def test_steering_at_alpha_minus_one_is_ablation_exactly(assets, tmp_path):
    ablate, steer = tmp_path / "ablate", tmp_path / "steer"
    assert cli.main(["run", *args_for(assets, ablate)]) == 0
    assert cli.main(["run", *args_for(assets, steer, "--intervention", "steer", "--alpha",
                                      "-1")]) == 0  # fmt: skip
    for method in ("cas", "lap"):
        a, s = eval_json(ablate, method), eval_json(steer, method)
        assert (a["intervention"], a["alpha"]) == ("ablate", -1.0)
        assert (s["intervention"], s["alpha"]) == ("steer", -1.0)
        for key in ("accuracy", "delta", "flip", "delta_ci", "gap", "gap_ci", "p_gap_vs_rnd",
                    "specificity", "rnd"):  # fmt: skip
            assert a[key] == s[key], (method, key)


def test_steering_equals_an_independent_hook(assets, tmp_path):
    """alpha = 0.5 through the pipeline: every culture's set of every method, scored on every
    evaluation item, equals a plain forward hook that scales those neurons' down_proj inputs
    (a = act(gate) times up at the same neurons: scaling either is the same) by 1.5."""
    out = tmp_path / "steer"
    assert cli.main(["run", *args_for(assets, out, "--intervention", "steer", "--alpha", "0.5",
                                      "--rnd-draws", "0", "--backend", "hooks")]) == 0  # fmt: skip
    full = json.loads((out / "eval" / "full.json").read_text())
    model, processor = load_model(assets["model"], "float32", "cpu")
    data = load_cvqa(assets["data"], min_items=4)
    by_id = {it.id: it for it in data}
    items = [by_id[i] for i in full["items"]]
    labels = torch.tensor(full["label"])
    culture = torch.tensor(full["culture"])
    mlps = adapters.decoder_mlps(model)
    for method in ("cas", "lap"):
        ev = eval_json(out, method)
        masks = load_masks(out / "masks" / f"{method}.safetensors")
        C = len(ev["cultures"])
        for s in range(C):
            pairs = masks.pairs(s).tolist()  # (layer, neuron)
            handles = []
            for layer, mlp in enumerate(mlps):
                cols = [n for l_, n in pairs if l_ == layer]

                def scale(module, args, cols=cols):
                    h = args[0].clone()
                    h[..., cols] *= 1.5
                    return (h,)

                handles.append(mlp.down_proj.register_forward_pre_hook(scale))
            try:
                pred = predict(model, processor, items, batch_size=4)
            finally:
                for h in handles:
                    h.remove()
            for c in range(C):
                own = culture == c
                acc = 100 * (pred[own] == labels[own]).double().mean().item()
                assert ev["accuracy"][s][c] == pytest.approx(acc, abs=1e-9), (method, s, c)
                flip = (pred[own] != torch.tensor(full["pred"])[own]).double().mean().item()
                assert ev["flip"][s][c] == pytest.approx(flip, abs=1e-9), (method, s, c)


def test_a_run_holds_one_intervention(assets, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["run", *args_for(assets, out)]) == 0
    capsys.readouterr()
    code = cli.main(["evaluate", "--out", str(out), "--intervention", "steer", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error:") and "--intervention" in err[-1], err
    assert eval_json(out, "cas")["intervention"] == "ablate"  # left as it was
