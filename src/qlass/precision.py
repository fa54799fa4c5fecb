"""bf16 autocast only where the hardware runs it natively, and faster than fp32.

Every ``autocast`` option in qlass means "bf16 mixed precision". On GPUs and on most CPUs with native
bf16 (AVX512-BF16/AMX, Arm BF16) it speeds forwards up 1.6–2.2×; on a CPU without it (AVX2-only x86,
most laptops) torch emulates bf16 and a matrix product runs about 50× slower than in fp32 (measured:
0.9 against 44.6 GFLOPS on one AMD EPYC AVX2 thread), which turns a minutes-long run into hours. And
some CPUs that have the bf16 instructions still run it slower: on one Intel Xeon with AVX512-BF16 but
no AMX, a whole SmolLM2 forward took 1.74× as long under bf16 autocast as in fp32. So on a CPU qlass
runs bf16 only where oneDNN has native bf16 kernels *and* a bf16 linear layer is measured faster than
the fp32 one; elsewhere it runs fp32 and says so once. The measurement is made once per machine
(CPU model and flags, torch version) and kept under ``$QLASS_CACHE/precision``, so every process of a
run — and every run on that machine — computes in the same precision. ``$QLASS_CPU_BF16`` overrides it:
``on`` (bf16 whenever autocast is asked for), ``off`` (fp32 on the CPU), ``auto`` or unset (the above).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import statistics
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import QlassError
from .jsonl import read_json_object

log = logging.getLogger(__name__)

ENV_VAR = "QLASS_CPU_BF16"
#: a 256-token forward of one of the default model's MLP projections (hidden 576, intermediate 1536)
PROBE_SHAPE = (256, 576, 1536)


def cpu_bf16_setting() -> str:
    """``$QLASS_CPU_BF16`` as ``on``, ``off`` or ``auto`` (unset or empty); anything else is refused."""
    raw = os.environ.get(ENV_VAR, "").strip().lower()
    value = {"": "auto", "auto": "auto", "on": "on", "1": "on", "true": "on", "off": "off", "0": "off",
             "false": "off"}.get(raw)
    if value is None:
        raise QlassError(f"${ENV_VAR} is {os.environ[ENV_VAR]!r}: use on, off or auto (unset: auto)")
    return value


@functools.cache
def cpu_runs_bf16() -> bool:
    """Whether bf16 autocast runs on this CPU (module docstring): ``$QLASS_CPU_BF16`` when ``on`` or
    ``off``, else native bf16 kernels (oneDNN's own check) that are also faster than fp32 here
    (:func:`cpu_bf16_is_faster`). Logs once when it runs fp32 for either reason."""
    import torch

    setting = cpu_bf16_setting()
    if setting != "auto":
        log.info("bf16 autocast on the CPU: %s (set by $%s)", setting, ENV_VAR)
        return setting == "on"
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        log.warning("bf16 autocast was asked for, but this CPU (%s) has no native bf16 kernels, where bf16 "
                    "matrix products run ~50x slower than fp32 (a whole forward ~7x): running fp32 instead "
                    "(results differ from a bf16 run in rounding only)", torch.backends.cpu.get_cpu_capability())
        return False
    faster, measured = cpu_bf16_is_faster()
    if not faster:
        log.warning("bf16 autocast was asked for, but on this CPU bf16 runs slower than fp32 (%s): running fp32 "
                    "instead (results differ from a bf16 run in rounding only; $%s=on forces bf16)",
                    measured, ENV_VAR)
    return faster


def measure_linear_seconds(repeats: int = 7) -> tuple[float, float]:
    """Median seconds of a linear layer of :data:`PROBE_SHAPE` on one thread, in fp32 and under bf16
    autocast (weights cast as autocast casts them): ``repeats`` timings of three layers each, the two
    interleaved after one warm-up of each."""
    import torch

    tokens, width, out = PROBE_SHAPE
    generator = torch.Generator().manual_seed(0)
    x, w = torch.randn(tokens, width, generator=generator), torch.randn(out, width, generator=generator)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times: dict[bool, list[float]] = {False: [], True: []}
    try:
        with torch.no_grad():
            for i in range(repeats + 1):
                for bf16 in (False, True):
                    start = time.perf_counter()
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                        for _ in range(3):
                            torch.nn.functional.linear(x, w)
                    if i:
                        times[bf16].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(times[False]) / 3, statistics.median(times[True]) / 3


def _machine_key() -> str:
    """This machine as the bf16 verdict depends on it: CPU model and flags, architecture, torch version."""
    import torch

    lines: list[str] = []
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features", "CPU implementer", "CPU part")):
                    lines.append(line.strip())
                if line.strip() == "" and lines:
                    break  # the first processor's block describes them all
    except OSError:
        lines.append(platform.processor())
    lines += [platform.machine(), torch.__version__]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def cpu_bf16_is_faster() -> tuple[bool, str]:
    """Whether a bf16-autocast linear layer runs faster than an fp32 one on this machine, and the
    measurement in words. Measured once per machine (:func:`measure_linear_seconds`) and kept in
    ``$QLASS_CACHE/precision/<machine>.json``; the first process to write it decides for all."""
    from .models import cache_dir

    path = cache_dir() / "precision" / f"{_machine_key()}.json"
    verdict = _read_verdict(path)
    if verdict is None:
        if path.is_file():  # damaged (a hand edit, a full disk): replaced by this measurement
            path.unlink(missing_ok=True)
        fp32, bf16 = measure_linear_seconds()
        verdict = {"fp32_seconds": fp32, "bf16_seconds": bf16, "bf16_faster": bf16 < fp32}
        verdict = _keep_verdict(path, verdict)
    words = (f"a {PROBE_SHAPE[0]}-token linear layer took {1e3 * verdict['fp32_seconds']:.1f} ms in fp32, "
             f"{1e3 * verdict['bf16_seconds']:.1f} ms under bf16 autocast; measured once, kept in {path}")
    return bool(verdict["bf16_faster"]), words


def _read_verdict(path: Path) -> dict[str, Any] | None:
    """The verdict kept at ``path``; ``None`` when there is none or it is unreadable (it is measured again)."""
    try:
        verdict = read_json_object(path)
    except FileNotFoundError:
        return None
    except (OSError, QlassError) as exc:
        log.warning("%s: unreadable (%s); measuring bf16 against fp32 again", path, exc)
        return None
    ok = isinstance(verdict.get("bf16_faster"), bool) and all(
        isinstance(verdict.get(k), (int, float)) for k in ("fp32_seconds", "bf16_seconds"))
    if not ok:
        log.warning("%s: not a bf16 verdict; measuring bf16 against fp32 again", path)
        return None
    return verdict


def _keep_verdict(path: Path, verdict: dict[str, Any]) -> dict[str, Any]:
    """Write ``verdict`` to ``path`` unless another process already has (then return that one); where
    the cache cannot be written, the measurement is used as it is."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        temp.write_text(json.dumps(verdict) + "\n", encoding="utf-8")
        try:
            os.link(temp, path)  # fails if another process wrote first: theirs stands
            return verdict
        except FileExistsError:
            pass
        finally:
            temp.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("cannot keep the bf16 verdict in %s (%s); this process uses its own measurement", path, exc)
        return verdict
    return _read_verdict(path) or verdict


def use_autocast(requested: bool, device: Any) -> bool:
    """The effective autocast flag for a model on ``device`` (a ``torch.device`` or its name):
    ``requested``, except on a CPU where bf16 does not run natively or faster (see :func:`cpu_runs_bf16`)."""
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
