"""Small C helpers compiled on first use into a private cache and loaded with ctypes.

Build decision: compiled on first use, not at install time. A helper's source is compiled
with ``$CC`` (default ``cc``) into ``$WRITEWATCHD_CACHE_DIR`` (default
``$XDG_CACHE_HOME/writewatchd``, else ``~/.cache/writewatchd``) under a name that carries the
hash of the source and the compiler command, so an edited source is rebuilt and an old
build is never loaded by mistake. It needs no build step in the package (an editable
install just works) and costs one compilation of about 0.2 s per source change. The daemon
runs as root and loads code from that directory, so the directory must be owned by us and
writable by nobody else, and so must the library; otherwise, or without a compiler, or if
the compilation fails, :func:`compile_library` logs one warning and returns None, and the
caller uses its Python implementation.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import stat
import subprocess
from pathlib import Path

__all__ = ["CFLAGS", "compile_library"]

_log = logging.getLogger(__name__)

CFLAGS = ("-O2", "-shared", "-fPIC", "-Wall", "-Werror")


def _cache_dir() -> Path:
    configured = os.environ.get("WRITEWATCHD_CACHE_DIR")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "writewatchd"


def _private(path: Path) -> bool:
    """Owned by us and writable by nobody else: safe to load code from."""
    info = path.stat()
    return info.st_uid == os.geteuid() and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _build(source: Path, compiler: str) -> Path:
    """The compiled library, built if this source and command have not been built before."""
    command = (compiler, *CFLAGS)
    digest = hashlib.sha256(source.read_bytes() + "\0".join(command).encode()).hexdigest()[:16]
    directory = _cache_dir()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not _private(directory):
        raise PermissionError(f"{directory} is writable by others or not ours; not loading code from it")
    library = directory / f"{source.stem}-{digest}.so"
    if not library.exists():
        partial = library.with_suffix(f".tmp{os.getpid()}")
        _log.info("compiling %s", " ".join((*command, "-o", str(library), str(source))))
        subprocess.run([*command, "-o", str(partial), str(source)], check=True, capture_output=True, timeout=60)
        partial.rename(library)
    if not _private(library):
        raise PermissionError(f"{library} is writable by others or not ours; not loading it")
    return library


def compile_library(source: Path, fallback: str) -> ctypes.CDLL | None:
    """``source`` compiled and loaded, or None (logged) when it cannot be; ``fallback`` says what runs instead."""
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        _log.warning("no C compiler (%s): %s", compiler, fallback)
        return None
    try:
        return ctypes.CDLL(str(_build(source, compiler)), use_errno=True)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = exc.stderr.decode(errors="replace") if isinstance(exc, subprocess.CalledProcessError) else ""
        _log.warning("cannot build %s (%s%s): %s", source.name, exc, detail, fallback)
        return None
