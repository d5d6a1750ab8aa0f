"""Where the outputs live: a folder of the data home or any fsspec URL.

The archive and the Parquet tables hold no PHI; the quarantine holds refused originals
(PHI). Each of their files is written whole under its final name, so they may live on an
object store (``s3://bucket/prefix``) as well as on the data home's disk. A location is then
a universal-pathlib ``UPath`` (``S3Path`` for ``s3://``); the default stays a plain local
``Path``, whose writes keep their temporary name, fsync and rename (:mod:`pipeline.atomic`).

An object store has no rename, no hard link and no lock, but an object appears whole when
its upload completes (a single PUT, or a multipart upload completed at the end), and never
half-written: writing straight to the final key gives the promise the local rename gives.
Locks and every working area stay on the data home's POSIX path.

``$TRIALPIPE_S3_ENDPOINT_URL`` points ``s3://`` at an S3-compatible endpoint other than
AWS (MinIO, Ceph, a test server); credentials come the standard AWS way (``AWS_*``
variables, ``$AWS_SHARED_CREDENTIALS_FILE``, an instance or pod role).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from fsspec.core import split_protocol
from upath import UPath

from pipeline import atomic

# A location of the archive, the tables or the quarantine: a local folder, or a UPath at
# an fsspec URL.
Location = Path | UPath

ENDPOINT_VARIABLE = "TRIALPIPE_S3_ENDPOINT_URL"
_S3 = ("s3", "s3a")
_CHUNK = 1 << 20


def location(url: str) -> Location:
    """The location ``url`` names: a local ``Path`` for a plain path or ``file://``,
    else a ``UPath`` with the storage options trialpipe sets for its protocol."""
    protocol, path = split_protocol(url)
    if protocol in (None, "file", "local"):
        return Path(path).expanduser().resolve()
    return UPath(url, **storage_options(protocol))


def storage_options(protocol: str) -> dict[str, Any]:
    """fsspec options for ``protocol``: for S3 the endpoint, and no listings cache, since
    other workers add and remove objects while this process runs."""
    if protocol not in _S3:
        return {}
    options: dict[str, Any] = {"use_listings_cache": False}
    endpoint = os.environ.get(ENDPOINT_VARIABLE)
    if endpoint:
        options["endpoint_url"] = endpoint
    return options


def is_local(path: Location) -> bool:
    """True for a path on a local (or network) filesystem, False for an object store."""
    return isinstance(path, Path)


def put_file(source: Path, target: Location) -> None:
    """Put the local file ``source`` at ``target`` whole: linked or copied and renamed
    on a filesystem, one upload (visible only once complete) on an object store."""
    if is_local(target):
        atomic.link_or_copy(source, target)
    else:
        target.fs.put_file(str(source), target.path)


def write_with(target: Location, writer: Callable[[BinaryIO], None]) -> None:
    """Call ``writer`` with a binary file that becomes ``target`` only once complete."""
    if is_local(target):

        def to_temporary(tmp: Path) -> None:
            with open(tmp, "wb") as handle:
                writer(handle)

        atomic.write_with(target, to_temporary)
    else:
        # Built in memory, then one upload: a writer that fails half-way leaves nothing in
        # the store (closing an fsspec file would upload whatever it had been given).
        buffer = io.BytesIO()
        writer(buffer)
        target.fs.pipe_file(target.path, buffer.getvalue())


def put_file_once(source: Path, target: Location) -> None:
    """:func:`put_file`, skipped when ``target`` already holds ``source``'s bytes (a retry
    of a task that had put it), so a retry uploads nothing again."""
    if sha256(target) != sha256(source):
        put_file(source, target)


def write_json(target: Location, payload: Any) -> Location:
    """Write ``payload`` as indented JSON to ``target``, whole (as :func:`write_with`)."""
    text = json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n"
    write_with(target, lambda handle: handle.write(text.encode()))
    return target


def move_to_local(source: Location, target: Path) -> None:
    """Move the file at ``source`` to the local ``target``: renamed on a filesystem, else
    downloaded under a temporary name, renamed into place, then deleted from the store.
    Idempotent: a move cut off after the download finishes on the next call."""
    if is_local(source):
        atomic.move_file(Path(source), target)
        return
    if not source.exists() and target.exists():
        return
    atomic.write_with(target, lambda tmp: source.fs.get_file(source.path, str(tmp)))
    source.fs.rm_file(source.path)


def sha256(path: Location) -> str | None:
    """The SHA-256 (hex) of the file at ``path``; None when there is none."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    except FileNotFoundError:
        return None
    return digest.hexdigest()


def relative(path: Location, base: Location) -> str:
    """``path`` below ``base`` as a POSIX relative path (``a/b/c``)."""
    if is_local(path):
        return Path(path).relative_to(Path(base)).as_posix()
    return str(path.path).removeprefix(str(base.path).rstrip("/") + "/")
