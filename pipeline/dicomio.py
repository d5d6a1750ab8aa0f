"""Reading uploaded files as DICOM, with a reason code instead of an exception.

pydicom is told to stay quiet: its warnings quote element values, and a value can be PHI.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import FileDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from pipeline.reasons import Reason

pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
logging.getLogger("pydicom").setLevel(logging.CRITICAL)
warnings.filterwarnings("ignore", module=r"pydicom(\..*)?")


@dataclass(frozen=True)
class ReadResult:
    dataset: FileDataset | None
    reason: Reason | None = None
    detail: str | None = None


def read_dicom(
    path: Path, stop_before_pixels: bool = False, defer_size: int | None = None
) -> ReadResult:
    """Read ``path``; on failure return the reason a site coordinator can act on. Values
    larger than ``defer_size`` bytes are read only when used."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return ReadResult(None, Reason.FILE_MISSING)
    if size == 0:
        return ReadResult(None, Reason.EMPTY_FILE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, defer_size=defer_size)
        except InvalidDicomError:
            return _read_without_preamble(path, stop_before_pixels)
        except (EOFError, OSError, ValueError, KeyError, IndexError, TypeError, AttributeError):
            return ReadResult(None, _broken(path))
    return _checked(ds, path, stop_before_pixels)


def _read_without_preamble(path: Path, stop_before_pixels: bool) -> ReadResult:
    # Some exporters write bare datasets with no preamble or file meta: still DICOM.
    try:
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=stop_before_pixels)
    except Exception:
        return ReadResult(None, Reason.NOT_DICOM)
    if "SOPClassUID" not in ds and "SOPInstanceUID" not in ds:
        return ReadResult(None, Reason.NOT_DICOM)
    return _checked(ds, path, stop_before_pixels)


def _checked(ds: FileDataset, path: Path, stop_before_pixels: bool) -> ReadResult:
    if not stop_before_pixels and _ends_past_file(ds, path):
        return ReadResult(None, Reason.TRUNCATED)
    try:
        uid = str(ds.get("SOPInstanceUID", "") or "").strip()
        if not stop_before_pixels and "PixelData" in ds:
            _ = ds.PixelData  # force the value to load: a cut-off file fails here
        if not stop_before_pixels and _pixels_short(ds):
            return ReadResult(None, Reason.TRUNCATED)
    except Exception:
        return ReadResult(None, _broken(path))
    if not uid:
        return ReadResult(None, Reason.MISSING_SOP_INSTANCE_UID)
    return ReadResult(ds)


_PIXELS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_UNDEFINED_LENGTH = 0xFFFFFFFF


def _ends_past_file(ds: FileDataset, path: Path) -> bool:
    """The last element claims more bytes than the file has: it was cut off in transfer.

    pydicom stops quietly at the end of a cut file; the length the last element declares
    (still raw, unparsed) tells where its value was meant to end.
    """
    if not ds._dict:
        return False
    raw = ds._dict[max(ds._dict)]
    tell, length = getattr(raw, "value_tell", None), getattr(raw, "length", None)
    if tell is None or length in (None, _UNDEFINED_LENGTH):
        return False
    return tell + length > path.stat().st_size


def _pixels_short(ds: FileDataset) -> bool:
    """An image cut off in transfer: native pixel data shorter than the geometry says, or
    an image (it has Rows and Columns) whose pixel data never arrived."""
    if not any(k in ds for k in _PIXELS):
        return "Rows" in ds and "Columns" in ds
    if "PixelData" not in ds or getattr(ds.file_meta, "TransferSyntaxUID", None) is None:
        return False
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        return False
    try:
        expected = (
            int(ds.Rows)
            * int(ds.Columns)
            * int(ds.get("SamplesPerPixel", 1))
            * int(ds.get("NumberOfFrames", 1) or 1)
            * int(ds.BitsAllocated)
        ) // 8
    except (AttributeError, TypeError, ValueError):
        return False
    return len(ds.PixelData) < expected


def _broken(path: Path) -> Reason:
    with path.open("rb") as handle:
        head = handle.read(132)
    return Reason.TRUNCATED if head[128:132] == b"DICM" else Reason.NOT_DICOM


def write_dicom(ds: FileDataset, path: Path) -> None:
    """Write ``ds`` as a DICOM file (preamble, complete file meta) to ``path``.

    A bare dataset read without file meta gets one that states how it was encoded, and a
    deflated dataset is written inflated (Explicit VR Little Endian): lossless, and readable
    by every checker and viewer.
    """
    meta = ds.file_meta
    if "TransferSyntaxUID" not in meta:
        implicit, little = getattr(ds, "original_encoding", (True, True))
        meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian
            if implicit
            else ExplicitVRLittleEndian
            if little
            else ExplicitVRBigEndian
        )
    elif meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if "SOPClassUID" in ds:
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
