"""Policies: the batch-first sampling protocol and its backends."""
