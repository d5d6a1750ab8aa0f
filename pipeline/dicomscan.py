"""Every element's values as text, read straight from a file's bytes.

The residual-PHI check reads each de-identified file as written. Parsing it with pydicom
builds a dataset and decodes each value into a typed object, which costs more than the
check itself; this scanner walks the bytes once (file meta, dataset, sequence items at any
depth, anything after the pixel data) and decodes text as pydicom decodes it. It covers the
encodings trialpipe writes: little endian, explicit or implicit VR, not deflated, text in a
single character set. For anything else it answers None and the caller uses pydicom.
tests/test_verify.py holds its answers to pydicom's over every file pydicom ships.

:func:`top_level` walks the same encodings by lengths alone, for the dry run's report:
where each top-level element lies in the bytes, nothing decoded
(tests/test_dryrun_report.py holds the report it gives to pydicom's reading).
"""

from __future__ import annotations

import mmap
import struct
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_has_tag, dictionary_VR, keyword_for_tag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, VR

# VRs: text in the dataset's character set (the other string VRs are ASCII), binary data,
# binary numbers (struct formats).
CHARSET_VRS = frozenset({"LO", "LT", "PN", "SH", "ST", "UC", "UT"})
STRING_VRS = CHARSET_VRS | {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI", "UR"}
BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW"})
NUMBER_FORMATS = {"US": "H", "SS": "h", "UL": "L", "SL": "l", "FL": "f", "FD": "d"}
NUMBER_FORMATS |= {"UV": "Q", "SV": "q"}
PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
UNDEFINED_LENGTH = 0xFFFFFFFF
_LONG = frozenset(vr.encode() for vr in EXPLICIT_VR_LENGTH_32)
_VRS = frozenset(vr.value for vr in VR if " " not in vr.value)
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_CHARSET_TAG = 0x00080005


class Unsupported(Exception):
    """The bytes use an encoding this scanner leaves to pydicom."""


def file_texts(path: Path) -> list[tuple[int, list[str]]] | None:
    """(tag, values as text) of every element of the file at ``path`` but the pixel data
    (never decoded), in file order; None when pydicom must read the file."""
    with path.open("rb") as handle:
        if path.stat().st_size < 132:
            return None
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            try:
                return _scan_file(data)
            except (Unsupported, struct.error, UnicodeDecodeError, IndexError, ValueError):
                return None


def _scan_file(data: mmap.mmap) -> list[tuple[int, list[str]]]:
    meta, position, implicit = _file_meta(data)
    found = [(tag, _texts(vr, value, "latin-1")) for tag, vr, value in meta]
    _scan(data, position, len(data), implicit, "latin-1", found)
    return found


def _file_meta(
    data: bytes | mmap.mmap,
) -> tuple[list[tuple[int, str, bytes]], int, bool]:
    """The file meta's elements (tag, VR, value), where the dataset starts and whether it
    is implicit VR; :class:`Unsupported` unless the file has a preamble and its dataset is
    little endian and not deflated."""
    if data[128:132] != b"DICM":
        raise Unsupported
    meta: list[tuple[int, str, bytes]] = []
    position, syntax = 132, None
    while position + 8 <= len(data):  # the file meta: explicit VR little endian, group 2
        (group,) = struct.unpack_from("<H", data, position)
        if group != 0x0002:
            break
        tag, vr, length, position = element_header(data, position, implicit=False)
        value = data[position : position + length]
        meta.append((tag, vr, value))
        if tag == 0x00020010:
            syntax = value.decode("latin-1").rstrip("\x00 ")
        position += length
    uid = UID(syntax or "")
    if not uid.is_transfer_syntax or uid == DeflatedExplicitVRLittleEndian:
        raise Unsupported
    if not uid.is_little_endian:
        raise Unsupported  # big endian: pydicom's job
    return meta, position, uid.is_implicit_VR


class TopLevel(NamedTuple):
    """One top-level element of a file's dataset, located in the file's bytes."""

    tag: int
    vr: str  # as encoded; for implicit VR the dictionary's ("" when it has none)
    start: int  # where the element's header starts
    value: int  # where its value starts
    end: int  # where its value ends (before a sequence or item delimiter)
    undefined: bool  # encoded with undefined length

    @property
    def is_sequence(self) -> bool:
        """A sequence (or an undefined-length UN, which pydicom reads as one)."""
        return self.tag not in PIXEL_TAGS and (self.vr == "SQ" or self.undefined)


def top_level(data: bytes) -> tuple[list[TopLevel], bool] | None:
    """The top-level elements of the dataset in ``data`` (a whole file; the file meta is
    not listed) and whether it is implicit VR; None when pydicom must read the file.

    Only lengths are followed: values are not decoded, sequences not entered except to
    find where one of undefined length ends."""
    try:
        _, position, implicit = _file_meta(data)
        found: list[TopLevel] = []
        while position + 8 <= len(data):
            start = position
            tag, vr, length, position = _raw_header(data, position, implicit)
            if length == UNDEFINED_LENGTH:
                value = position
                end, position = _undefined_end(data, position, implicit or vr == "UN")
                found.append(TopLevel(tag, vr, start, value, end, True))
                continue
            if position + length > len(data):
                raise Unsupported
            found.append(TopLevel(tag, vr, start, position, position + length, False))
            position += length
        return found, implicit
    except (Unsupported, struct.error, UnicodeDecodeError, ValueError):
        return None


def _scan(
    data: mmap.mmap,
    position: int,
    end: int,
    implicit: bool,
    codec: str,
    found: list[tuple[int, list[str]]],
) -> int:
    """Scan elements from ``position`` to ``end`` (or an item delimiter); return where the
    scan stopped."""
    while position + 8 <= end:
        tag, vr, length, position = element_header(data, position, implicit)
        if tag == _ITEM_END:
            return position
        if tag == _SEQUENCE_END:
            raise Unsupported  # a delimiter out of place
        if vr == "SQ":
            position = _items(data, position, length, end, implicit, codec, found)
            continue
        if tag in PIXEL_TAGS:
            position = _skip_pixels(data, position, length)
            continue
        if length == UNDEFINED_LENGTH or position + length > end or vr == "UN":
            raise Unsupported  # UN: pydicom may know the VR (and even find a sequence)
        value = data[position : position + length]
        position += length
        if tag == _CHARSET_TAG:
            codec = _codec(value.decode("latin-1"))
        found.append((tag, _texts(vr, value, codec)))
    return position


def _items(
    data: mmap.mmap,
    position: int,
    length: int,
    end: int,
    implicit: bool,
    codec: str,
    found: list[tuple[int, list[str]]],
) -> int:
    """Scan a sequence's items; return the position after the sequence."""
    stop = end if length == UNDEFINED_LENGTH else position + length
    while position + 8 <= stop:
        group, element, item_length = struct.unpack_from("<HHL", data, position)
        tag_value = (group << 16) | element
        position += 8
        if tag_value == _SEQUENCE_END:
            return position
        if tag_value != _ITEM:
            raise Unsupported
        item_end = stop if item_length == UNDEFINED_LENGTH else position + item_length
        position = _scan(data, position, item_end, implicit, codec, found)
    if length == UNDEFINED_LENGTH:
        raise Unsupported  # no sequence delimiter before the end
    return stop


def _raw_header(data: bytes, position: int, implicit: bool) -> tuple[int, str, int, int]:
    """Like :func:`element_header`, but an implicit VR element's VR is the dictionary's
    or "" (never :class:`Unsupported`): only its length is needed to step over it."""
    if not implicit:
        found = element_header(data, position, implicit=False)
        if found[1] not in _VRS and found[0] >> 16 != 0xFFFE:
            raise Unsupported  # not a VR: pydicom decides how to read on
        return found
    group, element, length = struct.unpack_from("<HHL", data, position)
    tag = (group << 16) | element
    return tag, _dictionary_vr(tag), length, position + 8


def _undefined_end(data: bytes, position: int, implicit: bool) -> tuple[int, int]:
    """For an undefined-length value (sequence items, or pixel data fragments) starting at
    ``position``: where it ends before its sequence delimiter, and where the delimiter
    ends. An undefined-length UN's items are implicit VR (PS3.5 6.2.2), so ``implicit``
    is the items' encoding."""
    while position + 8 <= len(data):
        group, element, length = struct.unpack_from("<HHL", data, position)
        tag = (group << 16) | element
        if tag == _SEQUENCE_END:
            return position, position + 8
        if tag != _ITEM:
            raise Unsupported
        position += 8
        if length != UNDEFINED_LENGTH:
            position += length
            continue
        while True:  # an undefined-length item: its elements, to its delimiter
            item_tag, vr, item_length, position = _raw_header(data, position, implicit)
            if item_tag == _ITEM_END:
                break
            if item_length == UNDEFINED_LENGTH:
                _, position = _undefined_end(data, position, implicit or vr == "UN")
            else:
                position += item_length
    raise Unsupported


def _skip_pixels(data: mmap.mmap, position: int, length: int) -> int:
    if length != UNDEFINED_LENGTH:
        return position + length
    return end_of_fragments(data, position)


def end_of_fragments(data: bytes | mmap.mmap | memoryview, position: int) -> int:
    """Where encapsulated pixel data, whose first item starts at ``position``, ends (after
    its sequence delimiter); :class:`Unsupported` if it is malformed."""
    while position + 8 <= len(data):
        group, element, length = struct.unpack_from("<HHL", data, position)
        position += 8
        tag = (group << 16) | element
        if tag == _SEQUENCE_END:
            return position
        if tag != _ITEM or length == UNDEFINED_LENGTH:
            raise Unsupported
        position += length
    raise Unsupported


def element_header(
    data: bytes | mmap.mmap | memoryview, position: int, implicit: bool
) -> tuple[int, str, int, int]:
    """The element whose header starts at ``position``: (tag, VR, value length, where the
    value starts); :class:`Unsupported` where only pydicom can tell the VR."""
    group, element = struct.unpack_from("<HH", data, position)
    tag = (group << 16) | element
    if group == 0xFFFE:  # item and delimiter tags carry no VR
        (length,) = struct.unpack_from("<L", data, position + 4)
        return tag, "", length, position + 8
    if implicit:
        (length,) = struct.unpack_from("<L", data, position + 4)
        return tag, _implicit_vr(tag), length, position + 8
    vr = bytes(data[position + 4 : position + 6])
    if vr in _LONG:
        (length,) = struct.unpack_from("<L", data, position + 8)
        return tag, vr.decode(), length, position + 12
    (length,) = struct.unpack_from("<H", data, position + 6)
    return tag, vr.decode("latin-1"), length, position + 8


@lru_cache(maxsize=4096)
def _dictionary_vr(tag: int) -> str:
    """The dictionary's VR of ``tag``; "" for a private or unknown element."""
    return dictionary_VR(tag) if not tag >> 16 & 1 and dictionary_has_tag(tag) else ""


@lru_cache(maxsize=4096)
def _implicit_vr(tag: int) -> str:
    vr = _dictionary_vr(tag)
    if not vr:
        raise Unsupported  # a private or unknown element: its VR is pydicom's guess
    if " or " in vr:
        raise Unsupported  # ambiguous (US or SS...): pydicom resolves it from context
    return vr


@lru_cache(maxsize=64)
def _codec(value: str) -> str:
    encodings = convert_encodings([v.strip() for v in value.split("\\")] or [""])
    if len(encodings) != 1:
        raise Unsupported  # ISO 2022 code extensions: pydicom decodes them
    return encodings[0]


def _texts(vr: str, value: bytes, codec: str) -> list[str]:
    if not value or vr in BINARY_VRS:
        return []
    if vr in NUMBER_FORMATS:
        size = struct.calcsize("<" + NUMBER_FORMATS[vr])
        numbers = struct.unpack(
            f"<{len(value) // size}{NUMBER_FORMATS[vr]}", value[: len(value) // size * size]
        )
        return [str(n) for n in numbers]
    if vr == "AT":
        pairs = struct.unpack(f"<{len(value) // 2}H", value[: len(value) // 4 * 4])
        return [f"({pairs[i]:04X},{pairs[i + 1]:04X})" for i in range(0, len(pairs), 2)]
    return split_values(value.decode(codec if vr in CHARSET_VRS else "latin-1", "replace"))


def split_values(text: str) -> list[str]:
    """A string element's decoded text as its values, as pydicom gives them: split at
    backslashes, padding stripped, empty values dropped."""
    return [v for v in (part.rstrip("\x00 ") for part in text.split("\\")) if v]


@lru_cache(maxsize=8192)
def keyword(tag: int) -> str:
    """The dictionary keyword of ``tag`` ("" for a private or unknown one)."""
    return keyword_for_tag(tag)


@lru_cache(maxsize=8192)
def tag_text(tag: int) -> str:
    """``tag`` written as DICOM writes it: "(0010,0010)"."""
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def attribute_name(tag: int) -> str:
    """How a report names an element: its keyword, or its tag when it has none."""
    return keyword(tag) or tag_text(tag)
