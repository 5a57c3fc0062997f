"""The command line's options: ONE table (:data:`OPTIONS`) from which the argparse flags, the
``--config FILE.toml`` validation and the defaults are all derived.

An entry names an option (the config key; its flag is ``--`` + the name with dashes), its type,
its default (for a :class:`~culture_neurons.pipeline.config.RunConfig` field, RunConfig's own:
the API and the command line share it), its choices and what each means, its help, which
commands show it and, for options that are not RunConfig fields, the step that fixes it (see
:mod:`culture_neurons.pipeline.rundir`). Adding an option is one entry here (and, for a setting
of the run, its RunConfig field). ``--help`` states every default and every choice's meaning.

Values come from, in increasing precedence: the defaults, the ``--config`` file (any option
of any command; types and choices checked as for the flags; keys a command does not use are
ignored, unless they contradict the run), the command line.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from culture_neurons import tasks
from culture_neurons.data.schema import GROUPINGS, LANGUAGES, ON_ERROR
from culture_neurons.errors import UsageError
from culture_neurons.instrument.instrument import BACKENDS
from culture_neurons.models.loading import DTYPE_CHOICES
from culture_neurons.pipeline.config import (
    IDENTIFY_ON,
    INTERVENTIONS,
    MATRIX_MODES,
    SAMPLE_SHARE,
    SCREEN_BUDGET,
    TASKS,
    RunConfig,
    check_minimum,
    flag,
    minimum_of,
    step_of,
)
from culture_neurons.scoring.multiple_choice import SCORINGS
from culture_neurons.selection.methods import CONTRASTS
from culture_neurons.selection.methods import SELECTORS as SELECTOR_NAMES
from culture_neurons.stats import ACTIVATIONS, SCOPES
from culture_neurons.tasks.lm import FAKER_DATA, FAKER_SENTENCES

COMMANDS = {
    "run": "the whole experiment: record, select, evaluate, report",
    "record": "identification statistics only (OUT/stats.*)",
    "select": "masks of every method from OUT/stats (no model needed)",
    "evaluate": "the ablation matrices of the masks in OUT (OUT/eval)",
    "report": "report.md and figures from OUT (no model needed)",
    "merge": "add statistics of separate jobs (record --shard) into --out",
    "compare": "one report over finished runs: depth profiles, effects, overlaps, stability "
               "(no model needed)",
}
LATER = ("With --resume, and for select, evaluate and report, an option not given takes the "
         "run's value (OUT/run.json); a differing one is refused, or recorded where the step "
         "may change it.")  # fmt: skip
MODEL = ("run", "record", "evaluate")  # the commands that load the model
RECORD = ("run", "record")  # the commands that read the data and record statistics
FROM_CONFIG = object()  # default: the RunConfig field's


def described(owned: tuple[str, ...], meanings: dict[str, str]) -> dict[str, str]:
    """The choices of an option: its owner's tuple, in the owner's order, each with what it
    means here ("" where the name says it). A meaning for a name the owner does not have is a
    mistake of this table, refused when the package loads."""
    stray = set(meanings) - set(owned)
    if stray:
        raise RuntimeError(f"option choices {sorted(stray)} are not among {owned}")
    return {name: meanings.get(name, "") for name in owned}


SELECTORS = described(SELECTOR_NAMES, {
    "cas": "ConAct margin of the top culture's firing probability over the runner-up",
    "lap": "firing probability",
    "lape": "low entropy of the probability across cultures (Tang et al. 2024)",
    "mad": "mean activation minus the other cultures' mean"})  # fmt: skip


@dataclass(frozen=True)
class Option:
    """One option of the command line (see the module docstring)."""

    name: str
    help: str
    commands: tuple[str, ...]
    group: str
    type: type = str  # str, int, float, bool (--x / --no-x), list (comma-separated strings)
    default: object = FROM_CONFIG
    choices: dict[str, str] = field(default_factory=dict)  # value -> what it means
    minimum: float | None = None  # options that are not RunConfig fields (theirs: RunConfig's)
    default_text: str = ""  # how --help states the default where the value alone misleads
    switch: bool = False  # a bare flag (--resume), never a setting of the run
    step: str = "exec"  # for options that are not RunConfig fields

    @property
    def flag(self) -> str:
        return flag(self.name)

    @property
    def default_value(self):
        if self.default is not FROM_CONFIG:
            return self.default
        f = {f.name: f for f in fields(RunConfig)}[self.name]
        value = f.default if f.default is not MISSING else f.default_factory()
        return tuple(value) if isinstance(value, (list, tuple)) else value

    @property
    def run_step(self) -> str:
        """The step that fixes this option (RunConfig's for its fields)."""
        return step_of(self.name) or self.step


OPTIONS: tuple[Option, ...] = (
    # -- model ------------------------------------------------------------------------------
    Option("model", "hub id or local folder of a supported VLM (a text-only LM with --task lm)",
           MODEL, "model", default=None,
           default_text="the embedded toy VLM when --data is not given either; evaluate: the "
           "run's"),
    Option("dtype", "weights' dtype", MODEL, "model", default="auto",
           choices=described(DTYPE_CHOICES, {"auto": "the checkpoint's own on GPU, float32 "
                                                 "on CPU"})),
    Option("device", "where the model runs: auto (a GPU if there is one, the local rank's "
           "under torchrun), cpu, cuda, cuda:N, or map (spread a model larger than one GPU "
           "over all of them)", MODEL, "model", default="auto"),
    Option("backend", "how the decoder MLPs are instrumented (same numbers)", MODEL, "model",
           choices=described(BACKENDS, {
               "auto": "fused on CUDA (the Triton kernel), hooks elsewhere (measured faster "
               "on CPUs, bench/RESULTS.md)",
               "fused": "the MLP's forward replaced by one op (a Triton kernel on GPU)",
               "hooks": "plain PyTorch forward hooks (the reference)"})),
    Option("batch_size", "rows per forward", MODEL, "model", type=int,
           default_text="8; 128 on the embedded toy"),
    Option("max_image_tokens", "at most this many image tokens per image, applied as the "
           "family's processor allows: Qwen2-VL / Qwen2.5-VL lower max_pixels (tiles of 28 x "
           "28 pixels, one token each), LLaVA-NeXT keeps the tile grids within it, LLaVA-1.5 "
           "and Gemma 3 have a fixed count (a smaller budget is refused)", MODEL, "model",
           type=int, default_text="the processor's own (Qwen2.5-VL: up to 16,384 "
           "tokens for one image)"),
    # -- data -------------------------------------------------------------------------------
    Option("task", "what the items are", RECORD, "data",
           choices=described(TASKS, {name: task.description
                                     for name, task in tasks.TASKS.items()})),
    Option("data", "mc: CVQA as a parquet file or folder or a datasets save_to_disk folder; lm: "
           f"'{FAKER_DATA}' (Faker locales' sentences; --cultures picks locales, --max-items "
           f"sentences per culture, default {FAKER_SENTENCES})", MODEL, "data", default=None,
           default_text="the embedded toy's synthetic CVQA; evaluate: the run's"),
    Option("cultures", "comma-separated culture names", RECORD, "data", type=list, default=None,
           step="identify", default_text="every culture with at least --min-items items"),
    Option("grouping", "what a culture is", RECORD, "data", default="pair", step="identify",
           choices=described(GROUPINGS, {"pair": "a (language, country) pair, CVQA's own",
                                         "country": "a country, its languages together"})),
    Option("min_items", "drop cultures with fewer items", RECORD, "data", type=int, default=10,
           minimum=1, step="identify"),
    Option("language", "the language of questions and options", RECORD, "data", default="en",
           step="identify", choices=described(LANGUAGES, {"en": "CVQA's English translations",
                                                          "local": "the original language"})),
    Option("max_items", "at most this many items per culture (chosen by a hash of their ids)",
           RECORD, "data", type=int, default=None, minimum=1, step="identify",
           default_text="all"),
    Option("on_error", "malformed items", RECORD, "data", default="raise", step="identify",
           choices=described(ON_ERROR, {"raise": "stop at the first, naming it",
                                        "skip": "skip them, counted in one warning"})),
    Option("split_ratio", "identification share of each culture's items (the rest is "
           "evaluated)", RECORD, "data", type=float),
    Option("seed", "seed of the identification/evaluation split, the RND draws and the "
           "bootstrap resamples", RECORD, "data", type=int),
    # -- statistics -------------------------------------------------------------------------
    Option("scope", "the tokens counted", RECORD, "statistics",
           choices=described(SCOPES, {
               "all": "every non-pad prompt token, image tokens included",
               "text": "text tokens only", "image": "image tokens only",
               "last": "the answer position only"})),
    Option("activation", "the activation recorded (and ablated)", RECORD, "statistics",
           choices=described(ACTIVATIONS, {
               "gate": "act(gate_proj(x)), as LAPE",
               "post": "act(gate_proj(x)) * up_proj(x), the input of down_proj"})),
    Option("identify_on", "the identification items whose statistics are recorded", RECORD,
           "statistics", default=None,
           choices=described(IDENTIFY_ON, {"correct": "those the full model answers correctly",
                                           "all": "every one"}),
           default_text="correct; all when the data's labels are hidden (said in a notice) "
           "and for --task lm"),
    Option("scoring", "how an answer is read (also for --identify-on correct)", RECORD,
           "statistics", choices=described(SCORINGS, {
               "logits": "argmax of the option letters' next-token logits (one prefill, "
               "deterministic)", "generate": "greedy generation, the first letter parsed"})),
    Option("halves", "also record the two halves of the identification items (split by a "
           "hash of the item id) in the same forwards, for each method's split-half stability "
           "(the statistics totals double: 636 MB instead of 318 MB at Qwen2.5-VL-7B width "
           "with 25 cultures)", RECORD, "statistics", type=bool),
    Option("checkpoint_minutes", "wall time between statistics checkpoints (each writes C x "
           "L x N x 24 bytes, 318 MB at paper scale)", RECORD, "statistics", type=float),
    Option("checkpoint_every", "also checkpoint every this many identification batches (0: by "
           "time only)", RECORD, "statistics", type=int),
    # -- selection --------------------------------------------------------------------------
    Option("methods", "comma-separated selectors", ("run", "select"), "selection", type=list,
           choices=SELECTORS),
    Option("ratio", "share of all L x N neurons selected per culture by cas, lap and mad",
           ("run", "select"), "selection", type=float,
           default_text="0.005 = 0.5 %; 0.1 on the embedded toy, whose 288 neurons would "
           "leave 1"),
    Option("per_layer", "select the top ratio of every layer instead of across layers",
           ("run", "select"), "selection", type=bool),
    Option("cas_normalize", "cas: rank the firing probability normalised over cultures",
           ("run", "select"), "selection", type=bool),
    Option("mad_contrast", "mad: what a culture's mean activation is compared with",
           ("run", "select"), "selection",
           choices=described(CONTRASTS, {"mean": "the other cultures' mean",
                                         "max": "the largest other culture's"})),
    Option("lape_top_rate", "lape: share of all L x N neurons kept by lowest entropy, then "
           "assigned to every culture above the bar (its own option: --ratio does not apply)",
           ("run", "select"), "selection", type=float, default_text="0.01 = 1 %, as Tang et "
           "al. 2024"),
    Option("lape_filter_rate", "lape: a neuron is kept only if some culture's probability "
           "passes this order statistic of all probabilities", ("run", "select"), "selection",
           type=float),
    Option("lape_bar_ratio", "lape: a kept neuron belongs to every culture whose probability "
           "passes this order statistic", ("run", "select"), "selection", type=float),
    Option("rnd_draws", "random control draws per method: uniform sets of exactly that "
           "method's per-culture sizes (methods of identical sizes share them; 0: no control). "
           "Cost: each draw is one more condition per culture, the matrix runs 1 + cultures x "
           "(methods + size groups x draws) conditions. p-values recombine the draws' "
           "per-culture rows; more draws, more power where an effect sits in a few cultures",
           ("run", "select"), "selection", type=int),
    # -- evaluation -------------------------------------------------------------------------
    Option("resamples", "bootstrap resamples of the evaluation items, for every 95 % interval "
           "and p-value (no model work)", ("run", "evaluate"), "evaluation", type=int),
    Option("intervention", "what is done to each culture's selected neurons (a run holds one: "
           "give another its own --out)", MODEL, "evaluation",
           choices=described(INTERVENTIONS, {"ablate": "a := 0", "steer": "a := (1 + alpha) a"})),
    Option("alpha", "steering factor of --intervention steer (negative damps; -1 equals "
           "ablation)", MODEL, "evaluation", type=float,
           default_text="0.5 with --intervention steer (the authors' follow-up work); -1 "
           "with ablate"),
    Option("matrix", "how the ablation matrix is computed", ("run", "evaluate"), "evaluation",
           choices=described(MATRIX_MODES, {
               "exact": "one prefill per item and condition",
               "estimate": "first order from one forward and backward per batch of items (every "
               "set at once; every number marked estimated)",
               "screen": "estimate, then the diagonal and each mask's --screen-budget most "
               "affected cells exactly (the rest marked estimated)",
               "sample": "exact prefills: the diagonal on every item, the other cells on a "
               "--sample-share of each culture's items (the same for every set; every test "
               "stays exact, with less power)"})),
    Option("estimate_memory_gib", "--matrix estimate/screen: GiB the estimate's forward and "
           "backward may hold above the weights; the items per batch follow from it and the "
           "longest prompt (at most --batch-size; docs/scale.md)", ("run", "evaluate"),
           "evaluation", type=float, default_text="none: --batch-size items per batch"),
    Option("screen_budget", "--matrix screen: off-diagonal cells per mask (method or RND draw) "
           "confirmed exactly at first, those the estimate finds most affected (more are "
           "confirmed where the estimate drifts or a verdict depends on it); each costs one "
           "condition on one culture's items", ("run", "evaluate"), "evaluation", type=int,
           default_text=f"{SCREEN_BUDGET} under --matrix screen; refused with another --matrix"),
    Option("sample_share", "--matrix sample: the share of each culture's items (at least 2) "
           "computed under the other cultures' sets, drawn from the item ids and --seed; "
           "intervals are reliable from 20 such items per culture", ("run", "evaluate"),
           "evaluation", type=float,
           default_text=f"{SAMPLE_SHARE} under --matrix sample; refused with another --matrix"),
    Option("reuse_vision", "run the vision tower once per item group and reuse its output "
           "under every ablation (same numbers, fewer passes)", ("run", "evaluate"),
           "evaluation", type=bool),
    # -- output -----------------------------------------------------------------------------
    Option("out", "output dir", tuple(COMMANDS), "output", default="culture-neurons-out"),
    Option("config", "TOML file with any of these options (keys with underscores); the "
           "command line wins", tuple(c for c in COMMANDS if c not in ("merge", "compare")),
           "output",
           default=None),
    Option("quiet", "no progress bars or notices (warnings and errors still)", tuple(COMMANDS),
           "output", type=bool, default=False, switch=True),
    Option("resume", "continue the run in --out with its settings (an interrupted one, or "
           "after an error)", RECORD, "output", type=bool, default=False, switch=True),
    Option("overwrite", "replace the results already in --out (select: the masks and what "
           "was evaluated with them; merge: the statistics and everything made from them; "
           "compare: the report and figures)",
           ("run", "record", "select", "merge", "compare"), "output", type=bool, default=False,
           switch=True),
    Option("shard", "i/n: record only shard i of n of the items (a job array's task; add the "
           "shards with `merge`)", ("record",), "output", default=None),
)  # fmt: skip
GROUPS = ("model", "data", "statistics", "selection", "evaluation", "output")


def by_name() -> dict[str, Option]:
    return {o.name: o for o in OPTIONS}


def steps() -> dict[str, str]:
    """The step that fixes each option (see :mod:`culture_neurons.pipeline.rundir`)."""
    return {o.name: o.run_step for o in OPTIONS}


# -- the parser ---------------------------------------------------------------------------------
class Parser(argparse.ArgumentParser):
    """argparse with the package's one-line errors (exit 2)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        ns, extras = self.parse_known_args(args, namespace)
        if extras:  # name the command whose options these are not
            command = getattr(ns, "command", None)
            prog = f"{self.prog} {command}" if command else self.prog
            self.exit(2, f"error: {command or self.prog} takes no {' '.join(extras)} (see "
                         f"{prog} --help)\n")  # fmt: skip
        return ns


def _help(opt: Option) -> str:
    text = opt.help
    if any(opt.choices.values()):  # what each choice means (bare names are in the usage)
        text += ": " + "; ".join(f"{k} = {v}" if v else k for k, v in opt.choices.items())
    if not opt.switch:
        default = opt.default_text or _show(opt.default_value)
        text += f" (default: {default})"
    return text.replace("%", "%%")


def _show(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    if isinstance(value, bool):
        return "on" if value else "off"
    return "none" if value is None else str(value)


def add_options(parser: argparse.ArgumentParser, command: str) -> None:
    """The flags of ``command``, grouped, each from its table entry."""
    groups = {g: parser.add_argument_group(g) for g in GROUPS}
    for opt in OPTIONS:
        if command not in opt.commands:
            continue
        g, kw = groups[opt.group], {"help": _help(opt)}
        if command in ("merge", "compare") and opt.name == "out":
            kw["required"] = True
        if opt.switch:
            g.add_argument(opt.flag, action="store_true", default=None, **kw)
        elif opt.type is bool:
            g.add_argument(opt.flag, action=argparse.BooleanOptionalAction, default=None, **kw)
        else:
            if opt.choices and opt.type is not list:
                kw["choices"] = list(opt.choices)
            kw["metavar"] = {list: "A,B,...", int: "N", float: "X"}.get(opt.type)
            kw = {k: v for k, v in kw.items() if v is not None}
            g.add_argument(opt.flag, type=opt.type if opt.type in (int, float) else str, **kw)


def build_parser() -> Parser:
    from culture_neurons import __version__

    parser = Parser(prog="culture-neurons", argument_default=argparse.SUPPRESS,
                    description="Find culture-sensitive neurons in vision-language models and "
                    "test them by ablation. With no --model and --data, runs on the embedded "
                    "toy.")  # fmt: skip
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=Parser)  # fmt: skip
    for name, help_ in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=f"{help_}. {LATER}",
                           argument_default=argparse.SUPPRESS)  # fmt: skip
        if name == "merge":
            p.add_argument("inputs", nargs="+", help="output dirs (or their stats.json) to add, "
                           "each once; shards of `record --shard` all of them")  # fmt: skip
        if name == "compare":
            p.add_argument("inputs", nargs="+", help="output dirs of finished runs (two or "
                           "more)")  # fmt: skip
        add_options(p, name)
    return parser


# -- values -------------------------------------------------------------------------------------
@dataclass
class Options:
    """The options of one command: ``values`` of every table option, and ``given``: how each
    option that the user gave was given (``"--ratio"`` or ``"ratio in run.toml"``)."""

    command: str
    values: dict
    given: dict[str, str]
    inputs: list[str] = field(default_factory=list)  # merge's

    def __getitem__(self, name: str):
        return self.values[name]


def check(opt: Option, value, where: str):
    """``value`` of ``opt`` in its type (a list from a comma-separated string), or a one-line
    UsageError naming ``where`` it came from."""
    kinds = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
             list: "comma-separated names (or a list of strings)"}  # fmt: skip
    ok = {
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        bool: isinstance(value, bool),
        str: isinstance(value, str),
        list: isinstance(value, str)
        or (isinstance(value, list) and all(isinstance(v, str) for v in value)),
    }[opt.type]
    if value is None and opt.default_value is None:
        return None
    if not ok:
        raise UsageError(f"{where} must be {kinds[opt.type]}, got {value!r}")
    if opt.type is float:
        value = float(value)
    if opt.type is list:
        items = value.split(",") if isinstance(value, str) else value
        value = tuple(v.strip() for v in items if v.strip())
        bad = [v for v in value if opt.choices and v not in opt.choices]
        if bad:
            raise UsageError(f"{where}: unknown {', '.join(bad)}; choose from "
                             f"{', '.join(opt.choices)}")  # fmt: skip
    elif opt.choices and value not in opt.choices:
        raise UsageError(f"{where} {value!r} is not one of {', '.join(opt.choices)}")
    # A RunConfig field's bound is stated on the field (a share's is checked when the run's
    # RunConfig is built, naming the flag); the others' on their entry.
    check_minimum(value, opt.minimum if step_of(opt.name) is None else minimum_of(opt.name),
                  where)  # fmt: skip
    return value


def read(args: argparse.Namespace) -> Options:
    """Defaults < the --config file < the command line, every value checked by its entry."""
    cli = {k: v for k, v in vars(args).items() if v is not None}
    command = cli.pop("command")
    inputs = cli.pop("inputs", [])
    table = by_name()
    values = {o.name: o.default_value for o in OPTIONS}
    given: dict[str, str] = {}
    if cli.get("config"):
        path = Path(cli["config"])
        try:
            loaded = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise UsageError(f"cannot read config file {path}: {e}") from e
        unknown = sorted(set(loaded) - set(table) | {"config"} & set(loaded))
        if unknown:
            raise UsageError(f"config file {path} has unknown keys {', '.join(unknown)}; "
                             f"known: {', '.join(n for n in table if n != 'config')}")  # fmt: skip
        for name, value in loaded.items():
            values[name] = check(table[name], value, f"{name} in {path}")
            given[name] = f"{name} in {path}"
    for name, value in cli.items():
        values[name] = check(table[name], value, table[name].flag)
        given[name] = table[name].flag
    return Options(command, values, given, inputs)
