"""The ``qlass`` command line: thin wrappers that parse options and call library functions.

Each command group lives in ``qlass.commands.<name>`` and registers itself on the app.
"""

from __future__ import annotations

import importlib
import logging
import sys

import typer

from .errors import QlassError

COMMAND_MODULES = ["data", "envs", "model", "train", "explore", "qnet", "evaluate", "report", "decisions", "run", "serve", "view"]

app = typer.Typer(
    name="qlass",
    help="QLASS: Q-guided stepwise search for language agents (SFT, explore, QNet, Q-guided inference).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    from rich.console import Console
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=False)],
        force=True,
    )
    for noisy in ("httpx", "urllib3", "filelock", "py4j"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


for _name in COMMAND_MODULES:
    importlib.import_module(f"qlass.commands.{_name}").register(app)


def main() -> None:
    """Entry point: run the app, turning :class:`QlassError` into a clear message and exit code 2."""
    try:
        code = app(standalone_mode=False)
    except QlassError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        sys.exit(130)
    except Exception as exc:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise
    sys.exit(code if isinstance(code, int) else 0)
