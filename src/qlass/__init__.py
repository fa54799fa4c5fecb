"""qlass: Q-guided stepwise search for language agents."""

__version__ = "0.1.0"
