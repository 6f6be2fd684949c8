"""The text report in a real terminal (tmux, on a private server): at 80 and 100 columns no line
wraps, the verdicts are coloured (and not under NO_COLOR), and a progress line shows on the terminal
while sampling and is gone afterwards. tmux comes from scripts/bootstrap.sh (test)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import REPO

SGR = re.compile(r"\033\[[0-9;]*m")


class Tmux:
    """One tmux server of our own (``-L``), killed at the end: nobody else's sessions are touched."""

    def __init__(self) -> None:
        self.tmux = shutil.which("tmux")
        assert self.tmux, "tmux is missing: scripts/bootstrap.sh test installs it"
        self.socket = f"nodetune-test-{uuid.uuid4().hex[:8]}"

    def run(self, *args: str) -> str:
        return subprocess.run([self.tmux, "-L", self.socket, *args], capture_output=True, text=True, check=True).stdout

    def capture(self, escapes: bool = False) -> str:
        # -J: a wrapped line comes back whole (so an overlong line shows); -S -: all the history
        return self.run("capture-pane", "-p", "-J", *(["-e"] if escapes else []), "-S", "-", "-t", "doctor")

    def kill(self) -> None:
        subprocess.run([self.tmux, "-L", self.socket, "kill-server"], capture_output=True)


def wait_for(tmux: Tmux, text: str, timeout_s: float = 120) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        screen = tmux.capture()
        if text in screen:
            return screen
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not on the terminal in {timeout_s} s:\n{tmux.capture()}")


@pytest.mark.root
@pytest.mark.parametrize(("width", "no_color"), [(80, ""), (100, ""), (100, "1")])
def test_report_in_a_real_terminal(width: int, no_color: str, tmp_path: Path) -> None:
    doctor = shlex.join([sys.executable, "-m", "agent.cli", "doctor", "--duration", "2", "--probes", "none"])
    script = tmp_path / "run.sh"
    script.write_text(f"cd {shlex.quote(str(REPO))}\nNO_COLOR={no_color} {doctor}\necho EXIT=$?\nsleep 300\n")
    tmux = Tmux()
    try:
        tmux.run("new-session", "-d", "-s", "doctor", "-x", str(width), "-y", "400", f"bash {script}")
        sampling = wait_for(tmux, "nodetune doctor: sampling")  # stderr is the terminal: the progress line
        screen = wait_for(tmux, "EXIT=")
        coloured = tmux.capture(escapes=True)
    finally:
        tmux.kill()
    lines = screen.rstrip("\n").splitlines()
    # the whole progress line: nothing left of the longer "loading probes ..." line it replaced
    progress = next(line for line in sampling.splitlines() if "sampling" in line)
    assert re.fullmatch(r"nodetune doctor: sampling +[0-9.]+/2 s ?", progress), progress
    assert "sampling" not in screen  # cleared once the window is over
    assert re.search(r"^EXIT=[012]$", screen, re.M), screen
    assert any(line.startswith("verdict: ") for line in lines), screen
    assert max(len(line) for line in lines) <= width, "\n".join(line for line in lines if len(line) > width)
    verdicts = re.findall(r"^  (OK|WARN|CRIT|SKIP) ", SGR.sub("", coloured), re.M)
    # tmux re-encodes: 1;31 comes back as 1 then 31, and a line may open with resets
    assert len(verdicts) >= 10 and "SKIP" in verdicts  # --probes none: the probes' checks say so
    painted = re.findall(r"^(?:\033\[[0-9;]*m)*  (?:\033\[[0-9;]*m)+(OK|WARN|CRIT|SKIP)", coloured, re.M)
    if no_color:
        assert painted == [] and "\033[" not in coloured.replace("\033[0m", "").replace("\033[39m", "")
    else:
        assert painted == verdicts
