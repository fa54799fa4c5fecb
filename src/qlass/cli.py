"""The ``qlass`` command line: thin wrappers that parse options and call library functions.

Each command group lives in ``qlass.commands.<name>`` and registers itself on the app.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path

import typer

from . import interrupt
from .errors import QlassError

COMMAND_MODULES = ["data", "envs", "model", "train", "explore", "qnet", "evaluate", "report", "decisions", "run",
                   "serve", "view", "rft", "eto", "paraphrase"]

app = typer.Typer(
    name="qlass",
    help="QLASS: Q-guided stepwise search for language agents (SFT, explore, QNet, Q-guided inference).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _print_version(asked: bool) -> None:
    if asked:
        from . import __version__

        typer.echo(f"qlass {__version__}")
        raise typer.Exit()


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
          version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print qlass's version and exit.")) -> None:
    from rich.console import Console
    from rich.logging import RichHandler

    if sys.stderr.isatty():
        handler: logging.Handler = RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(message)s", datefmt="[%X]"))
    else:  # a log file or pipe: one plain line per record, never wrapped, so it can be searched
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[%(asctime)s] %(levelname)-8s %(message)s", datefmt="%X"))
    if not verbose:
        handler.addFilter(_not_py4j_root_record)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler], force=True)
    for noisy in ("httpx", "urllib3", "filelock", "py4j", "gguf", "torch"):  # torch: its exit hook, when Ctrl-C
        # cut its import short (before it set up its own loggers), logged "FakeTensor cache stats" at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _not_py4j_root_record(record: logging.LogRecord) -> bool:
    """False for what py4j (ScienceWorld's bridge to its JVM) logs through the root logger rather than its own
    ``py4j`` one: the tracebacks of a Ctrl-C that reached a step (qlass says in one line that it stopped), of
    connections it retries. ``qlass -v`` shows them."""
    return not (record.name == "root" and "py4j" in Path(record.pathname).parts)


for _name in COMMAND_MODULES:
    importlib.import_module(f"qlass.commands.{_name}").register(app)


def _usage_errors() -> tuple[type[Exception], ...]:
    """Click's usage-error base classes: click's own and the copy that newer typer vendors as
    ``typer._click`` (a different class, so both are needed)."""
    found = []
    for module in ("click.exceptions", "typer._click.exceptions"):
        try:
            found.append(importlib.import_module(module).ClickException)
        except (ImportError, AttributeError):
            pass
    return tuple(found)


def os_error_message(exc: OSError) -> str:
    """A one-line message for a failed file operation, naming the path and what is wrong with it."""
    path = exc.filename2 if isinstance(exc, IsADirectoryError) and exc.filename2 else exc.filename
    if path is None:
        return exc.strerror or str(exc)
    if isinstance(exc, IsADirectoryError):
        return f"{path}: is a folder; a file is expected here"
    if isinstance(exc, FileExistsError) and not os.path.isdir(path):
        return f"{path}: is a file; a folder is expected here"
    if isinstance(exc, NotADirectoryError):
        return f"{path}: a file is in the way where a folder is expected (in this path)"
    return f"{path}: {exc.strerror or exc}"


def main() -> None:
    """Entry point: run the app, turning :class:`QlassError`, usage errors and failed file operations
    into a clear message (no traceback; ``-v`` logs it) and a non-zero exit code."""
    interrupt.install()
    # transformers' own bars (a "Writing model shards" bar at every checkpoint and model save) are off in the
    # command's process and those it starts, before transformers is imported: qlass shows progress its own way,
    # and in a log file each bar was a line of carriage returns. HF_HUB_DISABLE_PROGRESS_BARS=0 keeps them.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        code = app(standalone_mode=False)
    except QlassError as exc:
        logging.getLogger(__name__).debug("error", exc_info=True)  # -v: where it came from (an env's own code)
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        code = interrupt.INTERRUPTED
    except _usage_errors() as exc:  # click's (or typer's vendored click's) usage errors: show, exit 2
        exc.show()  # type: ignore[attr-defined]
        sys.exit(exc.exit_code)  # type: ignore[attr-defined]
    except OSError as exc:  # a path of the wrong kind, a full disk, no permission ...
        logging.getLogger(__name__).debug("failed file operation", exc_info=True)
        typer.echo(f"error: {os_error_message(exc)}", err=True)
        sys.exit(2)
    if code == interrupt.INTERRUPTED:  # typer returns Ctrl-C inside a command as this exit code
        typer.echo(interrupt.STOPPED, err=True)
    sys.exit(code if isinstance(code, int) else 0)
