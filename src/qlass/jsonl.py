"""Crash-safe JSON Lines: whole-line appends with fsync, and reading that repairs a torn tail.

Every resumable stage (exploration, evaluation) appends one finished unit of work per line, so a
``kill -9`` can at worst leave one partial last line; :func:`read_jsonl` reports and removes it.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import json
import logging
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Iterable

from .errors import DataError, QlassError
from .file_checks import check_output_file, followed, refuse_device, special_kind

log = logging.getLogger(__name__)

GZIP_MAGIC = b"\x1f\x8b"


MAX_INTEGER = int(sys.float_info.max)
"""The largest integer qlass reads from JSON (about 1.8e308, the largest float): a larger one overflowed the
readers' float arithmetic (a traceback), one of over 4300 digits Python's conversion of the text."""


class JSONContentError(ValueError):
    """JSON that parses but that no qlass reader takes: :class:`DuplicateKeyError`,
    :class:`IntegerTooLargeError`."""


class DuplicateKeyError(JSONContentError):
    """A JSON object that gives one key twice (``json`` would silently keep the last value)."""

    def __init__(self, key: str):
        super().__init__(f"key {key!r} appears twice in one object")
        self.key = key


class IntegerTooLargeError(JSONContentError):
    """An integer of magnitude :data:`MAX_INTEGER` or more."""

    def __init__(self, field: str, digits: int):
        super().__init__(f"field {field!r} holds an integer of {digits} digits, too large for a number "
                         "(at most about 1.8e308)")


class _Huge(str):
    """The text of an integer beyond :data:`MAX_INTEGER`, kept until its field is found."""


def is_count(value: Any, low: int = 0) -> bool:
    """Whether ``value`` read from JSON is an integer (not a bool) >= ``low``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) < len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKeyError(key)
            seen.add(key)
    return obj


def loads(text: str | bytes) -> Any:
    """``json.loads`` that refuses an object giving a key twice (:class:`DuplicateKeyError`) and an integer
    beyond :data:`MAX_INTEGER` (:class:`IntegerTooLargeError`, naming its field)."""
    huge = False

    def parse_int(digits: str) -> int | str:
        nonlocal huge
        if len(digits) < 309 or (len(digits) <= 310 and abs(int(digits)) <= MAX_INTEGER):
            return int(digits)
        huge = True
        return _Huge(digits)

    value = json.loads(text, object_pairs_hook=_unique_keys, parse_int=parse_int)
    if huge:
        field, digits = find_value(value, lambda v: isinstance(v, _Huge)) or ("?", "")
        raise IntegerTooLargeError(field, len(digits.lstrip("-")))
    return value


def gunzip(raw: bytes, path: str | os.PathLike) -> bytes:
    """The decompressed ``raw`` bytes of the gzip file ``path``; a damaged one is a :class:`DataError`."""
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(str(path), f"gzip-compressed but damaged ({exc})") from None


def json_line(record: dict[str, Any], path: str | os.PathLike) -> str:
    """``record`` as one JSON line (newline included) that qlass's readers take back: a NaN or +inf number (not
    JSON; every reader refuses it) or text that is not Unicode (a lone surrogate, which UTF-8 cannot
    hold) is a :class:`QlassError` naming ``path`` and the field, before anything is written. -inf (the
    score of an impossible candidate) is written as ``-Infinity``, which the readers take."""
    try:
        text = json.dumps(record, ensure_ascii=False, allow_nan=False)
    except ValueError:
        bad = find_value(record, lambda v: isinstance(v, float) and (math.isnan(v) or v == math.inf))
        if bad is not None:
            raise QlassError(f"{path}: refusing to write a record whose field {bad[0]!r} is {bad[1]!r}; "
                             "it would not read back") from None
        text = json.dumps(record, ensure_ascii=False)  # only -inf values
    if not is_text(text):
        bad = find_value(record, lambda v: isinstance(v, str) and not is_text(v))
        field = bad[0] if bad else "?"
        raise QlassError(f"{path}: refusing to write a record whose field {field!r} holds text that is not "
                         "valid Unicode (a lone surrogate); it would not read back")
    return text + "\n"


_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
"""A JSON escape of a UTF-16 surrogate: the only way a lone one gets into text read from UTF-8."""


def with_replacement_characters(text: str) -> str:
    """``text`` with every lone surrogate (bytes that were not UTF-8, or a JSON ``\\ud800`` escape) replaced
    by U+FFFD, as a browser shows them, so that it can be written as UTF-8."""
    return _SURROGATE.sub("\ufffd", text)


def is_text(text: str) -> bool:
    """Whether ``text`` can be written as UTF-8 (JSON's ``\\ud800`` escapes decode to lone surrogates that
    cannot, and tokenizers refuse)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def not_text_field(value: Any) -> str | None:
    """The path of the first string (or key) in ``value`` that is not text (:func:`is_text`), or None."""
    bad = find_value(value, lambda v: isinstance(v, str) and not is_text(v))
    return None if bad is None else bad[0]


def find_value(value: Any, bad: Callable[[Any], bool], where: str = "") -> tuple[str, Any] | None:
    """The first ``(field path, value)`` in ``value`` (nested dicts and lists) that ``bad`` picks, keys
    included; None if there is none."""
    if bad(value):
        return where or "(the record)", value
    if isinstance(value, dict):
        for key, item in value.items():
            if bad(key):
                return f"{where}.{key}" if where else str(key), key
            found = find_value(item, bad, f"{where}.{key}" if where else str(key))
            if found:
                return found
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found = find_value(item, bad, f"{where}[{i}]")
            if found:
                return found
    return None


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append ``record`` as one line, fsynced; a last line without its newline (a hand-edited or concatenated
    file) is ended first, so records are never glued. A write that fails part-way (a full disk) is cut off
    again, so the file keeps whole records only."""
    p = Path(path)
    line = json_line(record, p).encode("utf-8")
    check_output_file(p)
    p.parent.mkdir(parents=True, exist_ok=True)
    with _naming(p), open(p, "a+b", buffering=0) as fh:
        size = fh.seek(0, os.SEEK_END)
        if size > 0:
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                line = b"\n" + line
        try:
            left = memoryview(line)
            while left:
                left = left[os.write(fh.fileno(), left):]
            os.fsync(fh.fileno())
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fh.fileno(), size)
            raise


def read_jsonl(path: str | os.PathLike, repair_tail: bool = False, skip_torn_tail: bool = False
               ) -> list[dict[str, Any]]:
    """Read every record of a JSONL file (see :func:`read_numbered_jsonl`; a missing file reads as none)."""
    return [rec for _, rec in read_numbered_jsonl(path, repair_tail, skip_torn_tail)]


def read_numbered_jsonl(path: str | os.PathLike, repair_tail: bool = False, skip_torn_tail: bool = False
                        ) -> list[tuple[int, dict[str, Any]]]:
    """Read every record of a JSONL file with its line number in the file (1-based; blank lines
    count, so an error about a record can name the line an editor shows).

    A malformed line raises :class:`DataError` naming file and line. With ``repair_tail``, an
    unterminated, unparsable *last* line (the mark of an interrupted append) is logged, cut from
    the file and skipped, so a resumed run redoes that unit of work — but only a line that one of
    our appends could have left: after earlier records, or starting like a JSON object. Any other
    file is not ours to cut (e.g. ``--out notes.txt``) and is refused. With ``skip_torn_tail`` (a
    reader that only shows a file, which may still be being written), such a last line is skipped
    with a warning and the file left as it is.

    A file that does not exist reads as no records (a run's output before its first append: the readers of
    inputs check that theirs exists first); a folder is a :class:`QlassError`. A gzip-compressed file (e.g.
    ``records.jsonl.gz``) is read decompressed; one that a run would append to (``repair_tail``) is refused,
    since appends cannot go into it.
    """
    p = Path(path)
    if not p.exists():
        return []
    if p.is_dir():  # was IsADirectoryError
        raise QlassError(f"{p}: is a folder, not a JSON Lines file")
    if repair_tail:
        check_output_file(p)  # a run's own file: a pipe would block the read, a device be replaced
    refuse_device(p)
    raw = p.read_bytes()
    zipped = raw[:2] == GZIP_MAGIC
    if zipped:
        if repair_tail:
            raise DataError(str(p), "gzip-compressed: a run cannot append to it; decompress it first (gunzip) "
                                    "or choose another output path")
        raw = gunzip(raw, p)
    records: list[tuple[int, dict[str, Any]]] = []
    offset = 0
    lines = raw.split(b"\n")
    for lineno, line in enumerate(lines, start=1):
        is_last = lineno == len(lines)
        if line.strip():
            try:
                obj = loads(line.decode("utf-8-sig" if lineno == 1 else "utf-8"))  # json would take UTF-16/32 bytes
            except RecursionError:
                raise DataError(str(p), f"line {lineno}: JSON nested too deeply") from None
            except JSONContentError as exc:
                raise DataError(str(p), f"line {lineno}: {exc}") from None
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:  # a torn tail may end mid-character
                if repair_tail and is_last and not records and not line.lstrip().startswith(b"{"):
                    raise DataError(str(p), "not a JSON Lines file (its only line is not a JSON object); "
                                            "refusing to overwrite it: choose another output path") from None
                if repair_tail and is_last:
                    log.warning("%s: cutting a torn last line (%d bytes) left by an interrupted write",
                                p, len(line))
                    with open(p, "r+b") as fh:
                        fh.truncate(offset)
                    break
                if skip_torn_tail and is_last:
                    log.warning("%s: skipping line %d, cut short (a writer killed mid-line, or a run still "
                                "writing it)", p, lineno)
                    break
                torn = "" if not (is_last and line.lstrip().startswith(b"{")) else (
                    " (a last line cut short: was its writer killed?" + (")" if zipped else  # no run appends to it
                                                                          " a rerun of that command cuts it)"))
                if isinstance(exc, UnicodeDecodeError):  # cut inside a character: the bytes end mid-way
                    raise DataError(str(p), f"line {lineno}: not UTF-8 text ({exc.reason} at byte {offset + exc.start}"
                                            f" of the file){torn if exc.end == len(line) else ''}") from None
                if b"\x00" in line:  # never in JSON text (control characters are escaped); UTF-16/32 has them
                    raise DataError(str(p), f"line {lineno}: not UTF-8 text (NUL bytes: a UTF-16 or UTF-32 file? "
                                            "save it as UTF-8)") from None
                raise DataError(str(p), f"line {lineno}: invalid JSON ({exc.msg} at column {exc.colno}){torn}"
                                        f"{_list_hint(line, records)}") from None
            if not isinstance(obj, dict):
                raise DataError(str(p), f"line {lineno}: expected a JSON object, got {type(obj).__name__}"
                                        f"{_list_hint(line, records)}")
            bad = not_text_field(obj) if _SURROGATE_ESCAPE.search(line) else None
            if bad is not None:
                raise DataError(str(p), f"line {lineno}: field {bad!r} holds an unpaired surrogate (\\ud800-\\udfff), "
                                        "which is not text")
            records.append((lineno, obj))
        offset += len(line) + 1
    return records


def _list_hint(line: bytes, records: list[Any]) -> str:
    """For a first record that opens a JSON list (a pretty-printed ``[`` line, or a list on one line): what
    the reader wants instead."""
    if records or not line.lstrip().startswith(b"["):
        return ""
    return "; the file looks like a JSON list, and this kind of file is JSON Lines (one object per line)"


@contextlib.contextmanager
def read_once(path: str | os.PathLike) -> Iterator[Path]:
    """``path`` itself (a regular file, or none: its reader names that), or for a named pipe
    (``<(zcat f.gz)``), which gives its bytes once, a temporary copy of them, so that a caller may read
    them more than once (tell the kind, take a digest, then read). A pipe or socket that cannot be
    opened is a :class:`DataError` naming it."""
    given = Path(path)
    if given.is_file() or not given.exists():
        yield given
        return
    with tempfile.TemporaryDirectory(prefix="qlass-input-") as tmp:
        copy = Path(tmp) / "input"
        try:
            src = open(given, "rb")  # noqa: SIM115 - closed below
        except OSError as exc:  # a socket, say
            raise DataError(str(given), f"cannot read: {exc.strerror or exc}") from None
        with src, open(copy, "wb") as dst:
            shutil.copyfileobj(src, dst)
        yield copy


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON object in ``path``; not JSON, not UTF-8 or not an object is a :class:`QlassError`
    naming it. A missing file raises ``FileNotFoundError`` (the caller says what was expected)."""
    p = Path(path)
    kind = special_kind(p.stat().st_mode)  # a missing file: FileNotFoundError, as documented
    if kind:  # reading a named pipe or device blocks, or never ends
        raise QlassError(f"{p}: is {kind}, not a regular file holding a JSON object")
    try:
        data = loads(p.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError, JSONContentError) as exc:
        raise QlassError(f"{p}: not valid JSON ({exc})") from None
    except RecursionError:
        raise QlassError(f"{p}: not valid JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise QlassError(f"{p}: expected a JSON object, got {type(data).__name__}")
    return data


def write_jsonl(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> None:
    """Write ``records`` to ``path`` atomically (temporary file, then rename)."""
    write_text_atomic(path, "".join(json_line(r, path) for r in records))


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) as :func:`write_bytes_atomic` does."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` so readers never see a half-written file; a failed write
    (a full disk, ``path`` a folder) names ``path`` and leaves no temporary file behind. A symbolic link is
    followed: the file it names is replaced, not the link."""
    p = followed(path)
    check_output_file(p)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_file(p)
    try:
        with _naming(p):
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, p)
    finally:
        with contextlib.suppress(OSError):  # a read-only file system refuses even this: keep the error naming path
            tmp.unlink(missing_ok=True)  # still there only when writing failed


def _temporary_file(path: Path) -> Path:
    """Where :func:`write_bytes_atomic` writes ``path`` first: ``.NAME.tmp-HOST-PID``. The ones a writer on this
    host left when it was killed (its pid no longer runs) are removed first: before, each kill -9 mid-write
    left a partial copy of the output that no rerun removed. Another host's are left, as its pids are not
    this host's."""
    prefix = f".{path.name}.tmp-{socket.gethostname()}-"
    for old in path.parent.glob(glob.escape(prefix) + "*"):
        pid = old.name[len(prefix):]
        if pid.isdigit() and not _running(int(pid)):
            old.unlink(missing_ok=True)
    return path.with_name(f"{prefix}{os.getpid()}")


def _running(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """Re-raise a failed write (a full disk has no file name) as the same kind of :class:`OSError`
    naming ``path``, the file the user knows."""
    try:
        yield
    except OSError as exc:
        if exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
