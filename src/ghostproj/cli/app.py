"""The ``ghostproj`` command line's application: the parser every command registers with,
and :func:`main`, which turns each user error into one sentence and an exit code."""

from __future__ import annotations

import functools
import math
import os
import sys

import typer

from ..errors import GhostprojError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
    help="Per-example gradient projection and influence scoring for transformer language models.\n\n"
         "Exit codes: 0 success; 1 a check failed (naive-check, non-interf); 2 bad input or a damaged run "
         "(one sentence on stderr); 3 inspect found an unfinished run; 130 interrupted.",
)

# Help panels, so that long commands read as groups of a few options.
MODEL, DATA, PROJECTION, OUTPUT, RUN, SCORING = "Model", "Data", "Projection", "Output", "Run", "Scoring"


DEMO_MODEL, DEMO_DATA = "the embedded demo model", "the embedded demo corpus"


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"ghostproj {version('ghostproj')}")
        except PackageNotFoundError:
            from .. import __version__

            typer.echo(f"ghostproj {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                        help="Print the version and exit.")) -> None:
    """Per-example gradient projection and influence scoring for transformer language models.

    Exit codes: 0 success; 1 a check failed (naive-check, non-interf); 2 bad input or a
    damaged run (one sentence on stderr); 3 inspect found an unfinished run; 130 interrupted."""


def console_out():
    from ..progress import console

    return console


def console_err():
    from ..progress import status

    return status


def print_notes(notes) -> None:
    for note in notes:
        console_err().print(f"[yellow]note:[/yellow] {markup_safe(note)}")


def markup_safe(text: str) -> str:
    from rich.markup import escape

    return escape(str(text))


class Interrupted(BaseException):
    """Ctrl-C, raised in place of KeyboardInterrupt so that it reaches :func:`main` (the
    command-line framework would turn a KeyboardInterrupt into a silent exit first)."""


def _on_sigint(signum, frame):
    raise Interrupted()


def _finite_floats(command) -> None:
    """Every float option of every command, present and future, refuses NaN and +-inf (the
    parser takes both as floats): each command's function is wrapped to check its values
    before it runs."""
    for sub in getattr(command, "commands", {}).values():
        _finite_floats(sub)
    if command.callback is None:
        return
    flags = {p.name: max(p.opts, key=len) for p in command.params if getattr(p, "opts", None)}
    inner = command.callback

    @functools.wraps(inner)
    def checked(*args, **kwargs):
        for name, value in kwargs.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise GhostprojError(f"{flags.get(name, name)} must be a finite number, got {value}.")
        return inner(*args, **kwargs)

    command.callback = checked


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one sentence on stderr and a non-zero exit."""
    import signal
    import threading

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, _on_sigint)
    try:
        command = typer.main.get_command(app)
        _finite_floats(command)
        command(args=argv, prog_name="ghostproj")  # standalone: usage errors print usage and exit 2
    except GhostprojError as exc:
        console_err().print(f"[red]error:[/red] {markup_safe(exc)}", highlight=False)
        sys.exit(2)
    except (Interrupted, KeyboardInterrupt):
        args = sys.argv[1:] if argv is None else argv
        if "project" in args[:1]:
            console_err().print("[yellow]interrupted[/yellow]: every complete shard is kept; rerun the same "
                                "command to resume.")
        elif "factors" in args[:1] and "--merge" not in args:
            console_err().print("[yellow]interrupted[/yellow]: the running sums last saved (--checkpoint-minutes) "
                                "are kept; rerun the same command to resume.")
        else:  # the other commands write their outputs whole at the end, atomically
            console_err().print("[yellow]interrupted[/yellow]: no output was written.")
        sys.exit(130)
    except OSError as exc:
        what = exc.strerror or str(exc)
        console_err().print(f"[red]error:[/red] {markup_safe(what)} ({markup_safe(exc.filename or 'file system')}).",
                        highlight=False)
        sys.exit(2)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
