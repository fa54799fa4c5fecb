"""bf16 autocast only where the hardware runs it natively.

Every ``autocast`` option in qlass means "bf16 mixed precision". On GPUs and on CPUs with native
bf16 (AVX512 with oneDNN's bf16 kernels, AVX512-BF16/AMX, Arm BF16) it speeds forwards up 1.6–2.2×;
on a CPU without it (AVX2-only x86, most laptops) torch emulates bf16 and a matrix product runs
about 50× slower than in fp32 (measured: 0.9 against 44.6 GFLOPS on one AMD EPYC AVX2 thread),
which turns a minutes-long run into hours. There qlass runs fp32 instead and says so once.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@functools.cache
def cpu_runs_bf16() -> bool:
    """Whether this CPU has native bf16 matrix kernels (oneDNN's own check); logs once if not."""
    import torch

    native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if not native:
        log.warning("bf16 autocast was asked for, but this CPU (%s) has no native bf16 kernels, where bf16 "
                    "matrix products run ~50x slower than fp32 (a whole forward ~7x): running fp32 instead "
                    "(results differ from a bf16 run in rounding only)", torch.backends.cpu.get_cpu_capability())
    return native


def use_autocast(requested: bool, device: Any) -> bool:
    """The effective autocast flag for a model on ``device`` (a ``torch.device`` or its name):
    ``requested``, except on a CPU without native bf16 (see :func:`cpu_runs_bf16`)."""
    import torch

    if not requested:
        return False
    return torch.device(device).type != "cpu" or cpu_runs_bf16()


def bf16_autocast(device: Any, requested: bool) -> Any:
    """``torch.autocast`` to bf16 on ``device`` when :func:`use_autocast` allows it, else a no-op context."""
    import torch

    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast(requested, device))


def policy_precision(spec: str, options: Mapping[str, Any]) -> str | None:
    """What the local-model policy ``spec`` (a model folder or ``default``) with ``options`` computes in
    on this machine: its ``dtype`` when not float32, else ``bf16`` (autocast where it runs natively) or
    ``fp32``; ``None`` for a server URL or a user's policy class, whose precision is their own."""
    if spec != "default" and not Path(spec).is_dir():
        return None
    from .models import resolve_device

    dtype = str(options.get("dtype", "float32"))
    if dtype != "float32":
        return dtype
    device = resolve_device(str(options.get("device", "auto")))
    return "bf16" if use_autocast(bool(options.get("autocast", False)), device) else "fp32"


def with_precision(settings: Mapping[str, Any], here: bool = True) -> dict[str, Any]:
    """A run's recorded ``settings`` (``model``, ``policy``) with ``precision`` added where a local model
    plays on this machine (:func:`policy_precision`; ``here=False``: the workers run elsewhere, e.g. on a
    Ray cluster, and nothing is added): ``autocast: true`` alone says what was asked, not what ran, and
    a run resumed where it would compute in another precision is refused like any changed setting."""
    local = here and "model" in settings
    precision = policy_precision(str(settings["model"]), settings.get("policy") or {}) if local else None
    return {**settings, "precision": precision} if precision else dict(settings)
