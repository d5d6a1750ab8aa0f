"""Atomic writes: a temporary name in the target folder, fsync, then rename into place."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Set while writing a throw-away home (the dry run's sandbox), whose files need not survive
# a power cut: no write then waits for the disk.
_scratch = False


@contextlib.contextmanager
def scratch() -> Iterator[None]:
    """Within this block, atomic writes still rename into place but nothing is flushed to
    stable storage (for a dry run: its sandbox is thrown away, its output made again)."""
    global _scratch
    before, _scratch = _scratch, True
    try:
        yield
    finally:
        _scratch = before


def _temp_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")


def write_with(target: Path, writer: Callable[[Path], None], durable: bool = True) -> Path:
    """Call ``writer(tmp_path)`` then rename the finished file to ``target``.

    ``durable=False`` skips the per-file fsync: for a task writing many files, which calls
    :func:`sync` once before it records that it finished (cheaper, equally safe: a crash
    before that leaves the task unfinished, and it runs again)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(target)
    try:
        writer(tmp)
        if durable and not _scratch:
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def write_bytes(target: Path, data: bytes) -> Path:
    """Write ``data`` to ``target`` atomically."""
    return write_with(target, lambda tmp: tmp.write_bytes(data))


def write_json(target: Path, payload: Any) -> Path:
    """Write ``payload`` as indented JSON to ``target`` atomically."""
    text = json.dumps(payload, indent=2, sort_keys=True, default=str)
    return write_with(target, lambda tmp: tmp.write_text(text + "\n"))


def copy_file(source: Path, target: Path, durable: bool = True) -> Path:
    """Copy ``source`` to ``target`` atomically (``durable``: see :func:`write_with`)."""
    return write_with(target, lambda tmp: shutil.copyfile(source, tmp), durable)


def link_or_copy(source: Path, target: Path, durable: bool = True) -> Path:
    """Put ``source``'s bytes at ``target`` atomically: a hard link when both are on one
    filesystem (no bytes copied; ``source`` was written atomically and never changes),
    else a copy (``durable``: see :func:`write_with`)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(target)
    try:
        os.link(source, tmp)
    except OSError as error:
        if error.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise  # a full disk is a full disk, not a reason to copy
        return copy_file(source, target, durable)
    try:
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def sync() -> None:
    """Flush every write not yet on disk (files and renames) to stable storage."""
    if not _scratch:
        os.sync()


def move_file(source: Path, target: Path) -> None:
    """Move ``source`` to ``target``; idempotent when the move already happened."""
    if not source.exists() and target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(source, target)
    except OSError:
        # Different filesystems: copy atomically, then drop the source.
        copy_file(source, target)
        source.unlink()


def create_secret(target: Path, text: str) -> str:
    """Make the owner-only file ``target`` holding ``text`` unless it exists; return what
    it holds. Written under a temporary name, flushed, then linked into place: no reader
    ever sees it half-written (or left empty by a full disk), and of two processes creating
    it at once the first link wins and both return that one's text."""
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_name(target)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            with contextlib.suppress(FileExistsError):  # another process was first
                os.link(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return target.read_text()
