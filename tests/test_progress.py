"""Progress where no bar redraws (a log file, a pipe): plain lines now and then, the count, rate and time left."""

import io
import re

from moca3d import progress
from moca3d.progress import Lines, cli_progress, duration, progress_bar


def test_lines_print_the_count_rate_and_time_left_at_most_every_interval(capsys):
    stream = io.StringIO()
    lines = Lines(total=10, desc="train", initial=2, unit="step", every_s=0.0, file=stream)
    lines.set_postfix(loss="0.5000")
    lines.update(1)
    lines.update(2)
    printed = stream.getvalue().splitlines()
    assert len(printed) == 2
    assert re.fullmatch(r"train: 3/10 steps, loss 0\.5000 \(\d+\.\d\d s/step, about \d+ s left\)", printed[0]), printed
    assert printed[1].startswith("train: 5/10 steps, loss 0.5000 (")
    quiet = Lines(total=10, every_s=1e9, file=stream)
    quiet.update(9)
    assert len(stream.getvalue().splitlines()) == 2  # nothing before the interval has passed
    lines.write("a note")  # tqdm.write's place: stdout
    assert capsys.readouterr().out == "a note\n"


def test_progress_bar_modes_iterate_every_item(capsys, monkeypatch):
    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.0)
    assert list(progress_bar(range(3), show=False, desc="x")) == [0, 1, 2]
    assert capsys.readouterr().err == ""
    counted = progress_bar(range(3), show="lines", desc="encode", unit="asset")
    assert isinstance(counted, Lines) and list(counted) == [0, 1, 2]
    assert capsys.readouterr().err.splitlines()[-1].startswith("encode: 3/3 assets (")


def test_cli_progress_is_lines_off_a_terminal_and_durations_read_well():
    assert cli_progress(io.StringIO()) == "lines"
    assert [duration(s) for s in (4, 89, 600, 5400, 11_100)] == ["4 s", "89 s", "10 min", "1 h 30 min", "3 h 05 min"]


def test_lines_take_iterables_without_a_length_a_zero_total_and_end_with_the_last_count():
    stream = io.StringIO()
    assert list(Lines((i for i in range(3)), desc="read", every_s=0.0, file=stream)) == [0, 1, 2]
    assert stream.getvalue().splitlines()[-1].startswith("read: 3/? it (")  # a generator: no total, no time left
    empty = io.StringIO()
    Lines(total=0, desc="none", every_s=0.0, file=empty).update(1)
    assert empty.getvalue().startswith("none: 1/0 it (") and "about 0 s left" in empty.getvalue()  # not "-0 s"
    late = io.StringIO()
    lines = Lines(total=10, desc="train", every_s=0.0, file=late)
    lines.update(2)
    lines.every_s = 1e9  # the next updates fall inside the interval
    lines.update(5)
    lines.close()
    assert [line.split(" (")[0] for line in late.getvalue().splitlines()] == ["train: 2/10 it", "train: 7/10 it"]
