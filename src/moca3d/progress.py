"""Where progress bars are shown: only where they redraw in place."""


def on_terminal() -> bool:
    """True when stdout is a terminal or a notebook: a bar elsewhere (a pipe, a log file) leaves lines behind."""
    from rich.console import Console

    console = Console()
    return console.is_terminal or console.is_jupyter
