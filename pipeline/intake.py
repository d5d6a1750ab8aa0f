"""Intake: staging an upload in the inbox (files, manifest, READY) and claiming it.

A batch folder is only ever read after its READY marker exists, and it is claimed by one
atomic rename out of the upload area, so two schedulers can never process the same batch and
a half-copied upload is never read.

The upload area may be an object store (``$TRIALPIPE_INBOX_URL``), which has no rename: an
upload there writes each file and the manifest as whole objects, READY last, and a claim
downloads the batch into the claimed area under a lock in the data home, then deletes its
objects (:func:`claim`).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import getpass
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import __version__, atomic, enrollment, ledger, store
from pipeline.home import DataHome, safe_relative
from pipeline.protocol import Protocol, ProtocolError, load_protocol
from pipeline.store import Location

MANIFEST = "manifest.json"
READY = "READY"
ORIGIN = "origin.json"
FILES = "files"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class UploadRefused(ValueError):
    """The upload cannot be accepted; the message tells the site coordinator why."""


@dataclass(frozen=True)
class ReadyBatch:
    batch_id: str
    folder: Location


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, streamed."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_upload(
    home: DataHome, protocol_id: str, site_id: str, subject_id: str, visit: str
) -> Protocol:
    """Refuse at once what can be refused before any file is copied."""
    try:
        protocol = load_protocol(protocol_id)
    except ProtocolError:
        raise UploadRefused(f"unknown protocol {protocol_id!r}") from None
    if site_id not in protocol.sites:
        raise UploadRefused(
            f"site {site_id!r} is not a site of {protocol_id} (sites: {', '.join(protocol.sites)})"
        )
    if visit not in protocol.visit_ids:
        raise UploadRefused(
            f"visit {visit!r} is not a visit of {protocol_id} "
            f"(visits: {', '.join(protocol.visit_ids)})"
        )
    if not _ID.match(subject_id):
        raise UploadRefused(f"subject ID {subject_id!r} has characters a subject ID cannot have")
    enrolled = enrollment.lookup(home, protocol_id, subject_id)
    if enrolled is None:
        raise UploadRefused(
            f"subject {subject_id} is not enrolled in {protocol_id}; ask the core lab to "
            "import the current randomization list"
        )
    if enrolled.site_id != site_id:
        raise UploadRefused(f"subject {subject_id} is enrolled at another site, not {site_id}")
    return protocol


def new_batch_id() -> str:
    """A unique batch ID: UTC time and a random suffix. It carries nothing typed at the
    site (a subject field holding a medical record number must not become an ID that
    lands in DAG run IDs, logs and tables)."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    return f"{stamp}-{secrets.token_hex(4)}"


def stage_batch(
    home: DataHome,
    protocol_id: str,
    site_id: str,
    subject_id: str,
    visit: str,
    paths: list[Path],
    uploader: str | None = None,
    check: bool = True,
    link: bool = False,
) -> str:
    """Copy ``paths`` (files or folders) into a new inbox batch; return its batch ID.

    With ``check`` (the client's behaviour) the upload is refused when the protocol, site,
    visit or enrollment is wrong. ``check=False`` models a batch that reached the inbox by
    another route (a drop folder), which the DAG must then judge on its own. ``link``
    hard-links the files instead where it can, and lists no checksums (the dry run: its
    throw-away inbox is never written in place, and an upload must be a copy the site
    cannot change afterwards).
    """
    if check:
        check_upload(home, protocol_id, site_id, subject_id, visit)
    sources = _expand(paths)
    if not sources:
        raise UploadRefused("nothing to upload: no files found in the given paths")
    home.ensure()
    batch_id = new_batch_id()
    folder = home.batch_upload_dir(protocol_id, site_id, batch_id)
    entries = []
    used: set[str] = set()
    for source, relative in sources:
        name = _unique(relative, used)
        target = folder / FILES / name
        if store.is_local(target):
            place = atomic.link_or_copy if link else atomic.copy_file
            place(source, Path(target), durable=False)
            written = Path(target)
        else:
            store.put_file(source, target)  # one upload, whole or not at all
            written = source
        # Linked, the batch's file is the caller's own, not a copy whose checksum could
        # show it changed between upload and claim: the dry run hashes no input twice.
        checksum = {} if link else {"sha256": sha256_file(written)}
        entries.append({"path": name, **checksum, "size": written.stat().st_size})
    manifest = {
        "batch_id": batch_id,
        "protocol_id": protocol_id,
        "site_id": site_id,
        "subject_id": subject_id,
        "visit": visit,
        "uploader": uploader or getpass.getuser(),
        "uploaded_at": dt.datetime.now(dt.UTC).isoformat(),
        "client": f"trialpipe {__version__}",
        "files": entries,
    }
    atomic.sync()  # every copied file is on disk before the manifest and READY say so
    store.write_json(folder / MANIFEST, manifest)
    if check:  # values checked above; otherwise the claim records what it can trust
        ledger.register_batch(
            home,
            batch_id,
            protocol_id,
            site_id,
            files=len(entries),
            uploader=manifest["uploader"],
            uploaded_at=manifest["uploaded_at"],
            subject_id=subject_id,
            visit=visit,
        )
    store.write_with(folder / READY, lambda handle: None)
    return batch_id


def upload_folder(folder: Path, target: Location) -> None:
    """Put a complete local batch folder (files/, manifest.json) at ``target`` in the upload
    area, READY last, so no reader sees the batch before all of it is there."""
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != READY):
        store.put_file_once(path, target / path.relative_to(folder).as_posix())
    store.write_with(target / READY, lambda handle: None)


def _expand(paths: list[Path]) -> list[tuple[Path, str]]:
    found: list[tuple[Path, str]] = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            for file in sorted(p for p in path.rglob("*") if p.is_file()):
                found.append((file, f"{path.name}/{file.relative_to(path).as_posix()}"))
        elif path.is_file():
            found.append((path, path.name))
        else:
            raise UploadRefused(f"no such file or folder: {path}")
    return found


def _unique(relative: str, used: set[str]) -> str:
    safe = safe_relative(relative) or "file"
    candidate, n = safe, 1
    while candidate in used:
        n += 1
        stem, dot, ext = safe.rpartition(".")
        candidate = f"{stem}_{n}.{ext}" if dot else f"{safe}_{n}"
    used.add(candidate)
    return candidate


def ready_batches(home: DataHome) -> list[ReadyBatch]:
    """Batches in the upload area whose READY marker exists, oldest first."""
    found = []
    if not home.inbox.exists():
        return found
    for marker in home.inbox.glob(f"*/*/*/{READY}"):
        if marker.parent.parent.parent.name.startswith("."):
            continue
        found.append((marker.stat().st_mtime, ReadyBatch(marker.parent.name, marker.parent)))
    return [batch for _, batch in sorted(found, key=lambda item: (item[0], item[1].batch_id))]


def unfinished_batches(home: DataHome) -> list[ReadyBatch]:
    """Batches claimed but never finalized (their run was cut off): to be resumed."""
    if not home.claimed.exists():
        return []
    return [
        ReadyBatch(folder.name, folder)
        for folder in sorted(home.claimed.iterdir(), key=lambda f: (f.stat().st_mtime, f.name))
        if folder.is_dir() and not folder.name.startswith(".")
    ]


def find_upload(home: DataHome, batch_id: str) -> Location | None:
    """The upload folder of a batch not yet claimed."""
    for marker in home.inbox.glob(f"*/*/{batch_id}/{READY}"):
        if not marker.parent.parent.parent.name.startswith("."):
            return marker.parent
    return None


def claim(home: DataHome, batch_id: str) -> Path:
    """Atomically move a READY batch out of the upload area; idempotent on retry."""
    if not store.is_local(home.inbox):
        return _claim_from_store(home, batch_id)
    target = home.claimed_batch(batch_id)
    if target.exists():
        return target
    source = find_upload(home, batch_id)
    if source is None:
        raise FileNotFoundError(f"batch {batch_id} is neither in the inbox nor claimed")
    source = Path(source)
    home.claimed.mkdir(parents=True, exist_ok=True)
    # Where it was uploaded says which protocol and site it came in for; the rename loses it.
    atomic.write_json(
        source / ORIGIN, {"protocol_id": source.parent.parent.name, "site_id": source.parent.name}
    )
    try:
        os.rename(source, target)
    except FileNotFoundError:
        if not target.exists():
            raise
    return target


def _claim_from_store(home: DataHome, batch_id: str) -> Path:
    """Claim a batch uploaded to an object store, which has no rename to claim it by:
    download it into a hidden folder of the claimed area, check it, rename that folder into
    place (the claim, as on a disk), then delete the objects.

    A lock file in the data home, shared by every worker, lets one worker at a time claim
    the batch; a claim cut off half-way is resumed by downloading again, and the objects
    are deleted only once the claimed copy is complete and matches the manifest."""
    target = home.claimed_batch(batch_id)
    home.claimed.mkdir(parents=True, exist_ok=True)
    with _claim_lock(home, batch_id):
        if not target.exists():
            source = find_upload(home, batch_id)
            if source is None:
                raise FileNotFoundError(f"batch {batch_id} is neither in the inbox nor claimed")
            partial = home.claimed / f".{batch_id}.partial"
            _download(source, partial, batch_id)
            atomic.write_json(
                partial / ORIGIN,
                {"protocol_id": source.parent.parent.name, "site_id": source.parent.name},
            )
            atomic.sync()
            os.rename(partial, target)
        origin = read_origin(target)
        upload = home.batch_upload_dir(origin["protocol_id"], origin["site_id"], batch_id)
        if upload.fs.exists(upload.path):
            # READY first: from then on no listing offers the batch, even if deleting the
            # rest is cut off (the retry finds the claimed copy and deletes what is left).
            if upload.fs.exists(f"{upload.path}/{READY}"):
                upload.fs.rm_file(f"{upload.path}/{READY}")
            upload.fs.rm(upload.path, recursive=True)
        # Safe to unlink while held: whoever locks this file or a new one from now on finds
        # the claim complete and the objects gone.
        _lock_file(home, batch_id).unlink(missing_ok=True)
    return target


def _download(source: Location, folder: Path, batch_id: str) -> None:
    """Download the batch at ``source`` into ``folder``, each file under a temporary name
    renamed when complete, and check it: every object whole (its size), every file the
    manifest lists with its SHA-256. A file that still differs from the manifest when
    downloaded twice is what the site uploaded: the claim task refuses it
    (``checksum_mismatch``), as it would from a disk."""
    sizes = {
        key.removeprefix(f"{source.path}/"): int(info["size"])
        for key, info in source.fs.find(source.path, detail=True).items()
        if not key.endswith(f"/{READY}")
    }

    def fetch(relative: str) -> None:
        key = f"{source.path}/{relative}"
        atomic.write_with(folder / relative, lambda tmp: source.fs.get_file(key, str(tmp)))

    for relative in sizes:
        fetch(relative)
    for relative in _unlike_manifest(folder):
        if relative in sizes:
            fetch(relative)
    if any((folder / r).stat().st_size != size for r, size in sizes.items()):
        # A download cut short: nothing is deleted, and the retry downloads again.
        raise OSError(f"batch {batch_id}: the download is incomplete")


def _unlike_manifest(folder: Path) -> list[str]:
    """Paths (relative to ``folder``) of the files the manifest lists that are missing or
    differ from its SHA-256; none when there is no readable manifest (the claim task
    refuses that batch)."""
    manifest = read_manifest(folder)
    entries = manifest.get("files") if manifest else None
    if not isinstance(entries, list):
        return []
    unlike = []
    for entry in entries:
        relative = safe_relative(str(entry.get("path", ""))) if isinstance(entry, dict) else None
        if relative is None:
            continue  # the claim task refuses an unsafe name
        path = folder / FILES / relative
        if not path.is_file() or sha256_file(path) != entry.get("sha256"):
            unlike.append(f"{FILES}/{relative}")
    return unlike


def _lock_file(home: DataHome, batch_id: str) -> Path:
    return home.claimed / f".{batch_id}.lock"


@contextmanager
def _claim_lock(home: DataHome, batch_id: str) -> Iterator[None]:
    with open(_lock_file(home, batch_id), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The batch manifest, or None if it is missing or not a JSON object."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def read_origin(folder: Path) -> dict[str, str]:
    """Protocol and site of the upload folder a claimed batch came from."""
    try:
        return json.loads((folder / ORIGIN).read_text())
    except (OSError, ValueError):
        return {}


def remove_tree(folder: Path) -> None:
    """Remove a processed folder (missing is fine: a retry may have removed it)."""
    shutil.rmtree(folder, ignore_errors=True)
