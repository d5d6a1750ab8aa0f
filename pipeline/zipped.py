"""Zip uploads: judged from their directory before anything is extracted, then expanded
member by member with the sizes enforced while writing.

A zip is refused unopened (``unsafe_archive``) when a member names a path outside the zip
(absolute, ``..``, a drive letter), is a link, is encrypted, when it holds more files than
the protocol allows, or when it would expand past the protocol's total or ratio limits (a
zip bomb). A member that turns out larger than its directory said aborts the expansion too.
"""

from __future__ import annotations

import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pipeline.protocol import Limits

MAGIC = b"PK\x03\x04"


class UnsafeArchive(Exception):
    """The zip cannot be opened safely; the message names the rule (never a file name)."""


@dataclass(frozen=True)
class Member:
    """One expanded file: its path inside the zip and where it was written."""

    name: str
    path: Path


def is_zip(path: Path) -> bool:
    """True if the file starts like a zip (by content, not by its name)."""
    try:
        with path.open("rb") as handle:
            return handle.read(4) == MAGIC
    except OSError:
        return False


def _safe_name(name: str) -> str | None:
    normal = name.replace("\\", "/")
    parts = PurePosixPath(normal).parts
    if not parts or normal.startswith("/") or (len(parts[0]) == 2 and parts[0][1] == ":"):
        return None
    if any(part in ("..", "") for part in parts):
        return None
    return "/".join(p for p in parts if p != ".")


def check(path: Path, limits: Limits) -> list[zipfile.ZipInfo]:
    """The zip's file members if it is safe to expand; else raise :class:`UnsafeArchive`."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        raise UnsafeArchive(f"not a readable zip ({type(error).__name__})") from None
    members = [i for i in infos if not i.is_dir()]
    if len(members) > limits.max_archive_files:
        raise UnsafeArchive(f"more than {limits.max_archive_files} files")
    total = 0
    for info in members:
        if _safe_name(info.filename) is None:
            raise UnsafeArchive("a member names a path outside the zip")
        if info.flag_bits & 0x1:
            raise UnsafeArchive("encrypted members")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise UnsafeArchive("a member is a link")
        if info.file_size > limits.max_file_bytes:
            raise UnsafeArchive("a member is larger than the protocol's file size limit")
        total += info.file_size
    if total > limits.max_archive_bytes:
        raise UnsafeArchive("expands past the protocol's size limit")
    size = path.stat().st_size
    if size and total / size > limits.max_expansion_ratio:
        raise UnsafeArchive(f"expands more than {limits.max_expansion_ratio:g} times its size")
    return members


def expand(path: Path, target: Path, limits: Limits) -> list[Member]:
    """Check the zip, then write each file member under ``target``; return them in order."""
    members = check(path, limits)
    expanded = []
    with zipfile.ZipFile(path) as archive:
        for number, info in enumerate(members):
            out = target / f"{number:06d}"
            out.parent.mkdir(parents=True, exist_ok=True)
            written = 0
            with archive.open(info) as source, out.open("wb") as sink:
                for chunk in iter(lambda source=source: source.read(1 << 20), b""):
                    written += len(chunk)
                    if written > info.file_size:  # the directory lied about the size
                        raise UnsafeArchive("a member is larger than the zip says")
                    sink.write(chunk)
            expanded.append(Member(str(_safe_name(info.filename)), out))
    return expanded
