"""``python -m qlass`` and the ``qlass`` script: the command line (:func:`qlass.cli.main`).

Importing it takes a moment (typer, every command's module); a Ctrl-C then, before ``main`` handles
Ctrl-C itself, stops the command with the same one line rather than Python's traceback.
"""

from __future__ import annotations

import sys

from .interrupt import INTERRUPTED, STOPPED


def main() -> None:
    """Import the command line and run it."""
    try:
        from .cli import main as run
    except KeyboardInterrupt:
        sys.stderr.write(STOPPED + "\n")
        sys.exit(INTERRUPTED)
    run()


if __name__ == "__main__":
    main()
