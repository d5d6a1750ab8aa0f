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


def read_dicom(path: Path, stop_before_pixels: bool = False) -> ReadResult:
    """Read ``path``; on failure return the reason a site coordinator can act on."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return ReadResult(None, Reason.FILE_MISSING)
    if size == 0:
        return ReadResult(None, Reason.EMPTY_FILE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
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
