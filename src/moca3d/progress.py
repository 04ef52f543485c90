"""Where progress bars are shown: only where they redraw in place."""

import sys
from typing import Optional, TextIO


def on_terminal(stream: Optional[TextIO] = None) -> bool:
    """True when `stream` (stdout, where rich draws; tqdm draws on sys.stderr) is a terminal or a notebook: a bar
    elsewhere (a pipe, a log file) leaves lines behind."""
    from rich.console import Console

    console = Console(file=stream or sys.stdout)
    return console.is_terminal or console.is_jupyter
