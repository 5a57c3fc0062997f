"""The console (issue #12 case 17): the toy's build says so, --quiet silences transformers too,
bars end at 100 %, redirected output gets plain lines (no carriage returns)."""

from __future__ import annotations

import io

import pytest
from conftest import save_cli_assets

from culture_neurons.pipeline import cli, progress

RECORD = ["--min-items", "4", "--batch-size", "4", "--identify-on", "all"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    a = save_cli_assets(tmp_path_factory.mktemp("progress"), "qwen2_5_vl")
    return ["--model", a["model"], "--data", a["data"], *RECORD]


def test_redirected_progress_is_plain_lines_ending_at_100(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.0)  # a line per update
    with progress.bar(7, "work") as bar:
        for n in (3, 3, 1):
            bar.update(n)
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert [line.split(",")[0] for line in lines] == ["work: 3/7 (42 %)", "work: 6/7 (85 %)",
                                                      "work: 7/7 (100 %)"]  # fmt: skip
    stream.truncate(0)
    with progress.bar(7, "off", enabled=False) as bar:
        bar.update(7)
    assert stream.getvalue() == ""


def test_17_a_redirected_run_prints_lines_that_reach_100(assets, tmp_path, capsys):
    assert cli.main(["record", *assets, "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err  # not a terminal here: what a job log would hold
    assert "\r" not in err, "carriage-return bar spam in redirected output"
    last = {}
    for line in err.splitlines():
        if ": " in line and "/" in line:
            last[line.split(": ")[0]] = line
    assert set(last) == {"recording statistics"}
    assert all("(100 %)" in line for line in last.values()), last


def test_17_quiet_silences_our_bars_and_transformers(assets, tmp_path, capsys, monkeypatch):
    from transformers.utils import logging as tf_logging

    from culture_neurons.pipeline import run

    seen = {}
    original = run.Run.identify

    def identify(self):
        seen["transformers_bars"] = tf_logging.is_progress_bar_enabled()
        seen["verbosity"] = tf_logging.get_verbosity()
        return original(self)

    monkeypatch.setattr(run.Run, "identify", identify)
    assert cli.main(["record", *assets, "--out", str(tmp_path / "o"), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out.startswith("statistics of")
    assert seen == {"transformers_bars": False, "verbosity": tf_logging.ERROR}
    assert tf_logging.is_progress_bar_enabled()  # put back afterwards


@pytest.mark.parametrize("shipped", [True, False])
def test_17_the_toy_says_what_it_does_first(shipped, tmp_path, capsys, monkeypatch):
    """The notice comes before the work (stopped here, as Ctrl-C would): loading the shipped
    toy, or building it where its files are missing."""
    from culture_neurons.demo import toy

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setenv("CULTURE_NEURONS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(toy, "load_toy" if shipped else "build_toy", stop)
    if not shipped:
        monkeypatch.setattr(toy, "shipped_files_present", lambda: False)
    assert cli.main(["run", "--out", str(tmp_path / "o")]) == 130
    lines = capsys.readouterr().err.splitlines()
    if shipped:
        assert lines[0].startswith("loading the embedded toy VLM") and "hashes" in lines[0]
    else:
        assert lines[0].startswith("building the embedded toy VLM")
        assert "a few minutes" in lines[0] and "cached" in lines[0]
    assert lines[-1] == "interrupted; run the same command with --resume to continue"
    assert not (tmp_path / "o").exists()
