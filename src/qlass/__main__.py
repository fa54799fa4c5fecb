"""``python -m qlass`` runs the command line."""

from .cli import main

main()
