"""The command around the diagnosis: the progress line rewritten in place without leftovers, Ctrl-C
at any stage and a reader that stops reading (``doctor | head``) end it with a line, not a
traceback, and leave nothing loaded."""

from __future__ import annotations

import io
import re
import subprocess
import sys

import pytest

from agent.cli import main
from agent.doctor.command import Progress
from tests.conftest import REPO


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_every_progress_rewrite_clears_the_line_first() -> None:
    """Review 5: "loading probes and collectors ..." is longer than "sampling 0.1/0.3 s": each
    carriage return must erase the rest of the line (``ESC [K``) or the end of the longer one shows."""
    term = Terminal()
    progress = Progress(term, 0.3)
    progress.say("nodetune doctor: loading probes and collectors ...")
    progress.wait(0.3)
    out = term.getvalue()
    assert "sampling" in out
    assert out.count("\r") == out.count("\r\033[K") > 2, repr(out)
    # what a terminal shows at the end of each write: the last line, whole
    for shown in re.split(r"\r\033\[K", out)[1:-1]:
        assert re.fullmatch(r"nodetune doctor: (loading probes and collectors \.\.\.|sampling +[0-9.]+/0\.3 s)", shown)


def test_ctrl_c_while_the_agents_units_are_built_is_interrupted_not_a_traceback(
    capsys: pytest.CaptureFixture,
) -> None:
    """Review 7: a Ctrl-C before the diagnosis starts (building the config and the agent's units)."""
    import agent.cli as cli

    def interrupted(args: object) -> object:
        raise KeyboardInterrupt

    real = cli.config_from_args
    cli.config_from_args = interrupted  # type: ignore[assignment]
    try:
        assert main(["doctor", "--duration", "0.2", "--probes", "none"]) == 3
    finally:
        cli.config_from_args = real  # type: ignore[assignment]
    out, err = capsys.readouterr()
    assert out == "" and err == "nodetune doctor: interrupted\n", err


@pytest.mark.root
def test_a_reader_that_stops_reading_is_no_traceback() -> None:
    """Review 7: ``nodetune doctor | head -0``: the pipe closes before the report is written. No
    traceback, no "could not run": the diagnosis ran, its exit code is the verdict's."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "doctor", "--duration", "0.2", "--probes", "none"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.stdout.close()  # the reader is gone before the first byte
    err = proc.stderr.read()
    assert proc.wait(timeout=120) in (0, 1, 2), err
    assert "Traceback" not in err and "BrokenPipe" not in err, err
