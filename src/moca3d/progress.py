"""Where progress is shown: a bar where it redraws in place (a terminal), a plain line now and then elsewhere (a log
file, a pipe), nothing when asked.

A `show` argument below is True (a tqdm bar), "lines" (`Lines`) or False (nothing).
"""

import sys
import time
from typing import Iterable, Optional, TextIO, Union

Show = Union[bool, str]
LINE_EVERY_S = 60.0  # a log file gets a progress line at most this often


def on_terminal(stream: Optional[TextIO] = None) -> bool:
    """True when `stream` (stdout, where rich draws; tqdm draws on sys.stderr) is a terminal or a notebook: a bar
    elsewhere (a pipe, a log file) leaves lines behind."""
    from rich.console import Console

    console = Console(file=stream or sys.stdout)
    return console.is_terminal or console.is_jupyter


def cli_progress(stream: Optional[TextIO] = None) -> Show:
    """The command line's progress: a bar on a terminal (`stream`, default stderr, where tqdm draws), else "lines"."""
    return True if on_terminal(stream or sys.stderr) else "lines"


def duration(seconds: float) -> str:
    """Seconds as '45 s', '12 min' or '3 h 05 min'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 90 else f"{minutes // 60} h {minutes % 60:02d} min"


class Lines:
    """tqdm's update / set_postfix / write / close, the count as one plain line at most every `every_s` seconds on stderr
    (`file`); `write` prints on stdout, as tqdm.write."""

    def __init__(self, iterable: Optional[Iterable] = None, total: Optional[int] = None, desc: str = "", initial: int = 0,
                 unit: str = "it", every_s: Optional[float] = None, file: Optional[TextIO] = None):
        self.iterable, self.desc, self.unit = iterable, desc, unit
        self.every_s = LINE_EVERY_S if every_s is None else every_s
        self.total = total if total is not None or not hasattr(iterable, "__len__") else len(iterable)
        self.n = self.start = self.shown = initial  # shown: the count of the last line printed
        self.postfix, self.file = "", file
        self.t0 = self.last = time.monotonic()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def update(self, n: int = 1) -> None:
        """Count `n` more; print a line when `every_s` have passed since the last one."""
        self.n += n
        if time.monotonic() - self.last >= self.every_s:
            self._line()

    def _line(self) -> None:
        """Print the count, what set_postfix gave, the rate and the time left."""
        now = time.monotonic()
        self.last, self.shown = now, self.n
        rate = (now - self.t0) / max(self.n - self.start, 1)  # seconds per unit
        known = self.total is not None
        left = f", about {duration(rate * max(self.total - self.n, 0))} left" if known else ""
        postfix = f", {self.postfix}" if self.postfix else ""
        units = self.unit if self.unit == "it" else f"{self.unit}s"  # tqdm's "it" stays as it is
        print(f"{self.desc}: {self.n}/{self.total if known else '?'} {units}{postfix} ({rate:.2f} s/{self.unit}{left})",
              file=self.file or sys.stderr, flush=True)

    def set_postfix(self, **values) -> None:
        """What the next line adds after the count, e.g. loss=0.61."""
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def write(self, text: str) -> None:
        """One line now, on stdout."""
        print(text, flush=True)

    def close(self) -> None:
        """The last count, when lines were printed before and it has moved since (tqdm's interface: nothing to clear)."""
        if self.start < self.shown < self.n:
            self._line()


def progress_bar(iterable: Optional[Iterable] = None, *, show: Show, total: Optional[int] = None, desc: str = "",
                 initial: int = 0, unit: str = "it", **tqdm_options):
    """A tqdm bar (`show` True), a `Lines` counter ("lines") or a silent tqdm (False) over `iterable` or to `total`."""
    if show == "lines":
        return Lines(iterable, total=total, desc=desc, initial=initial, unit=unit)
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, initial=initial, unit=unit, disable=not show, **tqdm_options)
