"""One function per ingest task. Each takes the data home and a batch ID, does its step for
the whole batch, and returns the path of what it wrote; the DAG and the CLI call these same
functions. Paths and batch IDs are all that leave a task: never values from a file.

claim -> deidentify -> verify -> validate -> write_tables -> route -> finalize
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import json
import logging
import os
import sqlite3
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.exc import DBAPIError

from pipeline import (
    __version__,
    atomic,
    faults,
    intake,
    ledger,
    parallel,
    restricted,
    rows,
    store,
    tables,
    zipped,
)
from pipeline.dicomio import UNDECODABLE, read_upload, write_dicom
from pipeline.enrollment import lookup
from pipeline.home import DataHome, safe_relative
from pipeline.protocol import Limits, Protocol, ProtocolError, load_protocol
from pipeline.pseudonyms import patient_fingerprint, trial_secret
from pipeline.reasons import BatchState, Disposition, Reason
from pipeline.verify import IdentifyingValues, residual_phi_in_file
from pipeline.worklist import FileEntry, Worklist

log = logging.getLogger("trialpipe.batch")


def _state(home: DataHome, batch_id: str, task: str) -> Path:
    return home.claimed_batch(batch_id) / "state" / f"{task}.json"


def _load(home: DataHome, batch_id: str, task: str) -> Worklist:
    return Worklist.load(_state(home, batch_id, task))


def _staged(home: DataHome, batch_id: str, file_no: int) -> Path:
    return home.claimed_batch(batch_id) / "staged" / f"{file_no:06d}.dcm"


def original_path(home: DataHome, batch_id: str, entry: FileEntry) -> Path:
    """Where a claimed original lies: renamed to its number, so no name chosen at the site
    (which may carry identifiers) appears in a path, a log line or a traceback."""
    return home.claimed_batch(batch_id) / NUMBERED / f"{entry.file_no:06d}"


NUMBERED = "numbered"
UNKNOWN = tables.UNKNOWN  # the ledger's and the batches table's word for an untrusted value


def claim(home: DataHome, batch_id: str, run_id: str | None = None) -> Path:
    """Move the batch out of the upload area; check its manifest, its subject and each
    file's size; expand zip files; number every file."""
    home.ensure()
    folder = intake.claim(home, batch_id)
    target = _state(home, batch_id, "claim")
    if target.exists():
        return target
    plan = _state(home, batch_id, "claim-plan")
    # The plan is saved before any file moves, so a claim cut off half-way redoes the
    # same moves (each idempotent) instead of listing a half-renamed folder again.
    worklist = Worklist.load(plan) if plan.exists() else _plan(home, batch_id, folder)
    if not plan.exists():
        worklist.save(plan)
    protocol = _known_protocol(worklist.protocol_id) if not worklist.batch_reason else None
    limits = protocol.limits if protocol else Limits()
    for entry in list(worklist.files):
        if entry.archive_of is not None:
            continue  # a zip member, numbered when its zip was expanded
        relative = safe_relative(entry.path)
        source = folder / intake.FILES / relative if relative else None
        numbered = original_path(home, batch_id, entry)
        if source is not None and (source.is_file() or numbered.exists()):
            atomic.move_file(source, numbered)
            faults.checkpoint("claim")
        elif not entry.reason:
            entry.refuse(Reason.FILE_MISSING)
        if entry.reason or not numbered.exists():
            continue
        if numbered.stat().st_size > limits.max_file_bytes:
            entry.refuse(Reason.FILE_TOO_LARGE)
        elif zipped.is_zip(numbered):
            _expand(home, worklist, entry, limits)
    if not worklist.batch_reason:
        enrolled = lookup(home, worklist.protocol_id, worklist.subject_id)
        if enrolled is None or enrolled.site_id != worklist.site_id:
            worklist.refuse_batch(Reason.UNENROLLED_SUBJECT, "subject not enrolled at this site")
        else:
            worklist.arm = enrolled.arm
    confirmed = worklist.arm is not None
    ledger.set_state(
        home,
        batch_id,
        BatchState.PROCESSING,
        "claimed",
        subject_id=worklist.subject_id if confirmed else None,
        visit=worklist.visit if confirmed else None,
        recipe_version=protocol.recipe_version if protocol else None,
        code_version=__version__,
        dag_run_id=run_id,
    )
    log.info("claimed batch %s: %d files", batch_id, len(worklist.files))
    return worklist.save(target)


def _plan(home: DataHome, batch_id: str, folder: Path) -> Worklist:
    """The batch's worklist from its manifest and what is on disk; registers the batch."""
    origin_protocol, origin_site = _upload_origin(folder)
    manifest = intake.read_manifest(folder) or {}
    problem = _manifest_problem(manifest, origin_protocol, origin_site)
    protocol_id = str(manifest.get("protocol_id") or origin_protocol)
    site_id = str(manifest.get("site_id") or origin_site)
    trusted = problem is None
    ledger.register_batch(
        home,
        batch_id,
        protocol_id if trusted else UNKNOWN,
        site_id if trusted else UNKNOWN,
        files=len(manifest["files"]) if isinstance(manifest.get("files"), list) else 0,
        uploader=str(manifest.get("uploader") or "")[:128] or None,
        uploaded_at=_time_or_none(manifest.get("uploaded_at")),
        released_from=manifest.get("released_from") if trusted else None,
    )
    worklist = Worklist(
        batch_id=batch_id,
        protocol_id=protocol_id,
        site_id=site_id,
        subject_id=str(manifest.get("subject_id", "")),
        visit=str(manifest.get("visit", "")),
    )
    listed = manifest.get("files") if isinstance(manifest.get("files"), list) else []
    for item in listed:
        item = item if isinstance(item, dict) else {}
        worklist.files.append(
            FileEntry(
                len(worklist.files),
                str(item.get("path", "")),
                item.get("sha256"),
                item.get("size"),
                released_from=item.get("released_from"),
            )
        )
    known = {entry.path for entry in worklist.files}
    for path in sorted((folder / intake.FILES).rglob("*")):
        relative = path.relative_to(folder / intake.FILES).as_posix()
        if path.is_file() and relative not in known:
            extra = FileEntry(len(worklist.files), relative, None, path.stat().st_size)
            extra.refuse(Reason.CHECKSUM_MISMATCH, "file not listed in the manifest")
            worklist.files.append(extra)
    if problem:
        worklist.refuse_batch(Reason.MANIFEST_INVALID, problem)
    return worklist


def _expand(home: DataHome, worklist: Worklist, entry: FileEntry, limits: Limits) -> None:
    """Replace a zip by its members as files of the batch (or refuse it unopened)."""
    source = original_path(home, worklist.batch_id, entry)
    if entry.sha256 and intake.sha256_file(source) != entry.sha256:
        entry.refuse(Reason.CHECKSUM_MISMATCH)
        return
    scratch = source.with_name(f"{source.name}.members")
    try:
        members = zipped.expand(source, scratch, limits)
    except (zipped.UnsafeArchive, zipfile.BadZipFile, NotImplementedError, OSError) as error:
        intake.remove_tree(scratch)
        detail = str(error) if isinstance(error, zipped.UnsafeArchive) else "unreadable zip"
        entry.refuse(Reason.UNSAFE_ARCHIVE, detail)
        return
    entry.expanded = True
    for member in members:
        child = FileEntry(
            len(worklist.files),
            f"{entry.path}.unzipped/{member.name}",
            intake.sha256_file(member.path),
            member.path.stat().st_size,
            archive_of=entry.file_no,
        )
        os.replace(member.path, original_path(home, worklist.batch_id, child))
        worklist.files.append(child)
    intake.remove_tree(scratch)


def _time_or_none(value: object) -> str | None:
    try:
        return dt.datetime.fromisoformat(str(value)).isoformat() if value else None
    except ValueError:
        return None


def _known_protocol(protocol_id: str) -> Protocol | None:
    try:
        return load_protocol(protocol_id)
    except ProtocolError:
        return None


def _upload_origin(folder: Path) -> tuple[str, str]:
    """Protocol and site as given by the folder the batch was uploaded to."""
    origin = intake.read_origin(folder)
    return origin.get("protocol_id", ""), origin.get("site_id", "")


def _manifest_problem(manifest: dict, protocol_id: str, site_id: str) -> str | None:
    if not manifest:
        return "manifest.json missing or unreadable"
    if protocol_id and manifest.get("protocol_id") != protocol_id:
        return "manifest names another protocol than the upload folder"
    if site_id and manifest.get("site_id") != site_id:
        return "manifest names another site than the upload folder"
    try:
        protocol = load_protocol(str(manifest.get("protocol_id")))
    except ProtocolError:
        return "manifest names an unknown protocol"
    if manifest.get("site_id") not in protocol.sites:
        return "manifest names an unknown site"
    if manifest.get("visit") not in protocol.visit_ids:
        return "manifest names an unknown visit"
    files = manifest.get("files")
    if not isinstance(files, list) or not files:
        return "manifest lists no files"
    for item in files:
        if not isinstance(item, dict) or safe_relative(str(item.get("path", ""))) is None:
            return "manifest names a file outside the batch"
    return None


def _recipe_version(protocol_id: str) -> str | None:
    protocol = _known_protocol(protocol_id)
    return protocol.recipe_version if protocol else None


@dataclass(frozen=True)
class _DeidJob:
    """What every worker of a batch's deidentify step shares (inherited, never pickled)."""

    home: DataHome
    batch_id: str
    deidentifier: Any  # pipeline.deidentify.Deidentifier (imported by the task, not here)
    key: bytes
    anchor: dt.date
    required: frozenset[str]


@dataclass
class _Deidentified:
    """One file's result, sent back from a worker: the updated entry and, inside the
    boundary, what the batch checks need (patient fingerprint, crosswalk, originals'
    identifying values)."""

    entry: FileEntry
    fingerprint: str | None = None
    crosswalk: dict[tuple[str, str], str] = field(default_factory=dict)
    identifying: frozenset[str] = frozenset()


def _deidentify_file(entry: FileEntry) -> _Deidentified:
    job: _DeidJob = parallel.context()
    done = _Deidentified(entry)
    source = original_path(job.home, job.batch_id, entry)
    # The whole file is read once: its checksum, its header and its pixel bytes all come
    # from this one buffer (the pixels are written back untouched unless cleaned).
    try:
        data = source.read_bytes()
    except FileNotFoundError:
        entry.refuse(Reason.FILE_MISSING)
        return done
    if entry.sha256 and hashlib.sha256(data).hexdigest() != entry.sha256:
        entry.refuse(Reason.CHECKSUM_MISMATCH)
        return done
    try:
        return _deidentify_data(job, done, data)
    except UNDECODABLE as error:
        # pydicom parsed the file, but an element of it cannot be decoded (a corrupt VR or
        # value). Only the error's type is kept: its message can quote the value.
        _staged(job.home, job.batch_id, entry.file_no).unlink(missing_ok=True)
        entry.refuse(Reason.DEID_FAILED, f"an element cannot be decoded ({type(error).__name__})")
        return done


def _deidentify_data(job: _DeidJob, done: _Deidentified, data: bytes) -> _Deidentified:
    from pipeline.deidentify import BurnedInAnnotationError, DeidentificationError, burned_in_risk

    entry = done.entry
    read = read_upload(data)
    if read.dataset is not None and read.pixels is not None and burned_in_risk(read.dataset):
        read = read_upload(data, keep_pixels_apart=False)  # cleaning needs the pixels
    if read.reason or read.dataset is None:
        entry.refuse(read.reason or Reason.NOT_DICOM, read.detail)
        return done
    ds = read.dataset
    done.fingerprint = patient_fingerprint(
        job.key,
        str(ds.get("PatientID", "") or ""),
        str(ds.get("PatientName", "") or ""),
        str(ds.get("PatientBirthDate", "") or ""),
    )
    try:
        outcome = job.deidentifier.apply(ds, read.encoded)
    except BurnedInAnnotationError as error:
        entry.refuse(Reason.BURNED_IN_ANNOTATION, str(error))
        return done
    except DeidentificationError as error:
        entry.refuse(Reason.DEID_FAILED, str(error))
        return done
    staged = _staged(job.home, job.batch_id, entry.file_no)
    written: list[tuple[str, int]] = []
    try:
        atomic.write_with(
            staged, lambda tmp: written.append(write_dicom(ds, tmp, read.pixels)), durable=False
        )
    except UNDECODABLE as error:
        # pydicom read the file but cannot encode it again (a malformed original).
        entry.refuse(Reason.DEID_FAILED, f"cannot be written as DICOM ({type(error).__name__})")
        return done
    # The table row and the required tags come from the de-identified dataset just
    # written (its file meta as written), so validate and write_tables need not parse the
    # file again; the file counts as staged only once they are taken.
    row = rows.instance_row(ds, job.anchor, read.pixels is not None or "PixelData" in ds)
    required = rows.tag_values(ds, job.required)
    entry.staged = str(staged.relative_to(job.home.claimed_batch(job.batch_id)))
    entry.sha256_out, entry.size_out = written[-1]
    entry.sop_uid, entry.study_uid, entry.series_uid = (
        outcome.sop_uid,
        outcome.study_uid,
        outcome.series_uid,
    )
    entry.row = {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in row.items()}
    entry.required = required
    done.crosswalk, done.identifying = outcome.crosswalk, outcome.identifying
    return done


def deidentify(
    home: DataHome,
    batch_id: str,
    run_id: str | None = None,
    meanwhile: Callable[[], object] | None = None,
) -> Path:
    """De-identify every readable file into ``staged/`` (over worker processes); check
    the batch is one patient, the same patient as the subject's earlier batches.
    ``meanwhile`` runs in this process while the workers work (see
    :func:`pipeline.parallel.map_files`)."""
    # deid loads here, not in every task process that imports this module.
    from pipeline.deidentify import Deidentifier, Subject
    from pipeline.validate import required_keywords

    worklist = _load(home, batch_id, "claim")
    if worklist.batch_reason:
        return worklist.save(_state(home, batch_id, "deidentify"))
    protocol = load_protocol(worklist.protocol_id)
    enrollee = lookup(home, worklist.protocol_id, worklist.subject_id)
    assert enrollee is not None  # claim refused the batch otherwise
    job = _DeidJob(
        home,
        batch_id,
        Deidentifier(home, protocol, Subject(enrollee, worklist.visit)),
        trial_secret(home, protocol.protocol_id),
        protocol.date_anchor,
        frozenset(required_keywords(protocol) | {"Modality"}),
    )
    fingerprints: set[str] = set()
    crosswalk: dict[tuple[str, str], str] = {}
    identifying: set[str] = set()
    position = {entry.file_no: n for n, entry in enumerate(worklist.files)}
    for done in parallel.map_files(_deidentify_file, worklist.in_play(), job, meanwhile=meanwhile):
        worklist.files[position[done.entry.file_no]] = done.entry
        if done.fingerprint:
            fingerprints.add(done.fingerprint)
        crosswalk.update(done.crosswalk)
        identifying |= done.identifying
        faults.checkpoint("deidentify")
    if not fingerprints:
        worklist.refuse_batch(Reason.NO_DICOM_IN_BATCH)
    elif len(fingerprints) > 1:
        worklist.refuse_batch(Reason.MIXED_PATIENTS, f"{len(fingerprints)} patients in one batch")
    elif not restricted.link_patient(
        home, protocol.protocol_id, worklist.subject_id, next(iter(fingerprints)), batch_id
    ):
        worklist.refuse_batch(Reason.PATIENT_MISMATCH)
    if not worklist.batch_reason:
        restricted.record_crosswalk(home, protocol.protocol_id, crosswalk)
    # Inside the boundary (the claimed batch), for verify: the batch is one patient, so
    # every file's output is searched for every original identifying value of the batch.
    atomic.write_json(_identifying(home, batch_id), sorted(identifying))
    atomic.sync()  # the staged files, written without a per-file fsync, are on disk now
    log.info("de-identified batch %s: %d files staged", batch_id, len(worklist.in_play()))
    return worklist.save(_state(home, batch_id, "deidentify"))


def _identifying(home: DataHome, batch_id: str) -> Path:
    return home.claimed_batch(batch_id) / "state" / "identifying.json"


@dataclass(frozen=True)
class _VerifyJob:
    home: DataHome
    batch_id: str
    values: IdentifyingValues


def _verify_file(entry: FileEntry) -> tuple[Reason, str] | None:
    """The reason and detail to refuse a staged file for, or None when it is clean."""
    job: _VerifyJob = parallel.context()
    # Every element is searched, trailing ones too; the pixel data is never decoded.
    staged = job.home.claimed_batch(job.batch_id) / str(entry.staged)
    hits = residual_phi_in_file(job.values, staged)
    if hits is None:
        return Reason.DEID_FAILED, "de-identified file could not be re-read"
    if hits:
        return Reason.RESIDUAL_PHI, "identifying value left in " + ", ".join(hits)
    return None


def verify(home: DataHome, batch_id: str, run_id: str | None = None) -> Path:
    """Quarantine any staged file that still holds an identifying value of the originals."""
    worklist = _load(home, batch_id, "deidentify")
    entries = worklist.in_play()
    if entries:
        values = IdentifyingValues(frozenset(json.loads(_identifying(home, batch_id).read_text())))
        values.prepare()  # compiled once here, inherited by every worker
        job = _VerifyJob(home, batch_id, values)
        for entry, refused in zip(
            entries, parallel.map_files(_verify_file, entries, job), strict=True
        ):
            if refused:
                entry.refuse(*refused)
            faults.checkpoint("verify")
    log.info("verified batch %s: %d files clean", batch_id, len(worklist.in_play()))
    return worklist.save(_state(home, batch_id, "verify"))


def validate(home: DataHome, batch_id: str, run_id: str | None = None) -> Path:
    """Check the protocol's required tags (Great Expectations, with Data Docs per batch)
    on the values deidentify took from each de-identified header; reserve each passing
    file's archive slot, or mark it a duplicate or a conflict."""
    from pipeline import validate as rules

    worklist = _load(home, batch_id, "verify")
    entries = worklist.in_play()
    if entries:
        protocol = load_protocol(worklist.protocol_id)
        metadata = [{"file_no": entry.file_no, **(entry.required or {})} for entry in entries]
        by_no = {entry.file_no: entry for entry in entries}
        docs = home.qc_report(batch_id)
        for finding in rules.check_batch(protocol, metadata, docs, run_name=batch_id):
            entry = by_no[finding.file_no]
            entry.findings.append(finding.record())
            if finding.quarantine and entry.reason is None:
                entry.refuse(finding.reason, finding.detail)
        if (docs / "index.html").exists():
            worklist.qc_report = str((docs / "index.html").relative_to(home.root))
        _mark_duplicates(home, worklist)
        faults.checkpoint("validate")
    log.info("validated batch %s: %d files pass", batch_id, len(worklist.in_play()))
    return worklist.save(_state(home, batch_id, "validate"))


def _mark_duplicates(home: DataHome, worklist: Worklist) -> None:
    """Reserve each file's archive slot in the ledger and judge it by who holds the slot:
    this file goes on to the archive; another file (of an earlier batch, of a batch being
    processed at the same time, or of this batch) makes it a duplicate when the bytes are
    the same and a conflict when they differ. Deciding and reserving is one transaction,
    so two batches of the same upload can never both archive an instance; a retry of
    this task finds its own reservations."""
    entries = worklist.in_play()
    for entry in entries:
        entry.archive_path = _archive_relative(worklist, entry)
    holders = ledger.reserve_archive_slots(
        home,
        worklist.batch_id,
        [
            ledger.ArchiveSlot(
                str(entry.sop_uid), entry.file_no, str(entry.sha256_out), entry.archive_path
            )
            for entry in entries
        ],
    )
    for entry in entries:
        holder = holders[str(entry.sop_uid)]
        if (holder.batch_id, holder.file_no) == (worklist.batch_id, entry.file_no):
            continue
        if holder.sha256_out == entry.sha256_out:
            entry.duplicate = True
            entry.archive_path = None
        elif holder.batch_id == worklist.batch_id:
            entry.refuse(Reason.SOP_INSTANCE_CONFLICT, "differs from another file of this batch")
        else:
            entry.refuse(Reason.SOP_INSTANCE_CONFLICT, "differs from the archived instance")


def _archive_relative(worklist: Worklist, entry: FileEntry) -> str:
    return "/".join(
        [
            worklist.protocol_id,
            str(worklist.arm),
            worklist.subject_id,
            worklist.visit,
            str(entry.study_uid),
            str(entry.series_uid),
            f"{entry.sop_uid}.dcm",
        ]
    )


def write_tables(home: DataHome, batch_id: str, run_id: str | None = None) -> Path:
    """Write the batch's rows of the instances, series and qc_findings tables, replacing
    any earlier run's rows."""
    worklist = _load(home, batch_id, "validate")
    versions = {
        "recipe_version": _recipe_version(worklist.protocol_id) or "",
        "code_version": __version__,
    }
    instances = rows.instance_rows(worklist, versions)
    findings = rows.finding_rows(worklist, versions)
    if worklist.protocol_id and worklist.site_id:
        for table, table_rows in (
            ("instances", instances),
            ("series", rows.series_rows(instances)),
            ("qc_findings", findings),
        ):
            tables.write_batch(
                home, table, worklist.protocol_id, worklist.site_id, batch_id, table_rows
            )
            faults.checkpoint("write_tables")
    log.info("tables for batch %s: %d instance rows", batch_id, len(instances))
    return worklist.save(_state(home, batch_id, "tables"))


def route(home: DataHome, batch_id: str, run_id: str | None = None) -> Path:
    """Copy each verified, validated file into its arm archive (atomic, idempotent), on
    the data home's disk or an object store: a file whose archived copy has the same
    SHA-256 is not written again. Validate reserved each file's slot, so no other batch
    writes the same instance."""
    worklist = _load(home, batch_id, "tables")
    for entry in worklist.in_play():
        target = home.archive / str(entry.archive_path)
        if store.sha256(target) != entry.sha256_out:
            store.put_file(home.claimed_batch(batch_id) / str(entry.staged), target)
        faults.checkpoint("route")
    atomic.sync()
    log.info("routed batch %s: %d files archived", batch_id, len(worklist.in_play()))
    return worklist.save(_state(home, batch_id, "route"))


def finalize(home: DataHome, batch_id: str, run_id: str | None = None) -> Path:
    """Quarantine refused originals with reasons, keep the rest in the restricted store,
    append every file's disposition to the ledger and close the batch."""
    from pipeline import quarantine

    folder = home.claimed_batch(batch_id)
    if not folder.exists():
        return home.batch_record(batch_id)  # finalized by an earlier attempt
    worklist = _load(home, batch_id, "route")
    records = [_record(worklist, entry) for entry in worklist.files if not entry.expanded]
    refused = [
        (entry, original_path(home, batch_id, entry), str(record.reason), record.detail)
        for entry, record in zip(
            [e for e in worklist.files if not e.expanded], records, strict=True
        )
        if record.disposition == Disposition.QUARANTINED
    ]
    if refused:
        quarantine.put(home, worklist, refused)
    kept = [
        entry
        for entry in worklist.files
        if entry.expanded or not (worklist.batch_reason or entry.reason)
    ]
    for entry in kept:
        atomic.move_file(
            original_path(home, batch_id, entry),
            home.originals(batch_id) / intake.FILES / entry.kept_name,
        )
    if kept and (folder / intake.MANIFEST).exists():
        atomic.copy_file(folder / intake.MANIFEST, home.originals(batch_id) / intake.MANIFEST)
    versions = {
        "recipe_version": _recipe_version(worklist.protocol_id),
        "code_version": __version__,
        "dag_run_id": run_id,
    }
    faults.checkpoint("finalize")
    ledger.record_files(home, batch_id, records, **versions)
    state = BatchState.QUARANTINED if worklist.batch_reason else BatchState.DONE
    ledger.set_state(
        home, batch_id, state, worklist.batch_detail, reason=worklist.batch_reason, **versions
    )
    _write_batch_row(home, worklist, state, records)
    summary = atomic.write_json(
        home.batch_record(batch_id),
        {
            "batch_id": batch_id,
            "state": state.value,
            "reason": worklist.batch_reason,
            "qc_report": worklist.qc_report,
            "files": [asdict(record) for record in records],
        },
    )
    intake.remove_tree(folder)
    log.info("finalized batch %s: %s", batch_id, state.value)
    return summary


def _record(worklist: Worklist, entry: FileEntry) -> ledger.FileRecord:
    if worklist.batch_reason or entry.reason:
        reason = worklist.batch_reason or entry.reason
        detail = worklist.batch_detail if worklist.batch_reason else entry.detail
        return ledger.FileRecord(
            entry.file_no, entry.sha256, entry.size, Disposition.QUARANTINED, reason, detail
        )
    if entry.duplicate:
        return ledger.FileRecord(
            entry.file_no,
            entry.sha256,
            entry.size,
            Disposition.DUPLICATE,
            None,
            None,
            entry.sha256_out,
        )
    return ledger.FileRecord(
        entry.file_no,
        entry.sha256,
        entry.size,
        Disposition.ARCHIVED,
        None,
        "; ".join(entry.flags) or None,
        entry.sha256_out,
        entry.archive_path,
    )


def refresh_batch_counts(home: DataHome, batch_id: str) -> None:
    """Rewrite the batch's row of the batches table with its current file counts from the
    ledger (after a release moved some of its files to another batch)."""
    import pyarrow.compute as pc

    data = tables.read_table(home, "batches")
    matching = data.filter(pc.equal(data["batch_id"], batch_id)).to_pylist()
    summary = ledger.batch_summary(home, batch_id)
    if not matching or summary is None:
        return
    row = matching[0]
    for key in ("archived", "quarantined", "duplicates", "released"):
        row[key] = summary[key]
    tables.write_batch(home, "batches", row["protocol"], row["site"], batch_id, [row])


def _write_batch_row(
    home: DataHome, worklist: Worklist, state: BatchState, records: list[ledger.FileRecord]
) -> None:
    """The batch's row of the batches table. Partition and identity values are written
    only once trusted: a batch refused at claim may carry anything a site typed."""
    protocol = _known_protocol(worklist.protocol_id)
    first = ledger.state_times(home, worklist.batch_id)
    times = {
        "uploaded_at": (ledger.batch_summary(home, worklist.batch_id) or {}).get("uploaded_at"),
        "claimed_at": first.get(BatchState.PROCESSING.value),
        "finished_at": first.get(state.value),
    }
    row = rows.batch_row(worklist, protocol, state.value, records, times, __version__)
    trusted = rows.trusted(worklist, protocol)
    protocol_part = worklist.protocol_id if trusted else UNKNOWN
    site_part = worklist.site_id if trusted else UNKNOWN
    tables.write_batch(home, "batches", protocol_part, site_part, worklist.batch_id, [row])


TASKS = {
    "claim": claim,
    "deidentify": deidentify,
    "verify": verify,
    "validate": validate,
    "write_tables": write_tables,
    "route": route,
    "finalize": finalize,
}


# The worklist each task leaves behind: once it exists, the task has completed.
OUTPUT = {
    "claim": "claim",
    "deidentify": "deidentify",
    "verify": "verify",
    "validate": "validate",
    "write_tables": "tables",
    "route": "route",
}


def run_in_process(home: DataHome, batch_id: str, steps: Sequence[str] = tuple(TASKS)) -> str:
    """Run ``steps`` of one batch in this process, in order, as the DAG's tasks run them
    (the dry run and the benchmarks do); return the last one's path. While the files are
    de-identified, a thread loads Great Expectations for the validate step that follows
    here (the DAG's validate task is a process of its own and loads it itself)."""
    from pipeline import validate

    path = ""
    for step in steps:
        options = (
            {"meanwhile": validate.load} if step == "deidentify" and "validate" in steps else {}
        )
        path = run_task(step, batch_id, home, **options)
    return path


class DiskFull(RuntimeError):
    """The data home's disk is full: an infrastructure fault, not a bad file."""


def run_task(
    step: str,
    batch_id: str,
    home: DataHome | None = None,
    run_id: str | None = None,
    **options: Any,
) -> str:
    """Run one named task for a batch (the DAG's single entry point); return its path.

    A task whose worklist exists has completed (worklists are written last, atomically)
    and is not run again, so a batch resumed after a crash continues where it stopped; a
    finalized batch runs nothing again.
    ``run_id`` is the Airflow DAG run's ID, recorded in the ledger; ``options`` go to the
    task's function.
    """
    from pipeline.home import data_home

    home = home or data_home()
    if home.batch_record(batch_id).exists() and not home.claimed_batch(batch_id).exists():
        return str(home.batch_record(batch_id))  # finalized: a rerun of the batch is a no-op
    done = _state(home, batch_id, OUTPUT[step]) if step in OUTPUT else None
    if done is not None and done.exists():
        return str(done)
    try:
        return str(TASKS[step](home, batch_id, run_id=run_id, **options))
    except (OSError, DBAPIError) as error:
        if not _disk_full(error):
            raise
        # Said without the path (the file name is not the problem, the disk is) and
        # without the database error, which quotes the statement's values.
        raise DiskFull(
            f"no space left on the data home's disk during {step} of batch {batch_id};"
            " free space and the task is retried"
        ) from None


def _disk_full(error: OSError | DBAPIError) -> bool:
    """A write failed for want of space: ENOSPC, or SQLite's SQLITE_FULL (the ledger's or
    the restricted store's database on the data home)."""
    if isinstance(error, OSError):
        return error.errno == errno.ENOSPC
    return getattr(error.orig, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
