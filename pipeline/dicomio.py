"""Reading uploaded files as DICOM, with a reason code instead of an exception.

pydicom is told to stay quiet: its warnings quote element values, and a value can be PHI.

An upload is usually a header of a few kilobytes followed by half a megabyte of pixel data
that de-identification never changes. :func:`read_upload` parses the header only and keeps
the pixel data element as the bytes it was read from, and :func:`write_dicom` writes those
bytes back after the new header: the same file pydicom would write, without decoding,
copying and encoding the pixels on the way.
"""

from __future__ import annotations

import hashlib
import io
import logging
import struct
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
from pydicom.charset import default_encoding
from pydicom.datadict import dictionary_has_tag, dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset, FileDataset, validate_file_meta
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

from pipeline.dicomscan import (
    BINARY_VRS,
    CHARSET_VRS,
    NUMBER_FORMATS,
    PIXEL_TAGS,
    STRING_VRS,
    UNDEFINED_LENGTH,
    Unsupported,
    element_header,
    end_of_fragments,
    split_values,
)
from pipeline.reasons import Reason

pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
logging.getLogger("pydicom").setLevel(logging.CRITICAL)
warnings.filterwarnings("ignore", module=r"pydicom(\..*)?")


# What pydicom raises for an element it read but cannot decode (a corrupt VR, a value
# that does not parse) or encode again, however deep in the dataset: the error of one
# file, never of the run.
UNDECODABLE: tuple[type[Exception], ...] = (
    NotImplementedError,
    ValueError,
    LookupError,
    TypeError,
    AttributeError,
    OverflowError,
    EOFError,
    struct.error,
)

_UNKNOWN_SYNTAX = "transfer syntax not supported"


@dataclass(frozen=True)
class ReadResult:
    """A parsed file, or the reason it cannot be; ``pixels`` is the pixel data element as
    read (tag, VR, length and value), left out of ``dataset``, when :func:`read_upload`
    could keep it apart."""

    dataset: FileDataset | None
    reason: Reason | None = None
    detail: str | None = None
    pixels: memoryview | None = None
    # The dataset's top-level elements as read, before any was decoded (by a check here).
    encoded: dict[BaseTag, Any] | None = None


def read_dicom(path: Path, stop_before_pixels: bool = False) -> ReadResult:
    """Read ``path``; on failure return the reason a site coordinator can act on."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return ReadResult(None, Reason.FILE_MISSING)
    if size == 0:
        return ReadResult(None, Reason.EMPTY_FILE)
    with path.open("rb") as handle:
        return _parse(handle, size, stop_before_pixels)


def read_elements(path: Path) -> ReadResult:
    """Parse every element of a file this pipeline wrote, leaving values over 64 KiB (the
    pixel data) unread until used; no reason is given beyond "cannot be read"."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return ReadResult(pydicom.dcmread(path, defer_size=_DEFER_ABOVE))
        except Exception:
            return ReadResult(None, Reason.DEID_FAILED)


_DEFER_ABOVE = 64 * 1024


def read_upload(data: bytes, keep_pixels_apart: bool = True) -> ReadResult:
    """Parse a whole file held in memory, as :func:`read_dicom` would. With
    ``keep_pixels_apart``, when the pixel data is the file's last element, in a
    little-endian encoding that is not deflated, only the header is parsed and the pixel
    data element is returned as ``pixels`` (a view of ``data``)."""
    if not data:
        return ReadResult(None, Reason.EMPTY_FILE)
    if not keep_pixels_apart:
        return _parse(io.BytesIO(data), len(data), stop_before_pixels=False)
    header = _parse(io.BytesIO(data), len(data), stop_before_pixels=True, complete=False)
    ds = header.dataset
    if ds is not None:
        pixels = _pixel_element(ds, data, header.offset)
        if pixels is not None and not _pixels_short(ds, True, _value_length(ds, pixels)):
            return ReadResult(ds, pixels=pixels, encoded=header.encoded)
    return _parse(io.BytesIO(data), len(data), stop_before_pixels=False)


@dataclass(frozen=True)
class _Parsed(ReadResult):
    offset: int = 0  # where parsing stopped (the pixel data's tag, or the end)


def _parse(
    handle: BinaryIO,
    size: int,
    stop_before_pixels: bool,
    complete: bool = True,
) -> _Parsed:
    """``complete=False`` leaves out the checks that need the pixels: the caller checks."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(handle, stop_before_pixels=stop_before_pixels)
        except InvalidDicomError:
            if not complete:
                return _Parsed(None, Reason.NOT_DICOM)
            handle.seek(0)
            return _read_without_preamble(handle, size, stop_before_pixels)
        except (EOFError, OSError, ValueError, KeyError, IndexError, TypeError, AttributeError):
            return _Parsed(None, _broken(handle))
    if _unknown_syntax(ds):
        return _Parsed(None, Reason.UNSUPPORTED_TRANSFER_SYNTAX, _UNKNOWN_SYNTAX)
    offset, encoded = handle.tell(), dict(ds._dict)
    if not complete:
        uid = str(ds.get("SOPInstanceUID", "") or "").strip()
        if not uid:
            return _Parsed(None, Reason.MISSING_SOP_INSTANCE_UID)
        return _Parsed(ds, encoded=encoded, offset=offset)
    return _checked(ds, handle, size, stop_before_pixels, encoded)


def _read_without_preamble(handle: BinaryIO, size: int, stop_before_pixels: bool) -> _Parsed:
    # Some exporters write bare datasets with no preamble or file meta: still DICOM.
    try:
        ds = pydicom.dcmread(handle, force=True, stop_before_pixels=stop_before_pixels)
    except Exception:
        return _Parsed(None, Reason.NOT_DICOM)
    if "SOPClassUID" not in ds and "SOPInstanceUID" not in ds:
        return _Parsed(None, Reason.NOT_DICOM)
    if _unknown_syntax(ds):
        return _Parsed(None, Reason.UNSUPPORTED_TRANSFER_SYNTAX, _UNKNOWN_SYNTAX)
    return _checked(ds, handle, size, stop_before_pixels, dict(ds._dict))


def _unknown_syntax(ds: FileDataset) -> bool:
    """The file meta names a transfer syntax pydicom does not know (a vendor's private
    one): how the data set is encoded, and so how to write it again, is unknown."""
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    return syntax is not None and not UID(syntax).is_transfer_syntax


def _checked(
    ds: FileDataset,
    handle: BinaryIO,
    size: int,
    stop_before_pixels: bool,
    encoded: dict[BaseTag, Any],
) -> _Parsed:
    if not stop_before_pixels and _ends_past_file(ds, size):
        return _Parsed(None, Reason.TRUNCATED)
    try:
        uid = str(ds.get("SOPInstanceUID", "") or "").strip()
        if not stop_before_pixels and "PixelData" in ds:
            _ = ds.PixelData  # force the value to load: a cut-off file fails here
        if not stop_before_pixels and _pixels_short(ds, _has_pixels(ds), _loaded_length(ds)):
            return _Parsed(None, Reason.TRUNCATED)
    except Exception:
        return _Parsed(None, _broken(handle))
    if not uid:
        return _Parsed(None, Reason.MISSING_SOP_INSTANCE_UID)
    return _Parsed(ds, encoded=encoded)


_PIXELS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def _pixel_element(ds: FileDataset, data: bytes, offset: int) -> memoryview | None:
    """The pixel data element at ``offset`` as a view of ``data``, if it is well formed and
    the last element of the file (else None: the caller parses the whole file)."""
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is None or syntax == DeflatedExplicitVRLittleEndian or not syntax.is_little_endian:
        return None
    try:
        tag, vr, length, start = element_header(data, offset, syntax.is_implicit_VR)
        if tag not in PIXEL_TAGS or (vr not in EXPLICIT_VR_LENGTH_32 and not syntax.is_implicit_VR):
            return None
        if length == UNDEFINED_LENGTH:
            end = end_of_fragments(data, start)
        else:
            end = start + length if length % 2 == 0 else None
    except (Unsupported, struct.error):
        return None
    return memoryview(data)[offset:] if end == len(data) else None


def _value_length(ds: FileDataset, pixels: memoryview) -> int | None:
    """The declared length of a native pixel data value (None when encapsulated)."""
    header = 8 if ds.file_meta.TransferSyntaxUID.is_implicit_VR else 12
    (length,) = struct.unpack_from("<L", pixels, header - 4)
    return None if length == UNDEFINED_LENGTH else length


def _has_pixels(ds: FileDataset) -> bool:
    return any(k in ds for k in _PIXELS)


def _loaded_length(ds: FileDataset) -> int | None:
    return len(ds.PixelData) if "PixelData" in ds else None


def _ends_past_file(ds: FileDataset, size: int) -> bool:
    """The last element claims more bytes than the file has: it was cut off in transfer.

    pydicom stops quietly at the end of a cut file; the length the last element declares
    (still raw, unparsed) tells where its value was meant to end.
    """
    if not ds._dict:
        return False
    raw = ds._dict[max(ds._dict)]
    tell, length = getattr(raw, "value_tell", None), getattr(raw, "length", None)
    if tell is None or length in (None, UNDEFINED_LENGTH):
        return False
    return tell + length > size


def _pixels_short(ds: FileDataset, present: bool, length: int | None) -> bool:
    """An image cut off in transfer: an image (it has Rows and Columns) whose pixel data
    never arrived (not ``present``), or native pixel data of ``length`` bytes, shorter than
    the geometry says (``length`` None: nothing to measure)."""
    if not present:
        return "Rows" in ds and "Columns" in ds
    if length is None or getattr(ds.file_meta, "TransferSyntaxUID", None) is None:
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
    return length < expected


def _broken(handle: BinaryIO) -> Reason:
    handle.seek(0)
    head = handle.read(132)
    return Reason.TRUNCATED if head[128:132] == b"DICM" else Reason.NOT_DICOM


def write_dicom(ds: FileDataset, path: Path, pixels: memoryview | None = None) -> tuple[str, int]:
    """Write ``ds`` as a DICOM file (preamble, complete file meta) to ``path``, followed by
    ``pixels`` (a pixel data element as :func:`read_upload` kept it apart) when given;
    return the SHA-256 and the size of what was written.

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
    header = _encode(ds)
    digest = hashlib.sha256(header)
    size = len(header)
    with path.open("wb") as handle:
        handle.write(header)
        if pixels is not None:
            digest.update(pixels)
            handle.write(pixels)
            size += len(pixels)
    return digest.hexdigest(), size


def _encode(ds: FileDataset) -> bytes:
    """``ds`` as pydicom's ``save_as(enforce_file_format=True)`` writes it.

    In the usual case (little endian, not deflated, encoded and character set as read)
    the file is encoded here: elements still as read are written from their bytes, and the
    plain values (strings, names, numbers, sequences of them) are encoded as pydicom
    encodes them, at a fraction of the cost of pydicom's per-element writer. pydicom writes
    any other element, and the whole file when the case is not the usual one.
    tests/test_dicomio.py holds the result to pydicom's, byte for byte.
    """
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if (
        syntax is None
        or syntax == DeflatedExplicitVRLittleEndian
        or not syntax.is_little_endian
        or getattr(ds, "original_encoding", None) != (syntax.is_implicit_VR, True)
        or ds.original_character_set != ds._character_set
        or any(tag >> 16 in (0, 2) for tag in ds._dict)
        or len(getattr(ds, "preamble", None) or b"\x00" * 128) != 128
    ):
        buffer = DicomBytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()
    validate_file_meta(ds.file_meta, enforce_standard=True)  # completes it, as pydicom does
    meta = _elements(ds.file_meta, implicit=False, codec="latin-1", charset=default_encoding)
    ds.file_meta.FileMetaInformationGroupLength = len(meta)
    return b"".join(
        [
            getattr(ds, "preamble", None) or b"\x00" * 128,
            b"DICM",
            _element_header(0x00020000, "UL", 4, implicit=False),
            struct.pack("<L", len(meta)),
            meta,
            _elements(
                ds,
                syntax.is_implicit_VR,
                _single_codec(ds),
                ds.get("SpecificCharacterSet", default_encoding),
            ),
        ]
    )


def _elements(ds: Dataset, implicit: bool, codec: str | None, charset: Any) -> bytes:
    """The elements of ``ds`` in tag order, encoded (see :func:`_encode`)."""
    parts: list[bytes] = []
    for tag in sorted(ds._dict, key=int):  # as ints: BaseTag compares in Python, slowly
        if tag & 0xFFFF == 0 and (tag >> 16 > 6 or tag >> 16 == 2):
            continue  # retired group lengths, which pydicom does not write; the meta's own
        element = ds._dict[tag]
        if not implicit and not element.VR:
            value = None  # no VR to write: pydicom decides (or refuses)
        elif element.is_raw:
            value = None if element.length == UNDEFINED_LENGTH else element.value
        elif element.VR == "SQ":
            value = _sequence(element, implicit, charset)
        else:
            value = _value_bytes(element, codec)
        if value is None:
            buffer = DicomBytesIO()
            buffer.is_little_endian, buffer.is_implicit_VR = True, implicit
            write_data_element(buffer, ds[tag], charset)
            parts.append(buffer.getvalue())
        elif not element.is_raw and element.VR == "SQ" and element.is_undefined_length:
            parts += [_element_header(tag, "SQ", UNDEFINED_LENGTH, implicit), value]
            parts.append(_SEQUENCE_DELIMITER)
        else:
            parts += [_element_header(tag, element.VR, len(value), implicit), value]
    return b"".join(parts)


_ITEM_START = struct.pack("<HH", 0xFFFE, 0xE000)
_ITEM_DELIMITER = struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
_SEQUENCE_DELIMITER = struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)


def _sequence(element: Any, implicit: bool, charset: Any) -> bytes | None:
    """A decoded sequence's items as pydicom writes them; None when an item holds
    elements as read in another encoding (pydicom then writes the sequence)."""
    parts: list[bytes] = []
    for item in element.value:
        encoding = getattr(item, "original_encoding", (None, None))
        raw = any(e.is_raw for e in item._dict.values())
        if raw and encoding != (implicit, True):
            return None
        if any(not e.is_raw and e.VR and " or " in e.VR for e in item._dict.values()):
            return None  # an ambiguous VR, which pydicom resolves from the item
        item_charset = item.get("SpecificCharacterSet", charset)
        body = _elements(item, implicit, _single_codec(item), item_charset)
        if getattr(item, "is_undefined_length_sequence_item", False):
            parts += [_ITEM_START, struct.pack("<L", UNDEFINED_LENGTH), body, _ITEM_DELIMITER]
        else:
            parts += [_ITEM_START, struct.pack("<L", len(body)), body]
    return b"".join(parts)


def _element_header(tag: int, vr: str | None, length: int, implicit: bool) -> bytes:
    if implicit:
        return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, length)
    if vr in EXPLICIT_VR_LENGTH_32:
        return struct.pack("<HH2sHL", tag >> 16, tag & 0xFFFF, vr.encode(), 0, length)
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, str(vr).encode(), length)


_ASCII_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "TM", "UI", "UR"})


def _value_bytes(element: Any, codec: str | None) -> bytes | None:
    """A decoded element's value encoded as pydicom encodes it, for the plain cases
    (strings in one codec, person names, number strings, binary numbers); None for any
    other, which pydicom then writes."""
    vr, value = element.VR, element.value
    values = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
    if value is None or value == "" or values == []:
        return b""
    try:
        if vr in NUMBER_FORMATS:
            if not all(isinstance(v, (int, float)) for v in values):
                return None
            return struct.pack(f"<{len(values)}{NUMBER_FORMATS[vr]}", *values)
        if vr in ("DS", "IS"):
            text = "\\".join(
                v.original_string if hasattr(v, "original_string") else str(v) for v in values
            )
            data = text.encode(default_encoding)
        elif vr == "PN" and codec is not None:
            data = b"\\".join(str(v).encode(codec) for v in values)
        elif vr in _ASCII_VRS and all(type(v) is str or type(v) is UID for v in values):
            data = "\\".join(values).encode(default_encoding)
        elif vr in CHARSET_VRS and codec is not None and all(type(v) is str for v in values):
            data = b"\\".join(v.encode(codec) for v in values)
        else:
            return None
    except (UnicodeEncodeError, struct.error, OverflowError, TypeError):
        return None
    if len(data) % 2:
        data += b"\x00" if vr == "UI" else b" "
    if vr not in EXPLICIT_VR_LENGTH_32 and len(data) > 0xFFFF:
        return None  # pydicom writes such a value as UN
    return data


def walk(ds: Dataset) -> Iterator[tuple[Dataset, BaseTag, str, str | None]]:
    """Every element of ``ds`` as (the dataset holding it, its tag, its VR, the codec of
    that dataset's text or None; see :func:`texts`): the file meta first, then the dataset,
    then, in place of each sequence, its items' elements at any depth. Values stay as read:
    only sequences are decoded, to reach their items, so a caller decodes just the
    elements it needs."""
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        yield from _walk(meta)
    yield from _walk(ds)


def _walk(ds: Dataset) -> Iterator[tuple[Dataset, BaseTag, str, str | None]]:
    codec = _single_codec(ds)
    for tag in list(ds._dict):
        vr = element_vr(ds, tag)
        if vr == "SQ":
            for item in ds[tag].value or ():
                yield from _walk(item)
        else:
            yield ds, tag, vr, codec


def element_vr(holder: Dataset, tag: BaseTag) -> str:
    """The VR of element ``tag`` of ``holder`` as pydicom decodes it, without decoding it
    where the VR read (or, read without one, the public dictionary's) is plainly it. Read
    as UN (pydicom replaces UN by the dictionary's VR), private, or of undefined length
    (which may be a sequence), the element is decoded to ask pydicom."""
    element = holder._dict[tag]
    if not element.is_raw:
        return element.VR
    if element.VR is not None and element.VR != "UN":
        return element.VR
    if element.VR is None and element.length != UNDEFINED_LENGTH and dictionary_has_tag(tag):
        return dictionary_VR(tag)
    return holder[tag].VR


def texts(holder: Dataset, tag: BaseTag, vr: str, codec: str | None) -> list[str]:
    """The values of element ``tag`` of ``holder`` as text, one string per value (none for
    an empty element or binary data; the bytes of a UN element as Latin-1).

    String values are decoded straight from the bytes read when ``codec``, the Python
    codec of ``holder``'s text (as :func:`walk` gives it), is not None, as pydicom decodes
    them, without building pydicom's typed value; anything else goes through pydicom.
    """
    element = holder._dict[tag]
    if vr in BINARY_VRS:
        return []
    if vr == "UN" and element.is_raw and element.value is not None:
        return [element.value.decode("latin-1", "replace")] if element.value else []
    if element.is_raw and vr in STRING_VRS and isinstance(element.value, bytes):
        codec = codec if vr in CHARSET_VRS else "latin-1"
        if codec is not None:
            return split_values(element.value.decode(codec, "replace"))
    value = holder[tag].value
    if value is None or value == "" or isinstance(value, (bytes, bytearray)):
        return [value.decode("latin-1", "replace")] if vr == "UN" and value else []
    if isinstance(value, (list, tuple, MultiValue)):
        return [str(v) for v in value if v not in (None, "")]
    return [str(value)]


def attribute_texts(ds: Dataset) -> Callable[[str], list[str]]:
    """A reader of ``ds``'s top-level attributes by keyword, as :func:`texts` gives their
    values ([] for an absent one)."""
    codec = _single_codec(ds)

    def get(keyword: str) -> list[str]:
        tag = tag_for_keyword(keyword)
        if tag is None or tag not in ds._dict:
            return []
        return texts(ds, tag, element_vr(ds, tag), codec)

    return get


def _single_codec(holder: Dataset) -> str | None:
    """The Python codec of the dataset's text, when it is one codec (ISO 2022 code
    extensions switch codecs inside a value: pydicom decodes those)."""
    encodings = holder._character_set
    if isinstance(encodings, str):
        encodings = [encodings]
    return encodings[0] if len(encodings) == 1 else None
