"""Settings recorded beside a run's outputs, and the check that adds to those outputs only with the same.

Every stage that appends to earlier work (evaluation records, trees, decisions, paraphrases, trained
models) saves the settings that made it and, on a rerun, compares them with the new ones
(:func:`check_recorded`): a difference is refused, naming every changed setting
(:func:`setting_changes`), so results made with other settings never mix silently. Runtime
settings (:data:`RUNTIME_SETTINGS`: where and how fast work runs) may change.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from .config import load_yaml
from .errors import QlassError

RUNTIME_SETTINGS = frozenset({"threads", "device", "cache_slots", "max_batch_rows", "concurrency", "workers",
                              "backend", "timeout", "max_retries", "backoff", "max_backoff", "api_key_env"})
"""Setting names (at any depth) that change where or how fast work runs, not what it produces."""
OPEN_SETTINGS = ("policy", "env_args")
"""Mappings of constructor options: an option set on one side only is a change (the other used its default)."""
_UNSET = object()


MODEL_SETTINGS = ("model", "qnet", "sft_model", "base_model")
"""Settings that name a model: two spellings of one existing folder (``m``, ``m/``, ``/abs/m``) are the same."""
FILES_SUFFIX = "_files"
"""``model_files`` (``qnet_files``): the fingerprint of the folder that ``model`` (``qnet``) names."""


def model_files(model_dir: str | Path) -> dict[str, list[int]]:
    """Size and modification time (ns) of a model folder's config and weight files: a model replaced at
    the same path changes them."""
    folder = Path(model_dir)
    files = sorted([folder / "config.json", *folder.glob("*.safetensors")])
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files if p.is_file()}


def with_model_files(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` plus ``model_files`` / ``qnet_files`` (:func:`model_files`) for its ``model`` and
    ``qnet`` where they name a folder, so that a rerun with another model saved at the same path is
    refused rather than mixed in."""
    out = dict(settings)
    for key in ("model", "qnet"):
        value = settings.get(key)
        if isinstance(value, str) and Path(value).is_dir():
            out[key + FILES_SUFFIX] = model_files(value)
    return out


def same_path(old: Any, new: Any) -> bool:
    """Whether the strings ``old`` and ``new`` name one existing file or folder."""
    try:
        return isinstance(old, str) and isinstance(new, str) and Path(new).samefile(old)
    except OSError:
        return False


def _same_folder(old: Any, new: Any) -> bool:
    """Whether ``old`` and ``new`` name one existing folder."""
    return isinstance(old, str) and Path(old).is_dir() and same_path(old, new)


def _same_files(before: Mapping[str, Any], now: Mapping[str, Any], key: str) -> bool:
    """Whether both record the same non-empty fingerprint for the model ``key`` names (a folder moved, or
    copied with its files' times, is the same model under another path)."""
    old, new = before.get(key + FILES_SUFFIX), now.get(key + FILES_SUFFIX)
    return isinstance(old, Mapping) and bool(old) and old == new


def setting_changes(before: Mapping[str, Any], now: Mapping[str, Any], ignore: Collection[str] = (),
                    open_: Collection[str] = OPEN_SETTINGS, prefix: str = "") -> list[str]:
    """``"name: old → new"`` for every recorded setting of ``before`` that ``now`` changes; nested
    mappings by dotted name (``policy.dtype``). Left out: :data:`RUNTIME_SETTINGS` names at any
    depth, the dotted names in ``ignore``, and a name that one side lacks (recorded by an older or
    newer qlass: unknown, taken as compatible) — except for the mappings named in ``open_``
    (constructor options): one missing counts as empty, and an option set on one run only is a
    change (the other run used the constructor's default)."""
    changes: list[str] = []
    is_open = prefix[:-1] in open_
    for key in list(now) + [k for k in before if k not in now]:
        name = f"{prefix}{key}"
        if key in RUNTIME_SETTINGS or name in ignore:
            continue
        old, new = before.get(key, _UNSET), now.get(key, _UNSET)
        if name in open_:
            old, new = ({} if v is _UNSET else v for v in (old, new))
        if name.endswith(FILES_SUFFIX) and isinstance(old, Mapping) and isinstance(new, Mapping):
            folder = key[:-len(FILES_SUFFIX)]  # a moved model is named by its path's change, not twice
            if old != new and (before.get(folder) == now.get(folder) or _same_folder(before.get(folder),
                                                                                    now.get(folder))):
                changes.append(f"{name[:-len(FILES_SUFFIX)]}: another model at the same path (its config or weight "
                               "files differ in size or time from the recorded run's)")
        elif isinstance(old, Mapping) and isinstance(new, Mapping):
            changes += setting_changes(old, new, ignore, open_, f"{name}.")
        elif old is _UNSET or new is _UNSET:
            if is_open:
                changes.append(f"{name}: {'(unset)' if old is _UNSET else repr(old)} → "
                               f"{'(unset)' if new is _UNSET else repr(new)}")
        elif old != new and not (name in MODEL_SETTINGS and (_same_folder(old, new) or _same_files(before, now, key))):
            changes.append(f"{name}: {old!r} → {new!r}")
    return changes


def records_setting(settings: Mapping[str, Any], name: str) -> bool:
    """Whether ``settings`` hold the dotted ``name`` (``options.k``: key ``k`` of mapping ``options``)."""
    value: Any = settings
    for key in name.split("."):
        if not isinstance(value, Mapping) or key not in value:
            return False
        value = value[key]
    return True


def check_recorded(path: str | Path, now: Mapping[str, Any], what: str, ignore: Collection[str] = (),
                   advice: str = "use another output for these settings",
                   recorded: Mapping[str, Any] | None = None, required: Collection[str] = ()) -> None:
    """Refuse to add to ``what`` when the settings recorded in the YAML file ``path`` (or ``recorded``,
    as read from it) differ from ``now`` (:func:`setting_changes`), naming every difference; a missing
    file records nothing. ``required`` (given when ``what`` holds earlier work): settings of ``now``
    that the file must record, dotted names reaching into mappings (``options.k``) — a missing file,
    or one emptied or cut by hand, is refused too, since the earlier work's settings are then unknown; and so is
    ``now`` without a ``required`` setting that the file records (a library call given no ``settings``)."""
    if recorded is None:
        if not Path(path).exists():
            if required:
                raise QlassError(f"{what} holds earlier work but {path} is missing, so its settings are unknown "
                                 f"and new work could mix with others; {advice} (or restore the file)")
            return
        recorded = load_yaml(path)
    missing = [k for k in required if records_setting(now, k) and not records_setting(recorded, k)]
    if missing:
        raise QlassError(f"{path} does not record {', '.join(map(repr, missing))}, so the settings of {what} are "
                         f"unknown and new work could mix with others; {advice} (or restore the file)")
    unsaid = [k for k in required if records_setting(recorded, k) and not records_setting(now, k)]
    if unsaid:  # a library call without its settings: another model's work would join unchecked
        raise QlassError(f"{what} was made with {', '.join(map(repr, unsaid))} recorded in {path}, and this run "
                         f"gives none, so it cannot be checked against them: give the same settings, or {advice}")
    changes = setting_changes(recorded, now, ignore)
    if changes:
        hint = ("; on a CPU, $QLASS_CPU_BF16=on or off sets the precision (qlass.precision)"
                if any(c.startswith("precision: ") for c in changes) else "")
        raise QlassError(f"{what} was made with other settings ({'; '.join(changes)}; see {path}); {advice}{hint}")
