"""What a run shows on the console: progress bars on a terminal, a few plain lines when the
output goes to a file (a job's log gets no ``\\r`` bar spam), and nothing with ``quiet``.

:func:`console` sets up the command line's messages for one command (our notices and
warnings on stderr, one line each; transformers' and the hub's bars and chatter off when
quiet or redirected) and puts everything back afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time

# Redirected output: one line at least this often (a long job's log still shows it moving).
LINE_EVERY_S = 60.0


class _Off:
    """No progress shown."""

    def update(self, n: int = 1) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


class _Lines:
    """Progress as plain lines on a non-terminal: every :data:`LINE_EVERY_S` and at the end."""

    def __init__(self, total: int, desc: str, stream):
        self.total, self.desc, self.stream = total, desc, stream
        self.n, self.start = 0, time.monotonic()
        self.last = self.start

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= LINE_EVERY_S and self.n < self.total:
            self.last = now
            self._line(f"{self.n}/{self.total} ({100 * self.n // max(self.total, 1)} %)")

    def _line(self, text: str) -> None:
        elapsed = time.monotonic() - self.start
        print(f"{self.desc}: {text}, {elapsed:.0f} s", file=self.stream, flush=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            pct = 100 * self.n // max(self.total, 1)
            self._line(f"{self.n}/{self.total} ({pct} %)")


def bar(total: int, desc: str, enabled: bool = True):
    """A context manager with ``update(n)``: a tqdm bar on a terminal (left at its final
    100 % when done), plain lines when stderr is redirected, nothing when not ``enabled``."""
    if not enabled:
        return _Off()
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="item", dynamic_ncols=True, leave=True)
    return _Lines(total, desc, sys.stderr)


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


@contextlib.contextmanager
def console(quiet: bool = False):
    """The command line's messages for one command: our notices (INFO of the pipeline and the
    toy demo; none when ``quiet``) and warnings on stderr, one line each; transformers' and
    the hub's progress bars off when ``quiet`` or redirected, their chatter off when quiet."""
    root = logging.getLogger("culture_neurons")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Format())
    notices = [logging.getLogger(f"culture_neurons.{n}") for n in ("pipeline", "demo")]
    saved = [(lg, lg.level, lg.propagate) for lg in (root, *notices)]
    root.addHandler(handler)
    root.propagate = False
    root.setLevel(logging.WARNING)
    for lg in notices:
        lg.setLevel(logging.WARNING if quiet else logging.INFO)
    restore = _quiet_libraries(quiet or not sys.stderr.isatty(), quiet)
    try:
        yield
    finally:
        restore()
        root.removeHandler(handler)
        for lg, level, propagate in saved:
            lg.setLevel(level)
            lg.propagate = propagate


def _quiet_libraries(no_bars: bool, no_chatter: bool):
    """Turn off the bars (and with ``no_chatter`` the info and warnings) of transformers, the
    hub and datasets; returns what puts them back."""
    from transformers.utils import logging as tf_logging

    undo = []
    if no_bars:
        # Read by the hub and datasets when first imported; their switches below otherwise.
        env = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)

        def restore_env() -> None:
            for k, v in saved.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)

        undo.append(restore_env)
        switches = [(tf_logging.is_progress_bar_enabled, tf_logging.disable_progress_bar,
                     tf_logging.enable_progress_bar)]  # fmt: skip
        if "datasets" in sys.modules:
            ds = sys.modules["datasets"]
            switches.append((ds.is_progress_bar_enabled, ds.disable_progress_bars,
                             ds.enable_progress_bars))  # fmt: skip
        with contextlib.suppress(ImportError):
            from huggingface_hub import utils as hub

            switches.append((lambda: not hub.are_progress_bars_disabled(),
                             hub.disable_progress_bars, hub.enable_progress_bars))  # fmt: skip
        for is_on, off, on in switches:
            if is_on():
                off()
                undo.append(on)
    if no_chatter:
        level = tf_logging.get_verbosity()
        tf_logging.set_verbosity_error()
        undo.append(lambda: tf_logging.set_verbosity(level))

    def restore() -> None:
        for f in reversed(undo):
            f()

    return restore
