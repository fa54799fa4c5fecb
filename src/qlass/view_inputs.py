"""What ``qlass view`` reads: :func:`detect_kind` tells a trees, records or decisions file apart by its
first record (:data:`SNIFF_BYTES` of it, where that tells), refusing anything else — a named pipe or
device included, as reading one could block for ever; :func:`find_inputs` collects such files under a
run folder, links followed once each.
"""

from __future__ import annotations

import codecs
import contextlib
import gzip
import json
import logging
import os
import re
import stat
import zlib
from pathlib import Path

from .errors import QlassError
from .jsonl import GZIP_MAGIC

log = logging.getLogger(__name__)

KINDS = ("trees", "records", "decisions")
MAX_SCAN_DEPTH = 6
"""How many folders deep below a run folder :func:`find_inputs` looks for input files (a folder below that
is named in a warning)."""
SNIFF_BYTES = 1 << 20
"""How much of a file's first line :func:`_first_fields` reads to tell what the file is."""
LONG_LEADING = frozenset({"prefix", "history"})
"""Fields qlass writes before the ones that tell a trees or decisions file (``nodes``, ``candidates``), and
that can be long: a first line cut inside one is read further, up to :data:`LINE_BYTES`."""
LINE_BYTES = 64 << 20
"""The longest first line :func:`_first_fields` reads whole to tell a file's kind."""


def first_line(path: Path, size: int = SNIFF_BYTES) -> tuple[bytes, bool] | None:
    """The first non-blank line of ``path`` (decompressed where gzip-compressed, without a byte order mark),
    at most ``size`` bytes of it, and whether that is the whole line; None when the file has none."""
    with open(path, "rb") as raw:
        compressed = raw.read(2) == GZIP_MAGIC
        raw.seek(0)
        with gzip.GzipFile(fileobj=raw) if compressed else contextlib.nullcontext(raw) as fh:
            if fh.read(3) != codecs.BOM_UTF8:
                fh.seek(0)
            line = fh.readline(size)
            while line and not line.strip():
                line = fh.readline(size)
    return (line, line.endswith(b"\n") or len(line) < size) if line else None


def _leading_fields(text: str) -> set[str] | None:
    """The fields of the JSON object that ``text`` begins, as far as ``text`` reaches (None when ``text``
    does not begin an object)."""
    skip, decoder = re.compile(r"\s*").match, json.JSONDecoder()
    at = skip(text).end()
    if not text.startswith("{", at):
        return None
    fields: set[str] = set()
    while text.startswith('"', at := skip(text, at + 1).end()):
        try:
            name, at = json.decoder.scanstring(text, at + 1)
            if not text.startswith(":", at := skip(text, at).end()):
                break
            fields.add(name)
            at = decoder.raw_decode(text, skip(text, at + 1).end())[1]
        except (ValueError, RecursionError):  # the text ends inside this field
            break
        if not text.startswith(",", at := skip(text, at).end()):
            break
    return fields


def _first_fields(path: Path) -> set[str] | None:
    """The fields of the first record of a JSON Lines file, gzip-compressed or not (None when the file has
    no record). :data:`SNIFF_BYTES` of the first line are read: of a longer one that begins a JSON object,
    the fields that begin within them; where those do not tell the file's kind and a long field qlass
    writes early (:data:`LONG_LEADING`, such as a decision's history) is among them, the whole line, up
    to :data:`LINE_BYTES` (a longer one is refused)."""
    try:
        first = first_line(path)
        if first is None:
            return None
        line, whole = first
        if not whole:
            fields = _leading_fields(codecs.getincrementaldecoder("utf-8")().decode(line))
            if fields is None:
                raise QlassError(f"{path}: the first line is longer than {SNIFF_BYTES >> 20} MiB and does not "
                                 "begin a JSON object; not JSON Lines")
            if _kind_of(fields) or not fields & LONG_LEADING:
                return fields
            line, whole = first_line(path, LINE_BYTES)  # type: ignore[misc]  # the file has a first line
            if not whole:
                raise QlassError(f"{path}: the first record is longer than {LINE_BYTES >> 20} MiB before the "
                                 "fields that tell its kind; not read")
        rec = json.loads(line.decode("utf-8"), parse_int=len)  # the fields tell; a bad number is the reader's
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, EOFError, zlib.error) as exc:
        raise QlassError(f"{path}: not JSON Lines ({exc})") from None
    except gzip.BadGzipFile as exc:
        raise QlassError(f"{path}: gzip-compressed but damaged ({exc})") from None
    if not isinstance(rec, dict):
        raise QlassError(f"{path}: the first line is JSON but not an object")
    return set(rec)


def _kind_of(fields: set[str]) -> str | None:
    if "nodes" in fields and "tree_id" in fields:
        return "trees"
    if "method" in fields and "trajectory" in fields:
        return "records"
    if "candidates" in fields and "history" in fields:
        return "decisions"
    return None


def detect_kind(path: str | os.PathLike) -> str:
    """``run`` for a folder, else ``trees``, ``records`` or ``decisions`` by the file's first record;
    anything else (a named pipe or device included: reading one could block for ever) raises
    :class:`QlassError` naming the path."""
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        raise QlassError(f"{p}: no such file or folder") from None
    if stat.S_ISDIR(mode):
        return "run"
    if not stat.S_ISREG(mode):
        raise QlassError(f"{p}: not a regular file or folder; qlass view reads trees, records and decisions files "
                         "and run folders")
    fields = _first_fields(p)
    if fields is None:
        raise QlassError(f"{p}: the file holds no record")
    kind = _kind_of(fields)
    if kind is None:
        raise QlassError(f"{p}: not a trees.jsonl, records.jsonl or decisions file "
                         f"(its first record has the fields {', '.join(sorted(fields)[:12]) or '(none)'})")
    return kind


def _walk(root: Path) -> list[Path]:
    """The regular files under ``root`` and its folders down to :data:`MAX_SCAN_DEPTH` (hidden names left
    out), in path order. Links are followed, but each folder is read and each file listed once, where it is
    nearest ``root`` (a link to a parent folder would loop)."""
    top = _identity(root)
    seen, found, level, deeper = {top[1]} if top else set(), [], [root], []
    for depth in range(MAX_SCAN_DEPTH + 1):
        below = []
        for folder in level:
            try:
                entries = sorted(folder.iterdir())
            except OSError:
                continue
            for e in entries:
                ident = _identity(e)
                if e.name.startswith(".") or ident is None or ident[1] in seen:
                    continue
                seen.add(ident[1])
                if stat.S_ISDIR(ident[0]):
                    (below if depth < MAX_SCAN_DEPTH else deeper).append(e)
                elif stat.S_ISREG(ident[0]):
                    found.append(e)
        level = below
    if deeper:
        log.warning("%s: not looking more than %d folders deep: %d folder(s) left out, e.g. %s (view a folder "
                    "nearer the files)", root, MAX_SCAN_DEPTH, len(deeper), deeper[0])
    return sorted(found, key=lambda p: p.parts)


def _identity(path: Path) -> tuple[int, tuple[int, int]] | None:
    """The mode of ``path`` and its (device, inode), links followed; None when it cannot be read (a
    dangling link)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mode, (st.st_dev, st.st_ino)


def find_inputs(folder: str | os.PathLike) -> dict[str, list[Path]]:
    """The viewable files under a run folder: ``trees``, ``records`` and ``decisions`` (JSON Lines
    files recognised by their first record) and ``results`` (``results.json`` files)."""
    found: dict[str, list[Path]] = {k: [] for k in (*KINDS, "results")}
    for p in _walk(Path(folder)):
        if p.name == "results.json":
            found["results"].append(p)
        elif p.name.endswith((".jsonl", ".jsonl.gz")) and not p.name.endswith((".tasks.jsonl", ".tasks.jsonl.gz")):
            try:
                fields = _first_fields(p)
            except QlassError as exc:  # a file qlass writes under these names is worth a word; others are not
                known = p.name.removesuffix(".gz") in ("trees.jsonl", "records.jsonl", "qdata.jsonl") \
                    or "decisions" in p.name
                (log.warning if known else log.debug)("skipping %s: %s", p, exc)
                continue
            kind = _kind_of(fields) if fields else None
            if kind:
                found[kind].append(p)
    return found
