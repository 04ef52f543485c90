"""`moca3d <verb>`: the command-line interface.

Each module in `moca3d.commands` defines `register(app)`, adding its verbs. Heavy imports stay
inside the command functions so that `moca3d --help` is instant.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import warnings

import typer

from moca3d.commands.common import first_process
from moca3d.errors import InputWarning, MoCA3DError, out_of_memory

app = typer.Typer(
    name="moca3d",
    help="Compositional 3D generation with Mixture-of-Components (MoC) attention: "
    "one image -> N part (or instance) meshes in one frame.",
    epilog="Start here: moca3d generate examples/chair.png --parts 8 -o chair.glb (the built-in model; examples/ is in the "
    "source repository, and any render of one object on a plain background will do), then "
    "moca3d render chair.glb -o chair.png. Every verb has --help; the README shows the whole workflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Compositional 3D generation with Mixture-of-Components attention."""


@app.command("version")
def version() -> None:
    """Print the installed moca3d version."""
    from moca3d import __version__

    typer.echo(__version__)


# The order `moca3d --help` lists the verbs in: use, evaluate, then the training workflow; others after.
VERB_ORDER = ("generate", "generate-scene", "demo", "render", "evaluate", "evaluate-model", "evaluate-scenes",
              "prepare", "train-vae", "eval-vae", "reconstruct", "encode-dataset", "cache-latents",
              "pretrain-encoder", "train", "train-scene", "train-default", "info", "version")


def _register_commands() -> None:
    import moca3d.commands as commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"moca3d.commands.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(app)
    rank = {name: i for i, name in enumerate(VERB_ORDER)}
    app.registered_commands.sort(key=lambda c: rank.get(c.name, len(rank)))


_register_commands()


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Our InputWarnings as one yellow line on stderr, said by the first process of a multi-process launch alone (each
    reads the same data: torchrun's 8 processes said each line 8 times); any other warning as Python shows it."""
    if issubclass(category, InputWarning):
        if not first_process():
            return
        typer.secho(f"warning: {message}", fg=typer.colors.YELLOW, err=True)
    else:
        PYTHON_SHOWWARNING(message, category, filename, lineno, file, line)


PYTHON_SHOWWARNING = warnings.showwarning


def usage_line(err: Exception) -> str:
    """A click usage error (an unknown flag, a missing option, a bad value) as one line naming the verb's --help."""
    ctx = getattr(err, "ctx", None)
    message = err.format_message() if hasattr(err, "format_message") else str(err)
    return f"{message} (see {ctx.command_path} --help)" if ctx is not None else message


def _run() -> None:
    """The CLI: a usage error is one `error:` line, as every other bad input (typer drew a box of five), said by the
    first process of a launch alone (torchrun's 8 processes printed it 8 times); the others end with its status."""
    try:
        code = app(standalone_mode=False)
    except typer.Abort:  # end of input at a prompt (Ctrl+C comes back as exit code 130)
        if first_process():
            typer.echo("aborted", err=True)
        sys.exit(1)
    except typer.TyperException as err:  # click's usage errors (typer carries its own click)
        if first_process():
            if type(err).__name__ != "NoArgsIsHelpError":
                typer.secho(f"error: {usage_line(err)}", fg=typer.colors.RED, err=True)
            elif err.format_message():  # `moca3d` alone, or a group without its verb: its help (typer's rich one: printed)
                typer.echo(err.format_message())
        sys.exit(getattr(err, "exit_code", 2))
    sys.exit(code if isinstance(code, int) else 0)


def main() -> None:
    """Console entry point: bad input ends with one clear line, not a stack trace."""
    warnings.showwarning = show_warning
    try:
        _run()
    except MoCA3DError as err:  # each process of a launch meets the same one: the first says it
        if first_process():
            typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except OSError as err:  # a failed read or write (permission, disk full): its reason and file, one line
        where = f": {err.filename}" if err.filename else ""
        typer.secho(f"error: {err.strerror or err}{where}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except (MemoryError, RuntimeError) as err:  # torch's OutOfMemoryError (CUDA) and CPU allocation failures among them
        if not out_of_memory(err):
            raise
        detail = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        typer.secho(f"error: out of memory ({detail}): lower the batch size, resolution or point count", fg=typer.colors.RED, err=True)
        sys.exit(2)
