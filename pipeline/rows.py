"""Rows of the Parquet tables, built from de-identified datasets and a batch's worklist.

Only attributes read from the de-identified output reach a row; acquisition parameters are
typed numbers (``None`` when absent or unreadable), never free text from the original.
Every row of every table is built here: the instances, series and qc_findings rows by the
write_tables task, the batches row by finalize.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset

from pipeline.dicomio import attribute_texts
from pipeline.reasons import Disposition
from pipeline.worklist import Worklist

if TYPE_CHECKING:
    from pipeline.ledger import FileRecord
    from pipeline.protocol import Protocol


def _values(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return list(value)
    return [value]


def _float(value: Any, index: int = 0) -> float | None:
    values = _values(value)
    if len(values) <= index or values[index] in (None, ""):
        return None
    try:
        number = float(values[index])
    except (TypeError, ValueError):
        return None
    return number if number == number else None  # NaN is no value


def _floats(value: Any) -> list[float] | None:
    numbers = [_float(value, i) for i in range(len(_values(value)))]
    return numbers if numbers and all(n is not None for n in numbers) else None  # type: ignore[return-value]


def _int(value: Any) -> int | None:
    number = _float(value)
    return int(number) if number is not None else None


def _date(value: Any) -> dt.date | None:
    values = _values(value)
    text = str(values[0] if values else "").strip()
    try:
        return dt.date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return None


def _first(values: list[str]) -> str:
    return values[0] if values else ""


def _text(value: Any) -> str | None:
    text = "\\".join(str(v).strip() for v in _values(value)).strip("\\ ")
    return text or None


def instance_row(ds: Dataset, anchor: dt.date, has_pixels: bool) -> dict[str, Any]:
    """The per-image columns of the instances table, from a de-identified dataset whose
    file ``has_pixels`` (they may be kept apart from ``ds``: see
    :func:`pipeline.dicomio.read_upload`)."""
    get = attribute_texts(ds)
    study_date = _date(get("StudyDate"))
    meta = getattr(ds, "file_meta", None)
    return {
        "study_uid": _first(get("StudyInstanceUID")),
        "series_uid": _first(get("SeriesInstanceUID")),
        "sop_instance_uid": _first(get("SOPInstanceUID")),
        "sop_class_uid": _text(get("SOPClassUID")),
        "transfer_syntax_uid": _text(meta.get("TransferSyntaxUID")) if meta else None,
        "modality": _text(get("Modality")),
        "body_part": _text(get("BodyPartExamined")),
        "study_date": study_date,
        "series_date": _date(get("SeriesDate")),
        "study_day": (study_date - anchor).days if study_date else None,
        "series_number": _int(get("SeriesNumber")),
        "instance_number": _int(get("InstanceNumber")),
        "manufacturer": _text(get("Manufacturer")),
        "model": _text(get("ManufacturerModelName")),
        "rows": _int(get("Rows")),
        "columns": _int(get("Columns")),
        "frames": _int(get("NumberOfFrames")) or (1 if has_pixels else None),
        "bits_allocated": _int(get("BitsAllocated")),
        "pixel_spacing_row_mm": _float(get("PixelSpacing"), 0),
        "pixel_spacing_col_mm": _float(get("PixelSpacing"), 1),
        "slice_thickness_mm": _float(get("SliceThickness")),
        "spacing_between_slices_mm": _float(get("SpacingBetweenSlices")),
        "kvp": _float(get("KVP")),
        "exposure_mas": _float(get("Exposure")),
        "tube_current_ma": _float(get("XRayTubeCurrent")),
        "convolution_kernel": _text(get("ConvolutionKernel")),
        "magnetic_field_strength_t": _float(get("MagneticFieldStrength")),
        "repetition_time_ms": _float(get("RepetitionTime")),
        "echo_time_ms": _float(get("EchoTime")),
        "flip_angle_deg": _float(get("FlipAngle")),
        "image_position_mm": _floats(get("ImagePositionPatient")),
        "image_orientation": _floats(get("ImageOrientationPatient")),
        "slice_location_mm": _float(get("SliceLocation")),
    }


def tag_values(ds: Dataset, keywords: frozenset[str]) -> dict[str, Any]:
    """The values of ``keywords`` present in ``ds``, as JSON text (a list for a multi-valued
    attribute; None for an empty one): what validation compares, kept in the worklist
    between tasks."""
    get = attribute_texts(ds)
    found: dict[str, Any] = {}
    for keyword in sorted(keywords):
        if keyword in ds:
            values = get(keyword)
            found[keyword] = None if not values else values if len(values) > 1 else values[0]
    return found


# Series columns that take the value most of the series' instances share.
_SERIES_SHARED = (
    "modality",
    "sop_class_uid",
    "body_part",
    "series_number",
    "study_date",
    "study_day",
    "manufacturer",
    "model",
    "rows",
    "columns",
    "pixel_spacing_row_mm",
    "pixel_spacing_col_mm",
    "slice_thickness_mm",
    "spacing_between_slices_mm",
    "kvp",
    "exposure_mas",
    "tube_current_ma",
    "convolution_kernel",
    "magnetic_field_strength_t",
    "repetition_time_ms",
    "echo_time_ms",
    "flip_angle_deg",
)
_CARRIED = ("batch_id", "subject_id", "arm", "visit", "recipe_version", "code_version")


def _most_common(values: list[Any]) -> Any:
    present = [v for v in values if v is not None]
    if not present:
        return None
    counts = Counter(present)
    # Ties go to the smallest value so the result does not depend on file order.
    best = max(counts.values())
    return min(v for v, n in counts.items() if n == best)


def series_rows(instances: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per series of a batch's instance rows: counts, bytes, shared parameters
    and the coverage along the slice axis (max - min slice position)."""
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in instances:
        grouped.setdefault((row["study_uid"], row["series_uid"]), []).append(row)
    result = []
    for (study_uid, series_uid), members in sorted(grouped.items()):
        positions = [
            r["image_position_mm"][2]
            for r in members
            if r.get("image_position_mm") and len(r["image_position_mm"]) == 3
        ]
        result.append(
            {
                **{key: members[0].get(key) for key in _CARRIED},
                "study_uid": study_uid,
                "series_uid": series_uid,
                **{key: _most_common([r.get(key) for r in members]) for key in _SERIES_SHARED},
                "instances": len(members),
                "total_bytes": sum(int(r.get("file_size_bytes") or 0) for r in members),
                "coverage_mm": (max(positions) - min(positions)) if positions else None,
            }
        )
    return result


def _identity(worklist: Worklist) -> dict[str, Any]:
    return {
        "batch_id": worklist.batch_id,
        "subject_id": worklist.subject_id,
        "arm": worklist.arm,
        "visit": worklist.visit,
    }


def instance_rows(worklist: Worklist, versions: dict[str, str]) -> list[dict[str, Any]]:
    """The instances rows of a batch: each file still heading for the archive, with the
    header columns deidentify took (``entry.row``), its archived size, checksum and path
    (``archive_path`` set), and ``versions`` (recipe_version, code_version)."""
    identity = _identity(worklist)
    return [
        {
            **(entry.row or {}),
            **identity,
            "file_size_bytes": entry.size_out,
            "sha256": entry.sha256_out,
            "archive_path": entry.archive_path,
            **versions,
        }
        for entry in worklist.in_play()
    ]


def finding_rows(worklist: Worklist, versions: dict[str, str]) -> list[dict[str, Any]]:
    """The qc_findings rows of a batch: every finding validate recorded on a file (none
    when the whole batch was refused: its files were never judged on their own). The
    finding's ``detail`` goes to the ledger, not the table."""
    identity = _identity(worklist)
    return [
        {
            **identity,
            **{key: value for key, value in finding.items() if key != "detail"},
            "file_no": entry.file_no,
            "sop_instance_uid": entry.sop_uid,
            "series_uid": entry.series_uid,
            **versions,
        }
        for entry in worklist.files
        if not worklist.batch_reason
        for finding in entry.findings
    ]


def trusted(worklist: Worklist, protocol: Protocol | None) -> bool:
    """Whether the batch's protocol and site may be written: a known protocol, one of its
    sites (a batch refused at claim may carry anything a site typed)."""
    return protocol is not None and worklist.site_id in protocol.sites


def batch_row(
    worklist: Worklist,
    protocol: Protocol | None,
    state: str,
    records: list[FileRecord],
    times: dict[str, dt.datetime | None],
    code_version: str,
) -> dict[str, Any]:
    """The batches row of a finalized batch. ``protocol`` is None when the batch names no
    known protocol; identity values are kept only once trusted (a batch refused at claim
    may carry anything a site typed). ``times``: uploaded_at, claimed_at, finished_at, as
    the ledger first recorded them, so rewriting the row gives the same row."""
    known = trusted(worklist, protocol)
    enrolled = worklist.arm is not None
    claimed, finished = times.get("claimed_at"), times.get("finished_at")
    by = {d: [r for r in records if r.disposition == d] for d in Disposition}
    return {
        "batch_id": worklist.batch_id,
        "subject_id": worklist.subject_id if enrolled else None,
        "arm": worklist.arm if enrolled else None,
        "visit": worklist.visit if known and worklist.visit in protocol.visit_ids else None,
        "state": state,
        "reason": worklist.batch_reason,
        "files": len(records),
        "archived": len(by[Disposition.ARCHIVED]),
        "quarantined": len(by[Disposition.QUARANTINED]),
        "released": len(by[Disposition.RELEASED]),
        "duplicates": len(by[Disposition.DUPLICATE]),
        "flagged": sum(1 for r in by[Disposition.ARCHIVED] if r.detail),
        "bytes_uploaded": sum(int(r.size or 0) for r in records),
        "bytes_archived": sum(
            int(e.size_out or 0) for e in worklist.files if e.in_play and not worklist.batch_reason
        ),
        "uploaded_at": times.get("uploaded_at"),
        "claimed_at": claimed,
        "finished_at": finished,
        "processing_seconds": (finished - claimed).total_seconds()
        if claimed and finished
        else None,
        "qc_report": worklist.qc_report,
        "recipe_version": protocol.recipe_version if protocol else None,
        "code_version": code_version,
    }
