"""The one enumeration of reasons a file or a batch is not archived.

Every quarantine, QC finding and refusal the pipeline produces carries one of these codes.
docs/quarantine.md carries :func:`markdown_table` verbatim; a site coordinator reads the
``action`` text, so it must say what to do, never echo a value from the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Scope(StrEnum):
    """Whether a reason applies to one file or to the whole batch."""

    FILE = "file"
    BATCH = "batch"


@dataclass(frozen=True)
class ReasonInfo:
    scope: Scope
    summary: str
    action: str


class Reason(StrEnum):
    """Machine-readable reason codes; the value is what lands in ledgers and reports."""

    # File-level: the file cannot be read as DICOM.
    EMPTY_FILE = "empty_file"
    NOT_DICOM = "not_dicom"
    TRUNCATED = "truncated"
    UNSUPPORTED_TRANSFER_SYNTAX = "unsupported_transfer_syntax"
    MISSING_SOP_INSTANCE_UID = "missing_sop_instance_uid"
    CHECKSUM_MISMATCH = "checksum_mismatch"
    FILE_MISSING = "file_missing"
    FILE_TOO_LARGE = "file_too_large"
    UNSAFE_ARCHIVE = "unsafe_archive"
    # File-level: de-identification and its checks.
    DEID_FAILED = "deid_failed"
    BURNED_IN_ANNOTATION = "burned_in_annotation"
    RESIDUAL_PHI = "residual_phi"
    MISSING_REQUIRED_TAG = "missing_required_tag"
    VALUE_OUT_OF_RANGE = "value_out_of_range"
    SOP_INSTANCE_CONFLICT = "sop_instance_conflict"
    # Batch-level: the batch as a whole cannot be trusted.
    UNENROLLED_SUBJECT = "unenrolled_subject"
    MIXED_PATIENTS = "mixed_patients"
    PATIENT_MISMATCH = "patient_mismatch"
    NO_DICOM_IN_BATCH = "no_dicom_in_batch"
    MANIFEST_INVALID = "manifest_invalid"

    @property
    def info(self) -> ReasonInfo:
        return _INFO[self]

    @property
    def scope(self) -> Scope:
        return _INFO[self].scope


_INFO: dict[Reason, ReasonInfo] = {
    Reason.EMPTY_FILE: ReasonInfo(
        Scope.FILE,
        "The file is empty (0 bytes).",
        "Re-export the image from PACS and upload it again; the copy was interrupted.",
    ),
    Reason.NOT_DICOM: ReasonInfo(
        Scope.FILE,
        "The file is not a DICOM file.",
        "Upload only DICOM images; remove reports, screenshots or archives from the folder.",
    ),
    Reason.TRUNCATED: ReasonInfo(
        Scope.FILE,
        "The DICOM file ends before its data is complete.",
        "The file was cut off in transfer: re-export it and upload the batch again.",
    ),
    Reason.UNSUPPORTED_TRANSFER_SYNTAX: ReasonInfo(
        Scope.FILE,
        "The file is encoded in a transfer syntax trialpipe cannot read (a vendor's own).",
        "Export the image from the scanner or PACS in a standard transfer syntax (e.g. "
        "Explicit VR Little Endian) and upload it again.",
    ),
    Reason.MISSING_SOP_INSTANCE_UID: ReasonInfo(
        Scope.FILE,
        "The DICOM file has no SOP Instance UID, so it cannot be tracked.",
        "Export the image from the scanner or PACS, not from a viewer that strips identifiers.",
    ),
    Reason.CHECKSUM_MISMATCH: ReasonInfo(
        Scope.FILE,
        "The file's SHA-256 differs from the one in the batch manifest.",
        "The file changed after upload: upload the batch again with the trialpipe client.",
    ),
    Reason.FILE_MISSING: ReasonInfo(
        Scope.FILE,
        "A file listed in the manifest is not in the batch.",
        "Upload the batch again; do not move files after the upload finished.",
    ),
    Reason.FILE_TOO_LARGE: ReasonInfo(
        Scope.FILE,
        "The file is larger than the protocol's size limit for one uploaded file.",
        "Check it is one DICOM image and not a disk image or a video; if it is a genuine "
        "image, ask the core lab to raise the protocol's limit, then release it.",
    ),
    Reason.UNSAFE_ARCHIVE: ReasonInfo(
        Scope.FILE,
        "A zip file in the batch was refused unopened: it names paths outside itself, is "
        "encrypted, holds too many files, or expands far beyond its size.",
        "Upload the DICOM files themselves, or a plain zip of them made by your PACS or "
        "operating system, with no password.",
    ),
    Reason.DEID_FAILED: ReasonInfo(
        Scope.FILE,
        "The protocol's de-identification recipe could not be applied to the file.",
        "Nothing to do at the site: the imaging core lab will review the recipe.",
    ),
    Reason.BURNED_IN_ANNOTATION: ReasonInfo(
        Scope.FILE,
        "The image may show identifying text in its pixels and no cleaning region is defined"
        " for it.",
        "Send screen captures and reports only if the protocol asks; otherwise nothing to do:"
        " the core lab will define a cleaning region for this scanner or review the image.",
    ),
    Reason.RESIDUAL_PHI: ReasonInfo(
        Scope.FILE,
        "An identifying value of the original was still present after de-identification.",
        "Nothing to do at the site: the imaging core lab will review the recipe.",
    ),
    Reason.MISSING_REQUIRED_TAG: ReasonInfo(
        Scope.FILE,
        "An attribute the protocol requires for this modality is missing or empty.",
        "Check the acquisition protocol on the scanner; re-export with full headers.",
    ),
    Reason.VALUE_OUT_OF_RANGE: ReasonInfo(
        Scope.FILE,
        "An acquisition parameter is outside the range or the values the protocol allows, or"
        " is not a number where the protocol sets a range.",
        "Check the scan against the imaging manual; a repeat scan may be required.",
    ),
    Reason.SOP_INSTANCE_CONFLICT: ReasonInfo(
        Scope.FILE,
        "An image with the same SOP Instance UID but different content is already archived"
        " (or is in the same upload).",
        "Tell the core lab whether this image replaces the earlier one.",
    ),
    Reason.UNENROLLED_SUBJECT: ReasonInfo(
        Scope.BATCH,
        "The subject is not on the protocol's enrollment list.",
        "Check the subject ID; if the subject was just randomized, ask the core lab to "
        "import the updated enrollment list, then release the batch.",
    ),
    Reason.MIXED_PATIENTS: ReasonInfo(
        Scope.BATCH,
        "The batch holds images of more than one patient.",
        "Upload one subject's images per batch; remove the other patient's images.",
    ),
    Reason.PATIENT_MISMATCH: ReasonInfo(
        Scope.BATCH,
        "The images belong to a different patient than this subject's earlier batches.",
        "Possible wrong-patient upload: check the subject ID and the exported study.",
    ),
    Reason.NO_DICOM_IN_BATCH: ReasonInfo(
        Scope.BATCH,
        "No file in the batch could be read as DICOM.",
        "Upload the DICOM images themselves, not a report or an archive of them.",
    ),
    Reason.MANIFEST_INVALID: ReasonInfo(
        Scope.BATCH,
        "The batch manifest is missing, unreadable, or names an unknown protocol, site or visit.",
        "Upload the batch again with the trialpipe client.",
    ),
}


class Disposition(StrEnum):
    """Where an uploaded file ends: exactly one of these."""

    ARCHIVED = "archived"
    QUARANTINED = "quarantined"
    DUPLICATE = "duplicate"
    # Taken out of quarantine by `trialpipe quarantine release`: the file continues as a
    # file of the batch the release created (the ledger links both), ending there as one
    # of the three above.
    RELEASED = "released"


class BatchState(StrEnum):
    """Lifecycle of a batch: done and quarantined are terminal; a failed DAG run (an
    infrastructure fault) leaves the batch to be resumed by the next run."""

    READY = "ready"
    PROCESSING = "processing"
    DONE = "done"
    QUARANTINED = "quarantined"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in (BatchState.DONE, BatchState.QUARANTINED)


def markdown_table() -> str:
    """The reason codes as the Markdown table docs/quarantine.md carries (kept in sync by a
    test; regenerate with ``python -c 'from pipeline.reasons import markdown_table as m;
    print(m())'``)."""
    lines = ["| code | scope | what happened | what the site should do |", "|---|---|---|---|"]
    for reason in Reason:
        info = reason.info
        lines.append(f"| `{reason.value}` | {info.scope.value} | {info.summary} | {info.action} |")
    return "\n".join(lines)
