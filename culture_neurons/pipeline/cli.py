"""The ``culture-neurons`` command: the whole experiment (``run``) or its steps alone.

    culture-neurons run                       # the embedded toy: data + trained tiny VLM
    culture-neurons run --model Qwen/Qwen2.5-VL-7B-Instruct --data ./cvqa --out runs/qwen
    culture-neurons run --task lm --model ./gemma-3-270m --data faker --out runs/lm
    culture-neurons record|select|evaluate|report ... --out DIR
    culture-neurons merge A B C --out DIR     # add statistics of separate jobs

Options can also come from ``--config FILE.toml`` (keys = option names with underscores);
the command line wins. Every user mistake ends in one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import fields
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from culture_neurons.errors import CultureNeuronsError, UsageError

log = logging.getLogger("culture_neurons")
FAKER_DATA = "faker"  # --data value of the lm task's generated sentences
FAKER_SENTENCES = 16  # lm task: sentences per culture unless --max-items says otherwise

DEFAULTS = {
    "model": None, "dtype": "auto", "device": "auto",
    "data": None, "cultures": None, "grouping": "pair", "min_items": 10, "language": "en",
    "max_items": None, "on_error": "raise",
    "methods": "cas,lap,lape,mad", "ratio": 0.005, "per_layer": False, "scope": "all",
    "activation": "gate", "identify_on": None, "split_ratio": 0.5, "seed": 0, "task": "mc",
    "rnd_draws": 3, "rnd_like": "cas", "scoring": "logits", "batch_size": 8, "backend": "auto",
    "checkpoint_every": 0, "checkpoint_minutes": 10.0, "reuse_vision": True,
    "out": "culture-neurons-out", "resume": False, "overwrite": False, "quiet": False,
    "shard": None,
}  # fmt: skip


# -- the parser --------------------------------------------------------------------------------
def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", help="hub id or local folder (default: the embedded toy VLM)")
    g.add_argument("--dtype", help="auto | bfloat16 | float16 | float32 (default auto: bf16 "
                   "on GPU as saved, fp32 on CPU)")  # fmt: skip
    g.add_argument("--device", help="auto | cpu | cuda | cuda:N | map (map: spread a model "
                   "larger than one GPU over all GPUs; default auto)")  # fmt: skip
    g.add_argument("--backend", choices=["auto", "fused", "hooks"],
                   help="instrumentation backend (default auto = fused)")  # fmt: skip
    g.add_argument("--batch-size", type=int, help="rows per forward (default 8)")


def _data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--task", choices=["mc", "lm"],
                   help="mc (default): multiple-choice questions, accuracy; lm: sentences, "
                   "next-token NLL (needs a text-only --model and --data faker)")  # fmt: skip
    g.add_argument("--data", help="mc: CVQA, a parquet file/folder or a datasets save_to_disk "
                   "folder (default: the toy's synthetic CVQA); lm: 'faker' (Faker locales' "
                   "sentences; --cultures picks locales, --max-items sentences per culture, "
                   f"default {FAKER_SENTENCES})")  # fmt: skip
    g.add_argument("--cultures", help="comma-separated culture names (default: every group "
                   "with at least --min-items items)")  # fmt: skip
    g.add_argument("--grouping", choices=["pair", "country"],
                   help="culture = (language, country) pair (CVQA's own) or country")
    g.add_argument("--min-items", type=int, help="drop smaller cultures (default 10)")
    g.add_argument("--language", choices=["en", "local"], help="question language")
    g.add_argument("--max-items", type=int, help="at most this many items per culture")
    g.add_argument("--on-error", choices=["raise", "skip"],
                   help="malformed items: stop (default) or skip them, counted")
    g.add_argument("--split-ratio", type=float, help="identification share (default 0.5)")
    g.add_argument("--seed", type=int, help="split and RND seed (default 0)")


def _method_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("statistics and selection")
    g.add_argument("--scope", choices=["all", "text", "image", "last"], help="counted tokens")
    g.add_argument("--activation", choices=["gate", "post"], help="recorded activation")
    g.add_argument("--identify-on", choices=["correct", "all"],
                   help="identification items: answered correctly (default) or all; "
                   "task lm always uses all (a sentence has no right answer)")  # fmt: skip
    g.add_argument("--methods", help="comma-separated: cas,lap,lape,mad (default all four)")
    g.add_argument("--ratio", type=float, help="share of neurons per culture (default 0.005; "
                   "0.05 on the embedded toy)")  # fmt: skip
    g.add_argument("--per-layer", action="store_true", default=None,
                   help="select the top ratio of every layer instead of across layers")
    g.add_argument("--rnd-draws", type=int, help="random control draws (default 3)")
    g.add_argument("--scoring", choices=["logits", "generate"],
                   help="letter logits (default) or greedy generation + parsing")


def _out_args(p: argparse.ArgumentParser, create: bool = True) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--out", help="output dir (default ./culture-neurons-out)")
    g.add_argument("--config", help="TOML file with any of these options")
    g.add_argument("--quiet", action="store_true", default=None, help="no progress bars")
    if create:
        g.add_argument("--resume", action="store_true", default=None,
                       help="continue an interrupted run in --out")
        g.add_argument("--overwrite", action="store_true", default=None,
                       help="replace the results already in --out")
        g.add_argument("--checkpoint-minutes", type=float,
                       help="wall time between statistics checkpoints (default 10; each "
                       "writes C x L x N x 24 bytes, 318 MB at paper scale)")  # fmt: skip
        g.add_argument("--checkpoint-every", type=int,
                       help="also checkpoint every this many batches (default 0: by time only)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="culture-neurons", argument_default=argparse.SUPPRESS,
        description="Find culture-sensitive neurons in vision-language models and test them "
                    "by ablation. With no --model and --data, runs on the embedded toy.")  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    spec = {
        "run": ("the whole experiment: record, select, evaluate, report", "mdso"),
        "record": ("identification statistics only (OUT/stats.*)", "mdso"),
        "select": ("masks of every method from OUT/stats (no model needed)", "so"),
        "evaluate": ("the ablation matrices of the masks in OUT (OUT/eval)", "mdso"),
        "report": ("report.md and figures from OUT", "o"),
    }
    for name, (help_, groups) in spec.items():
        p = sub.add_parser(name, help=help_, description=help_, argument_default=argparse.SUPPRESS)
        if "m" in groups:
            _model_args(p)
        if "d" in groups:
            _data_args(p)
        if "s" in groups:
            _method_args(p)
        _out_args(p, create=name in ("run", "record", "evaluate"))
        if name == "record":
            p.add_argument("--shard", help="i/n: record only shard i of n of the items (a job "
                           "array's task; add the shards with `merge`)")  # fmt: skip
    p = sub.add_parser("merge", help="add statistics of separate jobs into --out",
                       description="Add statistics (OUT dirs or stats files) of separate jobs; "
                                   "refuses another model, cultures or options.")  # fmt: skip
    p.add_argument("inputs", nargs="+", help="output dirs (or stats.json files) to add; "
                   "shards of `record --shard` must all be there, each once")  # fmt: skip
    p.add_argument("--out", required=True, help="where the merged stats are written")
    return parser


def options(args: argparse.Namespace) -> dict:
    """DEFAULTS < --config file < command line."""
    opts = dict(DEFAULTS)
    cli = vars(args)
    loaded: dict = {}
    if cli.get("config"):
        path = Path(cli["config"])
        try:
            loaded = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise UsageError(f"cannot read config file {path}: {e}") from e
        unknown = sorted(set(loaded) - set(DEFAULTS))
        if unknown:
            raise UsageError(f"config file {path} has unknown keys {', '.join(unknown)}; "
                             f"known: {', '.join(DEFAULTS)}")  # fmt: skip
        opts.update(loaded)
    opts.update({k: v for k, v in cli.items() if v is not None})
    given = set(loaded) | {k for k, v in cli.items() if v is not None}
    toy = cli.get("command") in ("run", "record", "evaluate") and not {"model", "data"} & given
    if toy and "ratio" not in given:
        from culture_neurons.demo.toy import TOY_RATIO

        opts["ratio"] = TOY_RATIO  # the toy has 1152 neurons: 0.5 % would be 6 per culture
    return opts


# -- commands ------------------------------------------------------------------------------------
def _run_config(o: dict):
    from culture_neurons.pipeline.config import RunConfig

    names = {f.name for f in fields(RunConfig)}
    kw = {k: o[k] for k in names if k in o and o[k] is not None}
    if o.get("task") == "lm" and o.get("identify_on") == "correct":
        raise UsageError("--identify-on correct does not apply to --task lm: a sentence has no "
                         "right answer, so every identification sentence is recorded; drop "
                         "--identify-on")  # fmt: skip
    kw["methods"] = tuple(m.strip() for m in str(o["methods"]).split(",") if m.strip())
    return RunConfig(**kw)


def _model_and_data(o: dict):
    """(model, processor, data, description) from the options, or the embedded toy."""
    if o["task"] == "lm":
        return _lm_model_and_data(o)
    if o["model"] is None and o["data"] is None:
        from culture_neurons.demo.toy import toy

        t = toy(seed=o["seed"])
        data = _load_data(t.data_path, o)
        return t.model, t.processor, data, t.description
    if o["model"] is None or o["data"] is None:
        missing = "--data" if o["data"] is None else "--model"
        raise UsageError(f"give both --model and --data (or neither, for the toy); {missing} "
                         "is missing")  # fmt: skip
    from culture_neurons.models.loading import load_model

    _run_config(o)  # fail on bad options before the slow loads
    data = _load_data(o["data"], o)
    model, processor = load_model(o["model"], o["dtype"], o["device"])
    return model, processor, data, f"{o['model']} on {o['data']}"


def _lm_model_and_data(o: dict):
    """The lm task: a text-only causal LM and Faker sentences (no embedded toy)."""
    if o["model"] is None:
        raise UsageError("--task lm needs --model (a text-only causal LM folder or hub id, e.g. "
                         "Gemma 3 270M; see bench/real_lm.py)")  # fmt: skip
    if o["data"] not in (None, FAKER_DATA):
        raise UsageError(f"--task lm reads --data {FAKER_DATA} (generated sentences), got "
                         f"{o['data']!r}")  # fmt: skip
    from culture_neurons.data.faker_text import make_faker_data
    from culture_neurons.models.loading import load_model

    _run_config(o)  # fail on bad options before the slow loads
    locales = [c.strip() for c in o["cultures"].split(",")] if o["cultures"] else None
    per_culture = o["max_items"] if o["max_items"] is not None else FAKER_SENTENCES
    data = make_faker_data(locales, per_culture=per_culture, seed=o["seed"])
    model, processor = load_model(o["model"], o["dtype"], o["device"])
    return model, processor, data, f"{o['model']} on {data.source}"


def _load_data(path, o: dict):
    from culture_neurons.data import load_cvqa

    if not Path(path).exists():
        raise UsageError(f"data path {path} does not exist; give a CVQA parquet file or folder "
                         "or a datasets save_to_disk folder")  # fmt: skip
    cultures = [c.strip() for c in o["cultures"].split(",")] if o["cultures"] else None
    return load_cvqa(path, grouping=o["grouping"], min_items=o["min_items"], cultures=cultures,
                     language=o["language"], on_error=o["on_error"],
                     max_items_per_culture=o["max_items"])  # fmt: skip


def _run(o: dict, *, resume: bool | None = None):
    from culture_neurons.pipeline.distributed import partition
    from culture_neurons.pipeline.run import Run

    config = _run_config(o)
    part = partition(o["shard"])
    model, processor, data, description = _model_and_data(o)
    return Run(model, processor, data, o["out"], config,
               resume=o["resume"] if resume is None else resume, overwrite=o["overwrite"],
               progress=not o["quiet"], description=description, part=part)  # fmt: skip


def cmd_run(o: dict) -> None:
    run = _run(o)
    results = run.run()
    if run.part.main:
        _print_summary(results, o["out"])


def cmd_record(o: dict) -> None:
    run = _run(o)
    stats = run.identify()
    if not run.part.main:
        return
    print(f"statistics of {int(stats.items.sum())} items, {len(stats.cultures)} cultures "
          f"-> {Path(o['out']) / 'stats.safetensors'}")  # fmt: skip


def cmd_select(o: dict) -> None:
    from culture_neurons.pipeline.run import select_all
    from culture_neurons.stats import load_stats

    stats = load_stats(o["out"])
    masks = select_all(stats, _run_config(o), Path(o["out"]))
    for name, m in masks.items():
        print(f"{name}: {m.sizes().tolist()} neurons per culture -> masks/{name}.safetensors")


def cmd_evaluate(o: dict) -> None:
    run = _run(o, resume=True)  # the dir already holds stats and masks of this run
    results = run.evaluate()
    if run.part.main:
        _print_summary(results, o["out"])


def cmd_report(o: dict) -> None:
    from culture_neurons.report import write_report

    print(f"report -> {write_report(o['out'])}")


def cmd_merge(args: argparse.Namespace) -> None:
    from culture_neurons.stats import load_stats, merge_shards

    parts = [load_stats(p) for p in args.inputs]
    merged = merge_shards(parts)
    merged.save(args.out)
    print(f"merged {len(parts)} statistics ({int(merged.items.sum())} items) -> {args.out}")


def _print_summary(results: dict, out) -> None:
    for name, r in results.items():
        if r.get("task") == "lm":
            print(f"{name:>5}: self {r['self']:+.4f}  cross {r['cross']:+.4f}  gap "
                  f"{r['gap']:+.4f} (NLL change, nats/token; positive = hurt)")  # fmt: skip
        elif r.get("gap") is not None:
            print(f"{name:>5}: self {r['self']:+.1f}  cross {r['cross']:+.1f}  gap {r['gap']:+.1f}"
                  " (accuracy points)")  # fmt: skip
        else:
            print(f"{name:>5}: flip self {r['flip_self']:.3f}  cross {r['flip_cross']:.3f}")
    figures = ", figures/" if (Path(out) / "figures").is_dir() else ""  # lm runs draw none
    print(f"results in {out} (report.md, eval/{figures})")


COMMANDS = {"run": cmd_run, "record": cmd_record, "select": cmd_select,
            "evaluate": cmd_evaluate, "report": cmd_report}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        if args.command == "merge":
            cmd_merge(args)
        else:
            COMMANDS[args.command](options(args))
    except CultureNeuronsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except _oom_errors() as e:
        print(f"error: out of memory ({str(e).splitlines()[0]}); pass a smaller --batch-size",
              file=sys.stderr)  # fmt: skip
        return 3
    except KeyboardInterrupt:
        print("interrupted; run the same command with --resume to continue", file=sys.stderr)
        return 130
    return 0


def _oom_errors() -> tuple[type[BaseException], ...]:
    import torch

    return (torch.OutOfMemoryError, MemoryError)


if __name__ == "__main__":
    sys.exit(main())
