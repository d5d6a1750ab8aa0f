"""``trialpipe deid``: de-identify a folder as a dry run, for recipe authors.

It runs the DAG's own claim, deidentify, verify and validate steps on a throw-away data home
kept inside the real one's restricted/ folder (so originals never leave the boundary), with
the real trial secret and the subject's enrollment, so the output is exactly what the DAG
would archive. Nothing touches the archive, the ledger, the tables or the crosswalk.
"""

from __future__ import annotations

import shutil
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom

from pipeline import atomic, batch, enrollment, intake, parallel, restricted
from pipeline.dicomscan import attribute_name
from pipeline.home import DataHome
from pipeline.intake import UploadRefused
from pipeline.pseudonyms import trial_secret

REPORT = "deid-report.json"


class DryRunRefused(ValueError):
    """The dry run cannot start (unknown protocol, site, visit or subject)."""


def deidentify_folder(
    home: DataHome,
    protocol_id: str,
    site_id: str,
    subject_id: str,
    visit: str,
    input_dir: Path,
    output_dir: Path,
) -> dict[str, Any]:
    """De-identify ``input_dir`` into ``output_dir``; return (and write) the report."""
    try:
        protocol = intake.check_upload(home, protocol_id, site_id, subject_id, visit)
    except UploadRefused as error:
        raise DryRunRefused(str(error)) from None
    if not input_dir.is_dir():
        raise DryRunRefused(f"no such folder: {input_dir}")
    sandbox = DataHome(home.restricted / "dry-runs" / uuid.uuid4().hex).ensure()
    try:
        _seed(home, sandbox, protocol.protocol_id, subject_id)  # the real home's key: durable
        with atomic.scratch():  # a throw-away sandbox, an output made again: no disk waits
            batch_id = intake.stage_batch(
                sandbox,
                protocol_id,
                site_id,
                subject_id,
                visit,
                sorted(input_dir.iterdir()),
                uploader="dry-run",
                link=True,
            )
            state = batch.run_in_process(
                sandbox, batch_id, ("claim", "deidentify", "verify", "validate")
            )
            worklist = batch.Worklist.load(Path(state))
            refused = worklist.batch_reason is not None
            done = [] if refused else [e for e in worklist.files if e.reason is None and e.staged]
            # Each output compared with its original, over the workers as the steps were.
            job = _ReportJob(sandbox, batch_id, output_dir)
            reports = parallel.map_files(_report, done, job)
            found = dict(zip((e.file_no for e in done), reports, strict=True))
            report_files = []
            for entry in worklist.files:
                reason = worklist.batch_reason or entry.reason
                actions = found.get(entry.file_no)
                report_files.append(
                    {
                        "path": entry.path,
                        "reason": reason,
                        "detail": worklist.batch_detail if worklist.batch_reason else entry.detail,
                        "flags": entry.flags,
                        "sop_instance_uid": entry.sop_uid if reason is None else None,
                        "actions": actions,
                    }
                )
            report = {
                "protocol_id": protocol_id,
                "recipe_version": protocol.recipe_version,
                "subject_id": subject_id,
                "visit": visit,
                "files": report_files,
            }
            atomic.write_json(output_dir / REPORT, report)
            return report
    finally:
        shutil.rmtree(sandbox.root, ignore_errors=True)


@dataclass(frozen=True)
class _ReportJob:
    sandbox: DataHome
    batch_id: str
    output_dir: Path


def _report(entry: batch.FileEntry) -> dict[str, list[str]]:
    """Put one staged file in the output folder; return what was done to it."""
    job: _ReportJob = parallel.context()
    staged = job.sandbox.claimed_batch(job.batch_id) / str(entry.staged)
    atomic.link_or_copy(staged, job.output_dir / entry.path, durable=False)
    return changes(batch.original_path(job.sandbox, job.batch_id, entry), staged)


def changes(original: Path, output: Path) -> dict[str, list[str]]:
    """What de-identification did to each top-level attribute, by name (never by value).

    The headers are compared by the bytes of each element (only an element already
    decoded is compared by value), the pixel data by its bytes."""
    before, after = _top_level(original), _top_level(output)
    done: dict[str, list[str]] = {"removed": [], "emptied": [], "replaced": [], "kept": []}
    for tag, was in before.items():
        name = attribute_name(tag)
        if tag not in after:
            done["removed"].append(name)
        elif after[tag] == was:
            done["kept"].append(name)
        elif _empty(after[tag]) and not _empty(was):
            done["emptied"].append(name)
        else:
            done["replaced"].append(name)
    done["added"] = [attribute_name(t) for t in after if t not in before]
    return done


def _top_level(path: Path) -> dict[int, Any]:
    """Each top-level element of the file: its bytes as read (its value once decoded),
    the pixel data as the rest of the file after the header."""
    with path.open("rb") as handle:
        ds = pydicom.dcmread(handle, stop_before_pixels=True, force=True)
        found: dict[int, Any] = {
            int(tag): element.value if element.is_raw else ds[tag].value
            for tag, element in ds._dict.items()
        }
        pixels = handle.read()
    if pixels:
        group, number = struct.unpack_from("<HH", pixels)
        found[(group << 16) | number] = pixels
    return found


def _empty(value: Any) -> bool:
    if isinstance(value, bytes):
        return not value.strip(b" \x00")
    return value in (None, "", b"")


def _seed(home: DataHome, sandbox: DataHome, protocol_id: str, subject_id: str) -> None:
    """Give the sandbox the real secret and the subject's enrollment, nothing else."""
    secret = sandbox.secret_file(protocol_id)
    trial_secret(home, protocol_id)
    atomic.copy_file(home.secret_file(protocol_id), secret)
    enrolled = enrollment.lookup(home, protocol_id, subject_id)
    assert enrolled is not None  # check_upload refused otherwise
    with restricted.store(sandbox).begin() as conn:
        conn.execute(
            restricted.enrollment.insert().values(
                protocol_id=protocol_id,
                subject_id=subject_id,
                site_id=enrolled.site_id,
                arm=enrolled.arm,
                randomization_date=enrolled.randomization_date,
            )
        )
