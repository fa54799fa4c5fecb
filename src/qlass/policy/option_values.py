"""Range checks of the built-in backends' policy options (types are checked by
:func:`qlass.config.check_call_options`). :func:`qlass.policy.check_policy_options` runs them before
any work, so ``qlass run`` refuses ``policy: {dtype: bogus}`` before stage 1 rather than when
exploration loads the policy; the backends' constructors run them again. The local backend's parameter list is
here too (:func:`hf_policy_options`), so that none of this imports torch."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import QlassError

HF_DTYPES = ("float32", "bfloat16", "float16")
KNOWN_DEVICE = re.compile(r"auto|(cpu|cuda|mps)(:(0|[1-9]\d*))?")
"""Device names torch parses (whether the machine has that device is checked when the model loads)."""
ENDPOINTS = ("auto", "completions", "chat")


def check_sampling(top_p: float, min_p: float) -> None:
    """Raise :class:`QlassError` for a nucleus mass outside (0, 1] or a min-p outside [0, 1]."""
    if not 0 < top_p <= 1:
        raise QlassError(f"policy option top_p must be in (0, 1], got {top_p!r}")
    if not 0 <= min_p <= 1:
        raise QlassError(f"policy option min_p must be in [0, 1], got {min_p!r}")


def _at_least(options: Mapping[str, Any], name: str, low: float) -> None:
    value = options.get(name)
    if value is not None and (isinstance(value, bool) or not value >= low):  # NaN fails too
        raise QlassError(f"policy option {name} must be >= {low}, got {value!r}")


def check_hf_options(options: Mapping[str, Any]) -> None:
    """The values :class:`~qlass.policy.hf.HFPolicy` takes, checked without loading the model."""
    check_sampling(options.get("top_p", 1.0), options.get("min_p", 0.0))
    dtype = options.get("dtype", "float32")
    if dtype not in HF_DTYPES:
        raise QlassError(f"unknown dtype {dtype!r}; use one of {', '.join(HF_DTYPES)}")
    threads = options.get("threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise QlassError(f"policy option threads must be an integer >= 1, got {threads!r}")
    for name, low in (("max_length", 1), ("cache_slots", 0), ("max_batch_rows", 1)):
        _at_least(options, name, low)
    device = options.get("device", "auto")
    if not (isinstance(device, str) and KNOWN_DEVICE.fullmatch(device)):
        import torch  # only a name this module does not know needs torch to be judged

        try:
            torch.device(device)
        except (RuntimeError, ValueError, TypeError):
            raise QlassError(f"unknown torch device {device!r} (use auto, cpu, cuda, cuda:N or mps)") from None


def hf_policy_options(model_dir: str | Path, dtype: str = "float32", autocast: bool = False, max_length: int = 4096,
                      cache_slots: int = 8, threads: int | None = None, device: str = "auto", seed: int = 0,
                      max_batch_rows: int = 64, top_p: float = 1.0, min_p: float = 0.0, distinct: bool = False) -> None:
    """The parameters of :class:`~qlass.policy.hf.HFPolicy` (documented there), readable without importing
    torch: :func:`~qlass.policy.check_policy_options` checks a model's options against them, so a misspelt or
    mistyped option is reported in a fraction of a second. A test keeps them equal to the constructor's."""


def check_openai_options(options: Mapping[str, Any]) -> None:
    """The values :class:`~qlass.policy.openai.OpenAIPolicy` takes, checked without a request."""
    check_sampling(options.get("top_p", 1.0), options.get("min_p", 0.0))
    endpoint = options.get("endpoint", "auto")
    if endpoint not in ENDPOINTS:
        raise QlassError(f"unknown endpoint {endpoint!r}; use completions, chat or auto")
    for name, low in (("concurrency", 1), ("max_length", 1)):
        _at_least(options, name, low)
    check_request_options(options)


def check_request_options(options: Mapping[str, Any]) -> None:
    """The request settings of an OpenAI-compatible client, where given: ``timeout`` > 0
    (seconds); ``max_retries``, ``backoff`` and ``max_backoff`` >= 0."""
    timeout = options.get("timeout")
    if timeout is not None and not timeout > 0:  # NaN fails too
        raise QlassError(f"policy option timeout must be > 0, got {timeout!r}")
    for name in ("max_retries", "backoff", "max_backoff"):
        _at_least(options, name, 0)
