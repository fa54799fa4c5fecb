"""Where the ALFWorld games are: a user's data folder, ``$ALFWORLD_DATA``, or the project's shared
tarballs extracted once into the cache.

The layout is the one ``alfworld-download`` produces::

    <data>/json_2.1.1/{train,valid_seen,valid_unseen}/<task folder>/<trial folder>/game.tw-pddl

:func:`resolve_data_dir` picks the folder (constructor argument, then ``ALFWORLD_DATA``, then the
shared tarballs); :func:`extract_shared_data` unpacks ``json_2.1.1-*.tar.xz`` into
``cache_dir()/data/alfworld`` exactly once — into a temporary sibling first, renamed into place
only when complete, so an interrupted or concurrent extraction never leaves a half folder behind.
"""

from __future__ import annotations

import logging
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

from ..errors import QlassError
from ..models import cache_dir

log = logging.getLogger(__name__)

GAMES_DIR = "json_2.1.1"
SPLIT_FOLDERS = {"train": "train", "seen": "valid_seen", "unseen": "valid_unseen"}
_DONE_MARK = ".qlass-complete"
_TARBALL_GLOB = "json_2.1.1-*.tar.xz"
DEFAULT_ALFWORLD_DATA = Path("~/.cache/alfworld")


def shared_tarballs(candidates: list[Path] | None = None) -> list[Path]:
    """The ALFWorld tarballs of the project's shared data folder, or ``[]`` if none is found.

    Looked for in ``$QLASS_SHARED_DATA/alfworld`` and ``<repo>/../shared/data/alfworld`` (the
    repository being the checkout this package is installed from, or the current directory).
    """
    if candidates is None:
        candidates = []
        if os.environ.get("QLASS_SHARED_DATA"):
            candidates.append(Path(os.environ["QLASS_SHARED_DATA"]) / "alfworld")
        repo = Path(__file__).resolve().parents[3]
        candidates += [repo.parent / "shared" / "data" / "alfworld",
                       Path.cwd().parent / "shared" / "data" / "alfworld"]
    for folder in candidates:
        found = sorted(folder.glob(_TARBALL_GLOB)) if folder.is_dir() else []
        if found:
            return found
    return []


def extract_shared_data(tarballs: list[Path], dest: Path | None = None) -> Path:
    """Unpack ``tarballs`` into ``dest`` (default ``cache_dir()/data/alfworld``) once; returns ``dest``.

    Idempotent: a completed folder (marked by ``.qlass-complete``) is returned as is. Atomic: the
    games are unpacked into a temporary folder beside ``dest`` and renamed into place when done.
    """
    dest = dest or cache_dir() / "data" / "alfworld"
    if (dest / _DONE_MARK).exists():
        return dest
    if not tarballs:
        raise QlassError("alfworld: no json_2.1.1-*.tar.xz tarballs to extract")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".partial-", dir=dest.parent))
    try:
        for tarball in tarballs:
            log.info("alfworld: extracting %s into %s (once)", tarball.name, dest)
            try:
                with tarfile.open(tarball, "r:xz") as tar:
                    # the "data" filter refuses links and paths outside tmp (Python >= 3.10.12)
                    tar.extractall(tmp, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise QlassError(f"alfworld: cannot extract {tarball}: {exc}") from None
        (tmp / _DONE_MARK).write_text("\n".join(t.name for t in tarballs) + "\n")
        if (dest / _DONE_MARK).exists():  # a concurrent extraction finished first
            return dest
        if dest.exists():  # a folder this function did not make (ours appear complete): replace it
            shutil.rmtree(dest)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not (dest / _DONE_MARK).exists():  # not a concurrent extraction that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def games_root(folder: Path) -> Path | None:
    """The ``json_2.1.1`` folder inside ``folder`` (or ``folder`` itself if it is one), else None."""
    if (folder / GAMES_DIR).is_dir():
        return folder / GAMES_DIR
    if any((folder / split).is_dir() for split in SPLIT_FOLDERS.values()):
        return folder
    return None


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The ``json_2.1.1`` games folder to play: ``data_dir``, else ``$ALFWORLD_DATA``, else
    ``~/.cache/alfworld`` (where ``alfworld-download`` puts the games) if it holds them, else the
    shared tarballs extracted into the cache. Raises :class:`QlassError` saying what to do."""
    default = DEFAULT_ALFWORLD_DATA.expanduser()
    explicit = data_dir if data_dir is not None else os.environ.get("ALFWORLD_DATA")
    if explicit:
        source = "data_dir" if data_dir is not None else "ALFWORLD_DATA"
        folder = Path(explicit).expanduser()
        root = games_root(folder) if folder.is_dir() else None
        if root is not None:
            return root
        # importing alfworld sets ALFWORLD_DATA to its (possibly empty) default folder: not a choice
        if data_dir is not None or folder.resolve() != default.resolve():
            raise QlassError(f"alfworld: {source}={str(folder)!r} holds no {GAMES_DIR}/"
                             "{train,valid_seen,valid_unseen} game folders (the layout of alfworld-download)")
    root = games_root(default) if default.is_dir() else None
    if root is not None:
        return root
    tarballs = shared_tarballs()
    if not tarballs:
        raise QlassError("alfworld: no game data found. Set ALFWORLD_DATA (or pass data_dir) to the folder "
                         f"alfworld-download filled (it contains {GAMES_DIR}/), or put the shared "
                         f"{_TARBALL_GLOB} tarballs in ../shared/data/alfworld")
    extracted = extract_shared_data(tarballs)
    root = games_root(extracted)
    if root is None:
        raise QlassError(f"alfworld: the extracted tarballs in {extracted} hold no {GAMES_DIR}/ folder")
    return root
