"""A parsed policy kept between starts, for a YAML file that has not changed.

Parsing a YAML of 100,000 users takes seconds (``config_child``), and a restart,
a reboot or a reload of an unchanged file would pay it again for the same
result.  So, like a compiled map next to its source, the parse child's answer
is kept in a cache file and used again while its *key* still matches: a
SHA-256 of the YAML's bytes, its absolute path (relative paths in it are read
from its directory), the interpreter's version and every source file of the
``router`` package with the versions of PyYAML and phonenumbers (an upgrade
may read the same file differently).  Any change to any of them is a miss,
and a miss parses the file as before.

Beside each entry, the parse child keeps its users by their text
(``config_reuse.Previous``, a ``.items`` file, keyed by the YAML's path and the code
alone): after an edit, the next parse reads only the users whose text changed.

Only big files are kept (``MIN_SIZE``, a few thousand users: below it a parse
costs less than reading the cache would save), one entry per YAML path, and
at most ``KEEP`` entries.  The entry is a pickle, so it is read only from a
directory and a file this user owns that nobody else may write, and only when a
SHA-256 of its body, written with it, still matches; anything else -- another
owner, loose modes, a short, damaged or foreign file -- is a miss (a damaged
entry is removed), never an error: the cache only saves time.  ``sip-router check`` does not use it: it
always reads the file.

The directory is systemd's ``CacheDirectory`` (``$CACHE_DIRECTORY``) for the
service, else ``$XDG_CACHE_HOME/sip-router`` or ``~/.cache/sip-router``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import stat
import sys
import time
from pathlib import Path

MIN_SIZE = 1 << 20          # bytes of YAML: about 7,000 one-line users
KEEP = 8                    # entries kept; the oldest beyond that are removed
_SUFFIX = ".policy"
_ITEMS_SUFFIX = ".items"
_KEY_SIZE = 32              # SHA-256 digests: of the key, then of the body, head each entry
STALE_PARTIAL = 3600.0      # seconds after which a half-written entry is removed


def directory() -> Path:
    found = os.environ.get("CACHE_DIRECTORY")          # systemd: one or more, colon-separated
    if found:
        return Path(found.split(":")[0])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sip-router"


def entry_path(config_path: str, suffix: str = _SUFFIX) -> Path:
    """The one cache entry for the YAML at ``config_path`` (``suffix``: of one kind)."""
    name = hashlib.sha256(os.path.abspath(config_path).encode()).hexdigest()[:32]
    return directory() / f"{name}{suffix}"


@functools.cache
def _code_identity() -> bytes:
    """What else decides how a file is read: this interpreter, this package's sources,
    and the libraries that read YAML and phone numbers."""
    import phonenumbers
    import yaml

    digest = hashlib.sha256()
    libyaml = yaml._yaml.get_version_string() if yaml.__with_libyaml__ else ""   # PyYAML may use the system's
    digest.update(f"{sys.version}|{yaml.__version__}|{libyaml}|{phonenumbers.__version__}".encode())
    package = Path(__file__).resolve().parent
    sources = []
    for folder, subfolders, files in os.walk(package):
        subfolders[:] = [d for d in subfolders if d not in ("node_modules", "__pycache__")]
        sources += [Path(folder) / name for name in files if name.endswith(".py")]
    for source in sorted(sources):
        digest.update(str(source.relative_to(package)).encode() + b"\0")
        digest.update(source.read_bytes())
    return digest.digest()


_CHUNK = 1 << 20


def file_key(config_path: str) -> bytes | None:
    """The key of the file as it is now; None when it is too small to keep, or unreadable.
    Read in chunks: one 14 MB buffer, once freed, would leave glibc serving the next big
    objects from the heap, which keeps them after they are freed (15 MB more per start)."""
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    try:
        digest = hashlib.sha256(_code_identity())     # a source removed by an upgrade under way: no key
        digest.update(os.path.abspath(config_path).encode() + b"\0")
        with open(config_path, "rb", buffering=0) as handle:
            if os.fstat(handle.fileno()).st_size < MIN_SIZE:
                return None
            while True:
                read = handle.readinto(buffer)
                if not read:
                    break
                digest.update(view[:read])
    except OSError:
        return None
    return digest.digest()


def _private(info: os.stat_result) -> bool:
    return info.st_uid == os.geteuid() and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def items_key(config_path: str) -> bytes:
    """The key of the users kept by their text: the file's path and the code, not its
    bytes, which are what has changed when they are used."""
    return hashlib.sha256(_code_identity() + b"items\0" + os.path.abspath(config_path).encode()).digest()


def load_items(config_path: str) -> bytes | None:
    """The users kept by their text for ``config_path``, or None."""
    return load(config_path, items_key(config_path), _ITEMS_SUFFIX)


def store_items(config_path: str, body: bytes) -> None:
    store(config_path, items_key(config_path), body, _ITEMS_SUFFIX)


def load(config_path: str, key: bytes, suffix: str = _SUFFIX) -> bytes | None:
    """The parse child's answer kept for ``key``, or None."""
    where = entry_path(config_path, suffix)
    try:
        if not _private(os.stat(where.parent)):
            return None
        with open(where, "rb", buffering=0) as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode) or not _private(info) or handle.read(_KEY_SIZE) != key:
                return None
            body = handle.read(_KEY_SIZE)
            size = info.st_size - 2 * _KEY_SIZE
            answer = handle.read(size) if size > 0 else b""     # one buffer of the exact size
    except OSError:
        return None
    if len(answer) != size or hashlib.sha256(answer).digest() != body:
        _remove(where)                # damaged (a crash, a bad disk): parse, and keep a good one
        return None
    return answer


def store(config_path: str, key: bytes, answer: bytes, suffix: str = _SUFFIX) -> None:
    """Keep ``answer`` for ``key`` (atomically: a reader sees the old entry or the new)."""
    where = entry_path(config_path, suffix)
    partial = where.with_name(f"{where.name}.{os.getpid()}.tmp")
    try:
        where.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not _private(os.stat(where.parent)):
            return
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(key)
            out.write(hashlib.sha256(answer).digest())       # the body is checked when read
            out.write(answer)
        os.replace(partial, where)
        _prune(where.parent)
    except OSError:
        try:
            partial.unlink(missing_ok=True)
        except OSError:
            pass


def forget(config_path: str) -> None:
    """Drop the entry of ``config_path`` and its users kept by their text: the next
    start parses the whole file."""
    _remove(entry_path(config_path))
    forget_items(config_path)


def forget_items(config_path: str) -> None:
    _remove(entry_path(config_path, _ITEMS_SUFFIX))


def _remove(where: Path) -> None:
    try:
        where.unlink(missing_ok=True)
    except OSError:
        pass


def _prune(folder: Path) -> None:
    stale = time.time() - STALE_PARTIAL
    for suffix in (_SUFFIX, _ITEMS_SUFFIX):
        entries = sorted(folder.glob(f"*{suffix}"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in entries[KEEP:]:
            old.unlink(missing_ok=True)
        for partial in folder.glob(f"*{suffix}.*.tmp"):   # left by a process killed while writing
            if partial.stat().st_mtime < stale:
                partial.unlink(missing_ok=True)
