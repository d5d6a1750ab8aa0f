"""``trialpipe deid``: de-identify a folder as a dry run, for recipe authors.

It runs the DAG's own claim, deidentify, verify and validate steps on a throw-away data home
kept inside the real one's restricted/ folder (so originals never leave the boundary), with
the real trial secret and the subject's enrollment, so the output is exactly what the DAG
would archive. Nothing touches the archive, the ledger, the tables or the crosswalk.
"""

from __future__ import annotations

import io
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.filereader import read_dataset
from pydicom.sequence import Sequence

from pipeline import atomic, batch, enrollment, intake, parallel, restricted
from pipeline.dicomscan import TopLevel, attribute_name, top_level
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

    Elements are compared by their bytes as encoded, sequences by their items' values (a
    sequence written again unchanged is kept), the pixel data by its bytes."""
    return compare(*_top_levels(original.read_bytes(), output.read_bytes()))


def compare(before: dict[int, Any], after: dict[int, Any]) -> dict[str, list[str]]:
    """The actions ``changes`` reports, from each file's top-level elements by tag."""
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


def _top_levels(original: bytes, output: bytes) -> tuple[dict[int, Any], dict[int, Any]]:
    """Both files' top-level elements, read the same way: from their bytes where
    :func:`~pipeline.dicomscan.top_level` can walk both, else by pydicom."""
    walked = top_level(original), top_level(output)
    if walked[0] is None or walked[1] is None:
        return read_by_pydicom(original), read_by_pydicom(output)
    return _from_bytes(original, *walked[0]), _from_bytes(output, *walked[1])


def _from_bytes(data: bytes, elements: list[TopLevel], implicit: bool) -> dict[int, Any]:
    return {element.tag: _Encoded(data, element, implicit) for element in elements}


@dataclass(frozen=True, eq=False)
class _Encoded:
    """A top-level element as encoded in its file's bytes, compared without copying them
    (a CT slice's pixel data is half a megabyte) and parsed only when it must be: a
    sequence whose bytes differ is compared by its items' values."""

    data: bytes
    element: TopLevel
    implicit: bool

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Encoded):
            return NotImplemented
        mine, theirs = self.element, other.element
        if mine.end - mine.value == theirs.end - theirs.value and self.data.startswith(
            memoryview(other.data)[theirs.value : theirs.end], mine.value
        ):
            return True
        return mine.is_sequence and theirs.is_sequence and self.parsed() == other.parsed()

    __hash__ = None  # type: ignore[assignment]

    def parsed(self) -> Any:
        """The value: its bytes, or a sequence as pydicom reads it (from its own bytes)."""
        element = self.element
        if not element.is_sequence:
            return self.data[element.value : element.end]
        raw = io.BytesIO(self.data[element.start : element.end + 8 * element.undefined])
        try:
            return read_dataset(raw, self.implicit, True)[element.tag].value
        except Exception:  # pydicom raises anything on a malformed sequence
            return self.data[element.value : element.end]  # then compared by its bytes


def read_by_pydicom(data: bytes) -> dict[int, Any]:
    """A file's top-level elements as pydicom reads them, for :func:`compare`: each
    element's bytes as read (a sequence's value). The way for files the byte walk leaves
    to pydicom, and the walk's reference in the tests."""
    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    # An empty value read as an unknown VR is None: it is empty bytes as encoded.
    return {
        int(tag): (element.value or b"") if element.is_raw else ds[tag].value
        for tag, element in ds._dict.items()
    }


def _empty(value: Any) -> bool:
    if isinstance(value, _Encoded):
        value = value.parsed()
    if isinstance(value, bytes):
        return not value.strip(b" \x00")
    return value in (None, "", b"") or (isinstance(value, Sequence) and not value)


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
