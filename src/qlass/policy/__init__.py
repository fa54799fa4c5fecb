"""Policies: the batch-first sampling protocol and its backends.

``load_policy(spec)`` builds one from a local causal-LM folder (:class:`HFPolicy`) or from the base
URL of an OpenAI-compatible server (``http(s)://host:port/v1``, :class:`OpenAIPolicy`).
"""

from __future__ import annotations

from typing import Any

from .base import Policy

__all__ = ["Policy", "load_policy"]


def load_policy(spec: str, **options: Any) -> Policy:
    """A policy from a model folder, ``default`` (the offline default model), or a server URL."""
    if spec.startswith(("http://", "https://")):
        from .openai import OpenAIPolicy

        return OpenAIPolicy(spec, **options)
    from .hf import HFPolicy

    if spec == "default":
        from ..models import default_model_dir

        spec = str(default_model_dir())
    return HFPolicy(spec, **options)
