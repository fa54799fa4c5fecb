"""Reproducible hash-set order for ScienceWorld at full speed: a patched ``EnvObject`` class.

The simulator keeps its objects in hash sets keyed by Java identity hash codes, which differ from
run to run, so object listings, menus and even gold paths change order between loads. Two ways to
make them reproducible:

- *patched class* (used when a JDK's ``javac`` is available): ``EnvObject`` gets a ``hashCode()``
  derived from its object id (``uuid``, which this project keeps per simulator instance). The
  patch is built once per simulator jar with the JDK's own ASM (``java/PatchEnvObjectHash.java``),
  cached under the qlass cache, and put before the jar on the JVM's classpath; the jar itself is
  untouched.
- *constant identity hashes* (``-XX:hashCode=2``, the fallback with only a JRE): every hash set
  degenerates into a list that keeps insertion order, which costs the simulator about 2x.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import zipfile
from importlib import resources
from pathlib import Path

from ..errors import QlassError
from ..models import cache_dir

log = logging.getLogger(__name__)

PATCHED_CLASS = "scienceworld/struct/EnvObject.class"
CONSTANT_HASH_OPTIONS = ("-XX:+UnlockExperimentalVMOptions", "-XX:hashCode=2")
_ASM_EXPORT = "--add-exports=java.base/jdk.internal.org.objectweb.asm=ALL-UNNAMED"
_DONE_MARK = ".qlass-complete"


def _jar_digest(jar: str | Path) -> str:
    h = hashlib.sha256()
    with open(jar, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _run(cmd: list[str], what: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise QlassError(f"building the ScienceWorld hash patch failed while {what}:\n{done.stderr.strip()}")


def patched_classes(jar: str | Path, cache: Path | None = None) -> Path | None:
    """A classpath folder holding the patched ``EnvObject`` for ``jar`` (built on first use, then
    cached); ``None`` when no ``javac`` is on the PATH (use :data:`CONSTANT_HASH_OPTIONS` then)."""
    out = (cache or cache_dir()) / "sciworld" / f"classes-{_jar_digest(jar)}"
    if (out / _DONE_MARK).exists():
        return out
    javac, java = shutil.which("javac"), shutil.which("java")
    if javac is None or java is None:
        return None
    log.info("building the ScienceWorld EnvObject hash patch in %s (once)", out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp_name:
        tmp = Path(tmp_name)
        source = tmp / "PatchEnvObjectHash.java"
        source.write_bytes(resources.files("qlass.envs").joinpath("java/PatchEnvObjectHash.java").read_bytes())
        _run([javac, _ASM_EXPORT, "-d", str(tmp / "tool"), str(source)], "compiling the patch tool")
        with zipfile.ZipFile(jar) as zf:
            (tmp / "EnvObject.class").write_bytes(zf.read(PATCHED_CLASS))
        classes = tmp / "classes"
        _run([java, _ASM_EXPORT, "-cp", str(tmp / "tool"), "PatchEnvObjectHash", str(tmp / "EnvObject.class"),
              str(classes / PATCHED_CLASS)], "patching EnvObject")
        (classes / _DONE_MARK).write_text(f"{Path(jar).name}\n")
        try:
            os.replace(classes, out)
        except OSError:  # another process finished the same build first
            if not (out / _DONE_MARK).exists():
                raise
    return out


def launch_settings(jar: str | Path) -> tuple[str, tuple[str, ...]]:
    """The JVM classpath and options that make the simulator in ``jar`` reproducible: the patched
    class before the jar, or the jar with constant identity hashes when no JDK is available."""
    classes = patched_classes(jar)
    if classes is not None:
        return f"{classes}{os.pathsep}{jar}", ()
    log.warning("no javac on the PATH: ScienceWorld runs with constant identity hash codes (reproducible, "
                "about 2x slower); install a JDK (e.g. openjdk-17-jdk-headless) for the faster path")
    return str(jar), CONSTANT_HASH_OPTIONS
