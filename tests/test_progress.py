"""Progress output where no terminal can redraw a bar (pytest's captured stderr is not a tty)."""
import re

from moh_compile import progress
from moh_compile.progress import progress_bar


def test_plain_line_when_done_and_nothing_else_for_a_short_step(capsys):
    with progress_bar(20, "calibration pass") as advance:
        for _ in range(20):
            advance()
    captured = capsys.readouterr()
    assert captured.out == ""
    assert re.fullmatch(r"calibration pass: 100% \(\d+s\)\n", captured.err)


def test_plain_lines_every_tenth_for_a_long_step(capsys, monkeypatch):
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.0)  # every step counts as "running long"
    with progress_bar(20, "fit") as advance:
        for i in range(20):
            advance(description="fit layer 3" if i == 10 else None)
    lines = capsys.readouterr().err.splitlines()
    percents = [int(re.search(r"(\d+)%", line).group(1)) for line in lines]
    assert percents == [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    assert lines[0].startswith("fit: ") and lines[-1].startswith("fit layer 3: ")


def test_silent_when_disabled_or_trivial(capsys):
    with progress_bar(20, "off", enabled=False) as advance:
        advance(20)
    with progress_bar(1, "one step") as advance:
        advance()
    assert capsys.readouterr().err == ""
