"""Residual-PHI verification: after de-identification, none of the original's identifying
values may appear anywhere in the output (main dataset, sequences at any depth, file meta,
private elements). A hit names the attribute where it was found, never the value."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import UID_dictionary

from pipeline.annex_e import load_table
from pipeline.dicomio import read_elements, texts, walk
from pipeline.dicomscan import attribute_name, file_texts, keyword

# Attributes whose values identify the patient, the visit or the people and place involved.
IDENTIFYING_KEYWORDS = frozenset(
    {
        "PatientID",
        "OtherPatientIDs",
        "IssuerOfPatientID",
        "PatientBirthDate",
        "PatientBirthTime",
        "PatientAddress",
        "PatientTelephoneNumbers",
        "MedicalRecordLocator",
        "AccessionNumber",
        "StudyID",
        "RequestedProcedureID",
        "ScheduledProcedureStepID",
        "PerformedProcedureStepID",
        "AdmissionID",
        "InstitutionName",
        "InstitutionAddress",
        "InstitutionalDepartmentName",
        "StationName",
        "DeviceSerialNumber",
        "ReferringPhysicianAddress",
        "ReferringPhysicianTelephoneNumbers",
        "MilitaryRank",
        "PatientMotherBirthName",
        "PatientBirthName",
        "OtherPatientNames",
        "CountryOfResidence",
        "RegionOfResidence",
        "Occupation",
        "ServiceEpisodeID",
        "FillerOrderNumberImagingServiceRequest",
        "PlacerOrderNumberImagingServiceRequest",
    }
)
# Short values match false positives everywhere; below this length they are not searched.
MIN_LENGTH = 3
# Parts of names shorter than this only match as whole words.
WHOLE_WORD_BELOW = 6
_SKIP_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "SQ", "UN"})


@dataclass(frozen=True)
class IdentifyingValues:
    """Identifying values of original files, ready for searching.

    UIDs are looked up as whole dotted tokens in a set; the other values (names, IDs,
    dates, addresses) are compiled into one pattern when first searched. So a batch's
    thousands of original instance UIDs cost a set lookup, not a thousand-way regex.
    """

    values: frozenset[str]

    @functools.cached_property
    def uids(self) -> frozenset[str]:
        return frozenset(v for v in self.values if _UID.fullmatch(v))

    @functools.cached_property
    def pattern(self) -> re.Pattern[str] | None:
        return _compile(self.values - self.uids)

    def prepare(self) -> IdentifyingValues:
        """Compile the search now (before worker processes fork, so each inherits it)."""
        _ = self.uids, self.pattern
        return self

    def find(self, text: str) -> bool:
        if self.uids and any(token in self.uids for token in _UID.findall(text)):
            return True
        return bool(self.pattern and self.pattern.search(text))

    def scrub(self, text: str) -> str:
        """``text`` with every identifying value cut out (for the Clean Descriptors option)."""
        for token in set(_UID.findall(text)) & self.uids:
            text = text.replace(token, " ")
        if self.pattern:
            text = self.pattern.sub(" ", text)
        return " ".join(text.split())


# A UID as a token: digits and dots, at least two dots, not part of a longer number.
_UID = re.compile(r"(?<![0-9.])[0-9]+(?:\.[0-9]+){2,}(?![0-9.])")


@lru_cache(maxsize=1)
def identifying_uid_keywords() -> frozenset[str]:
    """UID attributes Table E.1-1 lists (instances, studies, series, frames of reference…).

    A UID the table does not list, such as a software's Creator Version UID, names no one.
    """
    return frozenset(r.keyword for r in load_table() if r.vr == "UI" and r.keyword)


def identifying_values(ds: Dataset, retained: frozenset[str] = frozenset()) -> IdentifyingValues:
    """Collect names (and their parts), IDs, dates, addresses and original UIDs of ``ds``.

    ``retained`` names attributes the protocol keeps on purpose (a claimed option's KEEP,
    such as the station name under Retain Device Identity); their values are not searched.
    """
    found: set[str] = set()
    uid_keywords = identifying_uid_keywords()
    for holder, tag, vr, codec in walk(ds):
        if vr in _SKIP_VRS:
            continue
        name = keyword(tag)
        if name in retained:
            continue
        if tag >> 16 == 0x0002 and name != "MediaStorageSOPInstanceUID":
            continue  # the file meta names the software that wrote the file, not the patient
        if vr == "PN":
            for name in texts(holder, tag, vr, codec):
                found.add(name)
                found.update(p for p in re.split(r"[\^= ,.]+", name) if p)
        elif vr == "UI":
            if name in uid_keywords:
                found.update(v for v in texts(holder, tag, vr, codec) if v not in UID_dictionary)
        elif vr in ("DA", "DT") or name in IDENTIFYING_KEYWORDS:
            found.update(texts(holder, tag, vr, codec))
    values = frozenset(v.strip() for v in found if len(v.strip()) >= MIN_LENGTH)
    return IdentifyingValues(values)


def _compile(values: frozenset[str]) -> re.Pattern[str] | None:
    if not values:
        return None
    parts = []
    for value in sorted(values, key=len, reverse=True):
        escaped = re.escape(value)
        parts.append(
            rf"(?<![A-Za-z0-9]){escaped}(?![A-Za-z0-9])"
            if len(value) < WHOLE_WORD_BELOW
            else escaped
        )
    return re.compile("|".join(parts), re.IGNORECASE)


def residual_phi(original: IdentifyingValues, output: Dataset) -> list[str]:
    """Attributes of ``output`` that still hold an identifying value of its original.

    Returns attribute keywords (or tags for private and unknown elements), never values.
    """
    return _hits(
        original,
        [
            (tag, texts(h, tag, vr, codec))
            for h, tag, vr, codec in walk(output)
            if tag != 0x7FE00010
        ],
    )


def residual_phi_in_file(original: IdentifyingValues, path: Path) -> list[str] | None:
    """:func:`residual_phi` of the file at ``path`` as written, read straight from its
    bytes (pydicom parses it when the scanner cannot); None when it cannot be read."""
    found = file_texts(path)
    if found is not None:
        return _hits(original, found)
    output = read_elements(path).dataset
    return None if output is None else residual_phi(original, output)


def _hits(original: IdentifyingValues, found: list[tuple[int, list[str]]]) -> list[str]:
    # One search over every value (joined by a character no value holds and no pattern
    # can match across) answers for the clean file; only a hit is looked up per element.
    if not original.find("\x00".join(text for _, values in found for text in values)):
        return []
    hits: list[str] = []
    for tag, values in found:
        if any(original.find(text) for text in values):
            name = attribute_name(tag)
            if name not in hits:
                hits.append(name)
    return hits
