"""The option table: flags, --help, the --config file and the defaults all come from it."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import assert_refused

from culture_neurons.pipeline import cli, options
from culture_neurons.pipeline.config import RunConfig
from culture_neurons.pipeline.options import COMMANDS, OPTIONS, Option


def help_of(command: str, capsys) -> str:
    assert cli.main([command, "--help"]) == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


def test_every_run_setting_is_an_option_with_runconfigs_default():
    table = options.by_name()
    for f in dataclasses.fields(RunConfig):
        assert f.name in table and table[f.name].commands, f.name  # no config-only key
        # None: decided by the data (identify_on) or the intervention (alpha), as help says
        if f.name in ("identify_on", "alpha"):
            assert table[f.name].default_value is None
            continue
        default = getattr(RunConfig(), f.name)
        assert table[f.name].default_value == (tuple(default) if isinstance(default, tuple)
                                               else default), f.name  # fmt: skip


def flags_of(command: str) -> dict[str, str]:
    """``{flag: help}`` of every option ``command`` shows (read from the parser itself)."""
    parser = options.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return {a.option_strings[0]: a.help for a in sub._actions
            if a.option_strings and a.dest != "help"}  # fmt: skip


@pytest.mark.parametrize("command", list(COMMANDS))
def test_16_each_command_shows_its_options_with_defaults(command):
    shown = flags_of(command)
    assert set(shown) == {o.flag for o in OPTIONS if command in o.commands}
    for opt in OPTIONS:
        if opt.flag in shown and not opt.switch:
            assert "(default: " in shown[opt.flag], (command, opt.flag)


def test_16_help_says_what_each_choice_means(capsys):
    text = help_of("record", capsys)
    for phrase in ("last = the answer position only", "post = act(gate_proj(x)) * up_proj(x)",
                   "pair = a (language, country) pair", "local = the original language",
                   "correct; all when the data's labels are hidden"):  # fmt: skip
        assert phrase in text, phrase
    assert "--ratio" not in text and "--model" in text  # record selects nothing
    assert "--model" not in help_of("select", capsys)  # select needs no model
    assert "--scope" not in help_of("evaluate", capsys)  # evaluate keeps the run's


@pytest.mark.parametrize(
    ("toml", "needles"),
    [
        ('ratio = "abc"\n', ["ratio in", "must be a number, got 'abc'"]),
        ('batch_size = "eight"\n', ["batch_size in", "must be an integer, got 'eight'"]),
        ("per_layer = 1\n", ["per_layer in", "must be true or false"]),
        ('scope = "everything"\n', ["scope in", "'everything' is not one of all, text"]),
        ('methods = "cas,foo"\n', ["methods in", "unknown foo"]),
        ("batch_size = 0\n", ["batch_size in", "must be >= 1, got 0"]),
        ('rnd_likes = "cas"\n', ["unknown keys rnd_likes"]),
        ("ratio = \n", ["cannot read config file"]),
    ],
)
def test_9_config_file_values_are_checked_as_flags(tmp_path, capsys, toml, needles):
    cfg = tmp_path / "c.toml"
    cfg.write_text(toml)
    out = tmp_path / "out"
    assert_refused(["select", "--out", str(out), "--config", str(cfg)], capsys, *needles,
                   watch=[tmp_path])  # fmt: skip


def test_config_values_take_their_type(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('ratio = 1\nmethods = ["cas", "mad"]\ncultures = "a, b"\nper_layer = true\n')
    o = options.read(options.build_parser().parse_args(["run", "--config", str(cfg)]))
    assert o["ratio"] == 1.0 and isinstance(o["ratio"], float)
    assert o["methods"] == ("cas", "mad") and o["cultures"] == ("a", "b") and o["per_layer"]
    assert set(o.given) == {"ratio", "methods", "cultures", "per_layer", "config"}


def test_command_line_errors_are_one_line(tmp_path, capsys):
    assert_refused(["run", "--dtype", "foo"], capsys, "--dtype", "invalid choice", "--help")
    assert_refused(["run", "--batch-size", "eight"], capsys, "invalid int value")
    assert_refused(["record", "--ratio", "0.1"], capsys, "record takes no --ratio 0.1",
                   "culture-neurons record --help")  # fmt: skip


def test_10_device_is_checked_before_the_toy_is_built(tmp_path, capsys, monkeypatch):
    import torch

    from culture_neurons.demo import toy

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --device cuda is valid here")

    def no_toy(*a, **k):
        raise AssertionError("the toy was built before --device was checked")

    monkeypatch.setattr(toy, "toy", no_toy)
    out = tmp_path / "out"
    assert_refused(["run", "--device", "cuda", "--out", str(out)], capsys, "--device cuda",
                   "no CUDA GPU", watch=[tmp_path])  # fmt: skip


def test_10_the_toy_is_placed_as_asked():
    import torch

    from culture_neurons.models.loading import place
    from culture_neurons.testing.tiny import tiny_model

    model = place(tiny_model("llama"), "bfloat16", "cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in place(tiny_model("llama"), "auto").parameters()} == {torch.float32}


def test_an_option_is_one_table_entry(tmp_path, monkeypatch):
    """A new entry is a flag of its commands, a config key checked by its type, and a
    default stated in --help: nothing else to write."""
    extra = Option("alpha_x", "steering strength", ("evaluate",), "evaluation", type=float,
                   default=0.5, minimum=-1)  # fmt: skip
    monkeypatch.setattr(options, "OPTIONS", (*OPTIONS, extra))
    parser = options.build_parser()
    assert options.read(parser.parse_args(["evaluate", "--alpha-x", "0.7"]))["alpha_x"] == 0.7
    assert options.read(parser.parse_args(["evaluate"]))["alpha_x"] == 0.5
    cfg = tmp_path / "c.toml"
    cfg.write_text("alpha_x = -2\n")
    with pytest.raises(Exception, match="alpha_x in .* must be >= -1"):
        options.read(parser.parse_args(["evaluate", "--config", str(cfg)]))
    with pytest.raises(SystemExit):
        parser.parse_args(["record", "--alpha-x", "1"])  # not one of its commands


def test_choices_and_bounds_come_from_their_owners():
    """Each option's choices are its owner's tuple (in its order), and a RunConfig setting's
    bound lives on RunConfig only: the command line and RunConfig(...) refuse it alike."""
    from culture_neurons.data.schema import GROUPINGS, LANGUAGES, ON_ERROR
    from culture_neurons.instrument.instrument import BACKENDS
    from culture_neurons.models.loading import DTYPE_CHOICES
    from culture_neurons.pipeline import config
    from culture_neurons.scoring.multiple_choice import SCORINGS
    from culture_neurons.selection.methods import CONTRASTS, METHODS
    from culture_neurons.stats import ACTIVATIONS, SCOPES

    owners = {"dtype": DTYPE_CHOICES, "backend": BACKENDS, "task": config.TASKS,
              "grouping": GROUPINGS, "language": LANGUAGES, "on_error": ON_ERROR,
              "scope": SCOPES, "activation": ACTIVATIONS, "identify_on": config.IDENTIFY_ON,
              "scoring": SCORINGS, "methods": tuple(m for m in METHODS if m != "rnd"),
              "mad_contrast": CONTRASTS, "intervention": config.INTERVENTIONS,
              "matrix": config.MATRIX_MODES}  # fmt: skip
    assert {o.name for o in OPTIONS if o.choices} == set(owners)
    for name, owned in owners.items():
        assert tuple(options.by_name()[name].choices) == tuple(owned), name

    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    bounded = {n: f.metadata["minimum"] for n, f in fields.items()
               if f.metadata.get("minimum") is not None}  # fmt: skip
    assert bounded == {"batch_size": 1, "resamples": 1, "rnd_draws": 0, "checkpoint_every": 0,
                       "checkpoint_minutes": 0, "screen_budget": 0,
                       "max_image_tokens": 1, "estimate_memory_gib": 0.01}  # fmt: skip
    for opt in OPTIONS:
        if opt.name in fields:
            assert opt.minimum is None, f"{opt.name}: its bound belongs to RunConfig"
    for name, minimum in bounded.items():
        default = RunConfig.__dataclass_fields__[name].default
        below = minimum - 1 if default is None else type(default)(minimum - 1)  # None: an int
        expected = f"must be >= {minimum:g}, got {below}"
        with pytest.raises(options.UsageError) as from_python:
            RunConfig(**{name: below})
        with pytest.raises(options.UsageError) as from_cli:
            options.check(options.by_name()[name], below, config.flag(name))
        assert str(from_python.value) == str(from_cli.value) == f"{config.flag(name)} {expected}"
    # A share: RunConfig refuses it whatever path built it.
    for name in ("ratio", "split_ratio", "lape_top_rate", "lape_filter_rate", "lape_bar_ratio"):
        with pytest.raises(options.UsageError, match=rf"{config.flag(name)} must be a share"):
            RunConfig(**{name: 1.5})
