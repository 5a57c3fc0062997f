"""The ``culture-neurons`` command: the whole experiment (``run``) or its steps alone.

    culture-neurons run                       # the embedded toy: data + trained tiny VLM
    culture-neurons run --model Qwen/Qwen2.5-VL-7B-Instruct --data ./cvqa --out runs/qwen
    culture-neurons run --task lm --model ./gemma-3-270m --data faker --out runs/lm
    culture-neurons record|select|evaluate|report ... --out DIR
    culture-neurons merge A B C --out DIR     # add statistics of separate jobs
    culture-neurons compare RUN RUN ... --out DIR   # one report over finished runs

The options, their defaults and the ``--config FILE.toml`` file come from one table
(:mod:`culture_neurons.pipeline.options`). Every step reads the run's settings from
``OUT/run.json``: an option not given takes the run's value, a differing one is refused or,
where the step may change it, recorded (:mod:`culture_neurons.pipeline.rundir`). Everything
that needs no model (the output dir's state, options, data, masks) is checked before the model
is loaded and before anything is written. Every user mistake ends in one line on stderr and
exit code 2.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import replace
from pathlib import Path

from culture_neurons.errors import CultureNeuronsError, UsageError
from culture_neurons.pipeline import rundir
from culture_neurons.pipeline.config import MODE_SETTINGS
from culture_neurons.pipeline.options import (
    FAKER_DATA,
    Options,
    build_parser,
    read,
    steps,
)

log = logging.getLogger(__name__)


# -- options against the run ------------------------------------------------------------------
def _recorded(meta: dict) -> dict:
    """The option values a run recorded in its run.json."""
    return {**meta.get("inputs", {}), **meta["config"]}


def _with_run(o: Options, meta: dict | None) -> Options:
    """Options not given take the run's values; a given one that differs is refused unless
    this command may change it (then run.json records the change)."""
    if meta is None:
        return o
    recorded = _recorded(meta)
    given = {k: o[k] for k in o.given if k in recorded}
    rundir.refuse(Path(o["out"]), rundir.conflicts(recorded, given, o.command, steps()), o.given,
                  steps())  # fmt: skip
    values = dict(o.values)
    for name, value in recorded.items():
        if name in values and name not in o.given:
            values[name] = tuple(value) if isinstance(value, list) else value
    for mode, name, _ in MODE_SETTINGS:  # a screened run's budget, a sampled run's share
        if values.get("matrix") != mode and name not in o.given:
            values[name] = None  # not carried to another mode
    return replace(o, values=values)


def _task(o: Options):
    """The class of the task ``--task`` names (culture_neurons.tasks)."""
    from culture_neurons.tasks import task_class

    return task_class(o["task"])


def _is_toy(o: Options) -> bool:
    return _task(o).has_toy and o["model"] is None and o["data"] is None


def _run_config(o: Options, meta: dict | None = None):
    """RunConfig from the options (identify_on still "correct" by default: the data decides
    later, :func:`culture_neurons.pipeline.config.identify_on_for`). A new run of the toy
    (``meta`` None) selects :data:`~culture_neurons.demo.toy.TOY_RATIO` by default."""
    from culture_neurons.pipeline.config import RunConfig

    kw = {k: o[k] for k in RunConfig().settings() if o[k] is not None}
    if meta is None and _is_toy(o):  # the toy's own defaults (see culture_neurons.demo.toy)
        from culture_neurons.demo.toy import TOY_BATCH_SIZE, TOY_RATIO

        if "ratio" not in o.given:
            kw["ratio"] = TOY_RATIO  # the toy has 288 neurons: 0.5 % would be 1 per culture
        if "batch_size" not in o.given:
            kw["batch_size"] = TOY_BATCH_SIZE  # 8-row forwards run at half the speed
    return RunConfig(**kw)


def _inputs(o: Options) -> dict:
    """What run.json records of how model and data were loaded (local paths made absolute,
    so that a later step finds them from any working dir; hub ids as given)."""
    names = ("model", "data", "cultures", "grouping", "min_items", "language", "max_items",
             "on_error")  # fmt: skip
    out = {k: list(o[k]) if isinstance(o[k], tuple) else o[k] for k in names}
    for k in ("model", "data"):
        if out[k] is not None and out[k] != FAKER_DATA and Path(out[k]).exists():
            out[k] = str(Path(out[k]).resolve())
    return out


# -- model and data -------------------------------------------------------------------------
def _check_device(o: Options) -> None:
    """A device that cannot be used fails now, not after the data and the model are read."""
    from culture_neurons.models.loading import resolve_device

    resolve_device("auto" if o["device"] == "map" else o["device"])


def _load_data(o: Options, path=None):
    """The items, as the task reads them (the toy's synthetic CVQA at ``path``)."""
    return _task(o).load_data(o, path)


def _prepare(o: Options, meta: dict | None, resume: bool, command: str):
    """Check everything that needs no model, then load model and data: a :class:`Run`."""
    from culture_neurons.pipeline.config import identify_on_for
    from culture_neurons.pipeline.distributed import partition
    from culture_neurons.pipeline.run import Run

    config = _run_config(o, meta)
    _check_device(o)
    part = partition(o["shard"])
    toy = None
    if _is_toy(o):  # the embedded toy brings its data (shipped in the package, hash-checked)
        import torch

        from culture_neurons.demo.toy import TOY_THREADS
        from culture_neurons.demo.toy import toy as build_or_load

        torch.set_num_threads(TOY_THREADS)  # 64-wide matrices: threads only synchronise
        toy = build_or_load(seed=o["seed"])
    data = _load_data(o, toy.data_path if toy else None)
    identify_on = identify_on_for(o["identify_on"], data.labels_available, config.task)
    note = _task(o).hidden_labels_note
    if o["identify_on"] is None and not data.labels_available and note:
        log.info(note)
    config = replace(config, identify_on=identify_on)
    if meta is not None:  # the same run: its cultures and items (the model once loaded)
        rundir.check_continues(Path(o["out"]), meta, config.settings(), command, given=o.given,
                               steps=steps(), cultures=data.cultures,
                               data_hash=rundir.data_hash(data))  # fmt: skip
    from culture_neurons.models.loading import load_model, place

    if toy is not None:
        model, processor = place(toy.model, o["dtype"], o["device"]), toy.processor
        description = toy.description
    else:
        model, processor = load_model(o["model"], o["dtype"], o["device"])
        description = f"{o['model']} on {data.source}"
    return Run(model, processor, data, o["out"], config, resume=resume, overwrite=o["overwrite"],
               progress=not o["quiet"], description=description, part=part,
               inputs=_inputs(o), command=command)  # fmt: skip


def _start(o: Options):
    """``run`` / ``record``: a new run in --out, or (--resume) the run already there."""
    out = Path(o["out"])
    meta = rundir.open_run(out, o["resume"], o["overwrite"])
    if o["resume"]:
        if meta is None:
            log.info("--resume: %s holds no run yet; starting fresh", out)
        o = _with_run(o, meta)
    return _prepare(o, meta, resume=o["resume"], command=o.command)


# -- commands ------------------------------------------------------------------------------------
def cmd_run(o: Options) -> None:
    run = _start(o)
    results = run.run()
    if run.part.main:
        _print_summary(results, o["out"])


def cmd_record(o: Options) -> None:
    run = _start(o)
    stats = run.identify()
    if not run.part.main:
        return
    print(f"statistics of {int(stats.items.sum())} items, {len(stats.cultures)} cultures "
          f"-> {Path(o['out']) / 'stats.safetensors'}")  # fmt: skip


def _run_of_stats(o: Options, then: str) -> dict:
    """run.json of the statistics in --out (for statistics saved without one, e.g. from
    Python, the settings stats.json records)."""
    out = Path(o["out"])
    rundir.require(out, ["stats.json", "stats.safetensors"], then)
    meta = rundir.read_run(out)
    if meta is None:
        stats_meta = rundir.read_json(out / "stats.json", "record the statistics again") or {}
        meta = {"config": rundir.settings_from_stats(stats_meta), "inputs": {},
                "cultures": stats_meta.get("cultures"),
                "fingerprint": stats_meta.get("fingerprint"), "changes": []}  # fmt: skip
    return meta


def cmd_select(o: Options) -> None:
    from culture_neurons.selection.controls import save_masks, select_all
    from culture_neurons.stats import load_stats

    out = Path(o["out"])
    meta = _run_of_stats(o, f"record statistics first: culture-neurons record --out {out}")
    o = _with_run(o, meta)
    config = _run_config(o, meta)
    old = sorted(p.name for p in (out / "masks").glob("*.safetensors"))
    if old and not o["overwrite"]:
        raise UsageError(f"{out} already holds masks ({', '.join(old)}); pass --overwrite to "
                         "replace them (and the results evaluated with them)")  # fmt: skip
    stats = load_stats(out)
    masks = select_all(stats, config)  # fails before anything is replaced
    if old:
        stale = [n for n in rundir.DERIVED["masks"] if (out / n).exists()]
        rundir.remove(out, stale)
        log.info("--overwrite: replaced %s", ", ".join(stale))
    save_masks(masks, out)
    new = config.settings("select")  # what select decides (the rest was checked to agree)
    meta["changes"] = meta.get("changes", []) + rundir.changes(meta["config"], new, "select")
    meta["config"] = {**meta["config"], **new}
    rundir.write_json(out / rundir.RUN_FILE, meta)
    for name, m in masks.items():
        print(f"{name}: {m.sizes().tolist()} neurons per culture -> masks/{name}.safetensors")


def cmd_evaluate(o: Options) -> None:
    from culture_neurons.masks import load_masks

    out = Path(o["out"])
    then = f"select neurons first: culture-neurons select --out {out} (or `run`)"
    meta = rundir.read_run(out) if out.is_dir() else None
    rundir.require(out, ["stats.json", "masks"], then)
    if meta is None:
        raise UsageError(f"{out} holds no run.json (its masks were not made by `select`); "
                         f"select again: culture-neurons select --out {out} --overwrite")  # fmt: skip
    o = _with_run(o, meta)
    config = _run_config(o, meta)
    from culture_neurons.selection.controls import rnd_draws_of

    rundir.require(out, [f"masks/{n}.safetensors" for n in config.methods], then)
    methods = {n: load_masks(out / "masks" / f"{n}.safetensors") for n in config.methods}
    draws = sorted({d for names in rnd_draws_of(methods, config).values() for d in names})
    rundir.require(out, [f"masks/{n}.safetensors" for n in draws], then)
    for n in [*config.methods, *draws]:  # selected with the run's settings, before the model
        masks = methods[n] if n in methods else load_masks(out / "masks" / f"{n}.safetensors")
        rundir.check_masks(out, n, masks, config)
    run = _prepare(o, meta, resume=True, command="evaluate")
    results = run.evaluate()
    if run.part.main:
        _print_summary(results, o["out"])


def cmd_report(o: Options) -> None:
    from culture_neurons.masks import load_masks
    from culture_neurons.pipeline import retest
    from culture_neurons.pipeline.config import RunConfig
    from culture_neurons.report import write_report

    out = Path(o["out"])
    rundir.require(out, ["eval"], f"evaluate first: culture-neurons evaluate --out {out}")
    meta = rundir.read_run(out)
    _with_run(o, meta)  # a config file contradicting the run is refused
    if meta is not None:
        config = RunConfig(**{k: v for k, v in meta["config"].items()
                              if k in RunConfig().settings()})  # fmt: skip
        for path in sorted((out / "masks").glob("*.safetensors")):
            rundir.check_masks(out, path.stem, load_masks(path), config)
    rundir.check_evals(out)
    retested = retest.retest_run(out)  # tests recomputed from the kept per-item scores
    if retested:
        print(f"tests recomputed from {retest.ITEMS_FILE} for {', '.join(retested)}")
    print(f"report -> {write_report(out)}")


def cmd_merge(o: Options) -> None:
    from culture_neurons.pipeline import halves
    from culture_neurons.stats import load_stats, merge_shards, stats_folder

    out = Path(o["out"])
    folders = []
    for given in o.inputs:
        if not Path(given).exists():
            raise UsageError(f"merge input {given} does not exist")
        folder = stats_folder(given)
        for seen, name in zip(folders, o.inputs, strict=False):
            if seen.resolve() == folder.resolve():
                raise UsageError(f"merge inputs {name} and {given} are the same statistics "
                                 f"({folder}); give each once")  # fmt: skip
        folders.append(folder)
    rundir.check_writable_out(out)
    found = rundir.present(out)
    if found and not o["overwrite"]:
        raise UsageError(f"{out} already holds results ({', '.join(found)}); pass --overwrite "
                         "to replace them, or merge into a new --out")  # fmt: skip
    parts = [load_stats(f) for f in folders]
    hashes = [p.content_hash() for p in parts]
    for i, h in enumerate(hashes):
        if h in hashes[:i]:
            raise UsageError(f"merge inputs {o.inputs[hashes.index(h)]} and {o.inputs[i]} hold "
                             "identical statistics: adding them would count every item twice; "
                             "give each once")  # fmt: skip
    metas = [rundir.read_run(f) for f in folders]
    meta = _merged_run(metas, o.inputs, folders)
    merged = merge_shards(parts)
    if found:
        rundir.remove(out, found)
        log.info("--overwrite: replaced %s", ", ".join(found))
    merged.save(out)
    halves.merge(folders, out)
    if meta is not None:
        rundir.write_json(out / rundir.RUN_FILE, meta)
    print(f"merged {len(parts)} statistics ({int(merged.items.sum())} items) -> {out}")


def _merged_run(metas: list, names: list[str], folders: list[Path]) -> dict | None:
    """run.json of the merged statistics: the inputs' (whose settings must agree), with
    ``merged_from``; None if no input has one."""
    known = [(n, m) for n, m in zip(names, metas, strict=True) if m is not None]
    if not known:
        return None
    first_name, first = known[0]
    for name, meta in known[1:]:
        found = rundir.conflicts(_recorded(first), _recorded(meta), "merge", steps())
        if found:
            key, a, b = found[0]
            raise UsageError(f"merge inputs {first_name} and {name} were recorded with other "
                             f"{key.replace('_', '-')} ({rundir.show(a)} vs {rundir.show(b)}); "
                             "merge statistics of one setting")  # fmt: skip
    merged = dict(first, merged_from=[str(f) for f in folders], changes=[])
    hashes = {m.get("data_hash") for _, m in known}
    if len(hashes) > 1 or len(known) < len(metas):  # several datasets: no one data hash
        merged["data_hash"] = None
        merged["data"] = "; ".join(sorted({str(m.get("data")) for _, m in known}))
    return merged


def _print_summary(results: dict, out) -> None:
    """One line per method: its primary measure's gap with the 95 % interval and its p-value
    against RND, and that p Holm-adjusted across the methods (keys and units:
    culture_neurons.eval_schema)."""
    from culture_neurons.eval_schema import primary

    for name, r in results.items():
        m = primary(r)
        decimals = m.decimals
        gap, ci, p = r.get(m.summary()), r.get(m.ci()) or [None, None], r.get(m.p())
        if gap is None:
            print(f"{name:>5}: gap undefined (one culture, or no evaluation items)")
            continue
        interval = "" if None in ci else f" [{ci[0]:+.{decimals}f}, {ci[1]:+.{decimals}f}]"
        q = r.get(m.p_adjusted())
        vs_rnd = "" if p is None else f", p vs its RND {p:.3g}" + (
            f", Holm-adjusted {q:.3g}" if q is not None else "")  # fmt: skip
        note = {"estimate": "; first-order estimate", "screen": "; estimated off the screened "
                "cells"}.get(r.get("matrix"), "")  # fmt: skip
        mark = "~" if note else ""  # as the report marks estimated numbers
        if r.get("matrix") == "sample":  # exact prefills, off the diagonal on a share of items
            note = f"; off-diagonal cells on a {(r.get('sample') or {}).get('share')} share"
        print(f"{name:>5}: {m.summary()} {mark}{gap:+.{decimals}f}{interval} ({m.label}; 95 % "
              f"interval{vs_rnd}{note})")  # fmt: skip
    made = [n for n in ("report.md", "eval/", "figures/") if (Path(out) / n).exists()]
    later = "" if "report.md" in made else f"; report: culture-neurons report --out {out}"
    print(f"results in {out} ({', '.join(made)}){later}")


def cmd_compare(o: Options) -> None:
    from culture_neurons.report.compare import write_comparison

    print(f"comparison -> {write_comparison(o.inputs, o['out'], overwrite=o['overwrite'])}")


COMMANDS = {"run": cmd_run, "record": cmd_record, "select": cmd_select,
            "evaluate": cmd_evaluate, "report": cmd_report, "merge": cmd_merge,
            "compare": cmd_compare}  # fmt: skip
# How a stopped command continues.
CONTINUE = {"run": "the same command with --resume", "record": "the same command with --resume",
            "evaluate": "the same command (it continues where it stopped)"}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from culture_neurons.pipeline.progress import console

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version (0) or a parse error (2, one line printed)
        return e.code if isinstance(e.code, int) else 2
    try:
        o = read(args)
    except CultureNeuronsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with console(quiet=o["quiet"]):
        try:
            COMMANDS[o.command](o)
        except CultureNeuronsError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except _oom_errors() as e:
            again = CONTINUE.get(o.command, "the same command")
            print(f"error: out of memory ({str(e).splitlines()[0]}); pass a smaller --batch-size "
                  f"to {again}", file=sys.stderr)  # fmt: skip
            return 3
        except KeyboardInterrupt:
            again = CONTINUE.get(o.command, "the same command")
            print(f"interrupted; run {again} to continue", file=sys.stderr)
            return 130
    return 0


def entry() -> None:
    """``culture-neurons`` and ``python -m culture_neurons``: :func:`main`, the process ended
    by :func:`~culture_neurons.pipeline.distributed.exit_process` (under torchrun, without
    the interpreter's teardown)."""
    from culture_neurons.pipeline.distributed import exit_process

    exit_process(main())


def _oom_errors() -> tuple[type[BaseException], ...]:
    import torch

    return (torch.OutOfMemoryError, MemoryError)


if __name__ == "__main__":
    sys.exit(main())
