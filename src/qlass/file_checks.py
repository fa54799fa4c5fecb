"""Checks of the paths a command is given, before it reads or writes them: an output that must be a
plain file, an input that must not be a device, a model folder of regular files, a file given twice or
as both input and output."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from .errors import QlassError


def check_output_file(path: str | os.PathLike) -> None:
    """Raise :class:`QlassError` for an output path qlass must not write: one named ``*.gz`` (qlass
    writes plain text, appended to as work finishes; compress the file once the run is done), an
    existing folder, or an existing device, named pipe or socket (a write would replace it with a
    regular file, or block)."""
    p = Path(path)
    if p.name.endswith(".gz"):
        raise QlassError(f"{path}: qlass writes its outputs uncompressed; give a name without .gz (gzip the file "
                         "when the run is done: every qlass reader takes it compressed)")
    try:
        mode = p.stat().st_mode
    except OSError:  # missing (or unreadable: the write itself names the problem)
        return
    if stat.S_ISDIR(mode):
        raise QlassError(f"{path}: is a folder; this output is a file (give a file path)")
    kind = special_kind(mode)
    if kind:
        raise QlassError(f"{path}: is {kind}, not a regular file; qlass writes its outputs to files (give a file "
                         "path)")


def refuse_device(path: str | os.PathLike) -> None:
    """Raise :class:`QlassError` when ``path`` is a character or block device: reading ``/dev/zero`` as an
    input never ends and fills memory. (A named pipe is read: ``<(zcat f.gz)`` is one.)"""
    try:
        mode = Path(path).stat().st_mode
    except OSError:  # missing or unreachable: the read names the problem
        return
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        raise QlassError(f"{path}: is {special_kind(mode)}, not a file qlass can read (give a regular file)")


def special_kind(mode: int) -> str | None:
    """What a path of ``mode`` is when it is neither a regular file nor a folder."""
    for test, kind in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return None


def require_model_folder(path: str | os.PathLike, missing: str) -> None:
    """Raise :class:`QlassError` unless ``path`` holds a ``config.json`` that is a regular file: ``missing``
    is the error when there is none. A named pipe, device or socket in the folder (``config.json``,
    ``tokenizer.json``, a ``*.safetensors`` shard: it would block the loader or be read without end)
    is named."""
    config = Path(path) / "config.json"
    try:
        mode = config.stat().st_mode
    except OSError:
        raise QlassError(missing) from None
    if not stat.S_ISREG(mode):
        raise QlassError(f"{config}: is {special_kind(mode) or 'a folder'}, not a regular file; a model folder "
                         "holds its settings in a config.json file")
    for entry in sorted(Path(path).iterdir()):
        try:
            kind = special_kind(entry.stat().st_mode)
        except OSError:  # a broken link: the loader names it if it needs the file
            continue
        if kind:
            raise QlassError(f"{entry}: is {kind}, not a regular file; a model folder holds regular files (its "
                             "loader would wait on it or read it without end)")


def refuse_repeated_inputs(paths: Iterable[str | os.PathLike]) -> None:
    """Raise :class:`QlassError` when one file is given twice among ``paths`` (under any name that
    leads to it): its records would be read twice, and the error would name one place twice."""
    seen: dict[str, str] = {}
    for p in paths:
        real = os.path.realpath(p)
        if real in seen:
            same = f" (as {seen[real]})" if str(p) != seen[real] else ""
            raise QlassError(f"{p}: given twice{same}; give each file once")
        seen[real] = str(p)


def refuse_overwriting_inputs(out: str | os.PathLike, inputs: Iterable[str | os.PathLike]) -> None:
    """Raise :class:`QlassError` if ``out`` is one of ``inputs`` (writing it would destroy that input)."""
    o = Path(out)
    if not o.exists():
        return
    for p in inputs:
        if Path(p).exists() and o.samefile(p):
            raise QlassError(f"{o}: is also an input of this command; writing it would destroy that input "
                             "(give another output path)")


def followed(path: str | os.PathLike) -> Path:
    """``path``, or where it leads when it is a symbolic link: an output named through a link and by its own name
    is one output (one lock, one set of sidecar files, and a replace writes the file the link names)."""
    return Path(os.path.realpath(path)) if Path(path).is_symlink() else Path(path)


def refuse_classifier(path: Path) -> None:
    """Raise :class:`QlassError` for a QNet (or any sequence-classifier) folder given as a causal LM:
    transformers would load it with a language-model head tied to its embeddings, and it would play."""
    try:
        architectures = json.loads((path / "config.json").read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        architectures = []  # transformers names an unreadable config.json when it loads it
    if (path / "qnet.json").exists() or any(str(a).endswith("ForSequenceClassification") for a in architectures):
        raise QlassError(f"{path}: is a QNet (a sequence classifier), not a causal LM; give the SFT model here "
                         "(a QNet goes to --qnet)")
