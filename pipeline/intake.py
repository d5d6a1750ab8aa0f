"""Intake: staging an upload in the inbox (files, manifest, READY) and claiming it.

A batch folder is only ever read after its READY marker exists, and it is claimed by one
atomic rename out of the upload area, so two schedulers can never process the same batch and
a half-copied upload is never read.
"""

from __future__ import annotations

import datetime as dt
import getpass
import hashlib
import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import __version__, atomic, enrollment, ledger
from pipeline.home import DataHome, safe_relative
from pipeline.protocol import Protocol, ProtocolError, load_protocol

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
    folder: Path


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
) -> str:
    """Copy ``paths`` (files or folders) into a new inbox batch; return its batch ID.

    With ``check`` (the client's behaviour) the upload is refused when the protocol, site,
    visit or enrollment is wrong. ``check=False`` models a batch that reached the inbox by
    another route (a drop folder), which the DAG must then judge on its own.
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
        atomic.copy_file(source, target, durable=False)
        entries.append({"path": name, "sha256": sha256_file(target), "size": target.stat().st_size})
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
    atomic.write_json(folder / MANIFEST, manifest)
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
    atomic.write_bytes(folder / READY, b"")
    return batch_id


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
        if marker.parts[-4].startswith("."):
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


def find_upload(home: DataHome, batch_id: str) -> Path | None:
    """The upload folder of a batch not yet claimed."""
    for folder in home.inbox.glob(f"*/*/{batch_id}"):
        if not folder.parts[-3].startswith(".") and (folder / READY).exists():
            return folder
    return None


def claim(home: DataHome, batch_id: str) -> Path:
    """Atomically move a READY batch out of the upload area; idempotent on retry."""
    target = home.claimed_batch(batch_id)
    if target.exists():
        return target
    source = find_upload(home, batch_id)
    if source is None:
        raise FileNotFoundError(f"batch {batch_id} is neither in the inbox nor claimed")
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
