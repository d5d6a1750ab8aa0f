"""De-identification of one file with the protocol's composed recipe, applied by deid.

A :class:`Deidentifier` is built once per batch (recipe parsed once, secret read once) and
applied to each file. deid does the recipe's work; this module supplies the functions and
variables the recipe names (keyed UIDs, shifted dates, cleaned descriptions, trial IDs) and
stamps what was done (PS3.3 C.7.1.3 De-identification Method Code Sequence, CID 7050).
"""

from __future__ import annotations

import datetime as dt
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import yaml
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID_dictionary

from pipeline import __version__, pseudonyms
from pipeline.annex_e import option_codes
from pipeline.dicomio import element_vr
from pipeline.enrollment import Enrollee
from pipeline.fastdeid import CompiledRecipe
from pipeline.home import DataHome, recipes_dir
from pipeline.protocol import Protocol, SafePrivate
from pipeline.recipe import ComposedRecipe, compose
from pipeline.verify import IdentifyingValues, identifying_values

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import deid.dicom  # noqa: F401 - importing it sets deid's logger level, reset below
    from deid.config import DeidRecipe
    from deid.dicom.fields import _get_fields_inner
    from deid.dicom.parser import DicomParser
    from deid.dicom.pixels import clean_pixel_data, has_burned_pixels
    from deid.logger import bot

# deid logs to stdout and keeps every message in memory; some messages quote values.
bot.level = 0

PROFILE_CODE = ("113100", "Basic Application Confidentiality Profile")
CLEAN_PIXEL_CODE = ("113101", "Clean Pixel Data Option")
# Dummy values (Table E.1-1 "D"): valid for their VR, identifying no one.
DUMMIES = {
    "DA": "19000101",
    "DT": "19000101000000",
    "TM": "000000",
    "AS": "000D",
    "IS": "0",
    "DS": "0",
    "US": 0,
    "SS": 0,
    "UL": 0,
    "SL": 0,
    "FL": 0.0,
    "FD": 0.0,
}
DUMMY_TEXT = "REMOVED"
# What a recipe may name with func: and var: (trialpipe supplies exactly these; deid would
# silently leave the original value in place for any other name).
RECIPE_FUNCTIONS = frozenset({"uid", "shift_date", "clean_text", "dummy"})
RECIPE_VARIABLES = frozenset(
    {
        "subject_id",
        "site_id",
        "visit",
        "visit_description",
        "protocol_id",
        "protocol_name",
        "sponsor",
    }
)
CROSSWALK_KINDS = {
    "StudyInstanceUID": "study",
    "SeriesInstanceUID": "series",
    "SOPInstanceUID": "instance",
}


class DeidentificationError(RuntimeError):
    """The recipe could not be applied to a file (the message holds no values)."""


class BurnedInAnnotationError(DeidentificationError):
    """The pixels may carry identifying text and cannot be cleaned by a defined region."""


@lru_cache(maxsize=1)
def burned_in_policy() -> tuple[frozenset[str], frozenset[str]]:
    """Modalities and SOP classes at risk of burned-in text (``recipes/base/burned_in.yaml``)."""
    raw = yaml.safe_load((recipes_dir() / "base" / "burned_in.yaml").read_text())
    return frozenset(raw["modalities"]), frozenset(str(u) for u in raw["sop_classes"])


def burned_in_risk(ds: Dataset) -> bool:
    """Whether the file may show identifying text in its pixels."""
    modalities, sop_classes = burned_in_policy()
    return (
        str(ds.get("BurnedInAnnotation", "")).upper() == "YES"
        or str(ds.get("Modality", "")) in modalities
        or str(ds.get("SOPClassUID", "")) in sop_classes
    )


@dataclass
class Outcome:
    """What de-identifying one file produced: pseudonyms and crosswalk entries."""

    study_uid: str
    series_uid: str
    sop_uid: str
    crosswalk: dict[tuple[str, str], str] = field(default_factory=dict)
    cleaned_pixels: bool = False
    # The original's identifying values, for the verify step (never leaves the boundary).
    identifying: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Subject:
    """The trial subject a batch belongs to, and the visit."""

    enrollee: Enrollee
    visit: str


class Deidentifier:
    """Applies one protocol's recipe for one subject and visit; build once per batch."""

    def __init__(self, home: DataHome, protocol: Protocol, subject: Subject) -> None:
        self.protocol = protocol
        self.subject = subject
        self.key = pseudonyms.trial_secret(home, protocol.protocol_id)
        self.composed: ComposedRecipe = compose(protocol.recipe_files)
        self.recipe = DeidRecipe(str(self.composed.path))
        # deid's actions by lookup (same result, a fraction of the time); deid's parser
        # for any recipe the compiled form does not cover.
        self.compiled = CompiledRecipe(self.recipe)
        self._stamps: dict[tuple[bool, bool], RawDataElement] = {}
        self.offset = pseudonyms.date_offset_days(
            subject.enrollee.randomization_date, protocol.date_anchor
        )
        visit = next((v for v in protocol.visits if v.visit_id == subject.visit), None)
        self.variables = {
            "subject_id": subject.enrollee.subject_id,
            "site_id": subject.enrollee.site_id,
            "visit": subject.visit,
            "visit_description": f"{subject.visit} (day {visit.day})" if visit else subject.visit,
            "protocol_id": protocol.protocol_id,
            "protocol_name": protocol.name[:64],
            "sponsor": protocol.sponsor[:64],
        }

    def map_uid(self, original: str) -> str:
        """The pseudonym of a UID (registered DICOM UIDs are not identifiers: kept)."""
        text = str(original).strip()
        if not text or text in UID_dictionary:
            return text
        return pseudonyms.pseudonymous_uid(self.key, self.protocol.uid_root, text)

    def shift_date(self, value: str) -> str:
        """A DA or DT value moved by the subject's offset; anything unparseable is emptied."""
        text = str(value).strip()
        if len(text) < 8 or not text[:8].isdigit():
            return ""
        try:
            day = dt.date(int(text[:4]), int(text[4:6]), int(text[6:8]))
        except ValueError:
            return ""
        return (day + dt.timedelta(days=self.offset)).strftime("%Y%m%d") + text[8:]

    def apply(self, ds: FileDataset, encoded: Mapping[BaseTag, Any] | None = None) -> Outcome:
        """De-identify ``ds`` in place; raise :class:`DeidentificationError` on failure.

        ``encoded`` holds ``ds``'s elements as read, before any was decoded
        (:attr:`pipeline.dicomio.ReadResult.encoded`): the elements de-identification
        leaves unchanged are written back as those bytes."""
        as_read = _AsRead(ds, encoded)
        original = identifying_values(ds, self.composed.kept)
        as_read.decoded(ds)
        outcome = Outcome("", "", "", identifying=original.values)
        patient_id = str(ds.get("PatientID", "") or "").strip()
        if patient_id:
            outcome.crosswalk[("subject", patient_id)] = self.subject.enrollee.subject_id
        if burned_in_risk(ds):
            self._clean_pixels(ds)
            outcome.cleaned_pixels = True
        remove_structural(ds, self.protocol.safe_private)
        lookup = {**self.variables, **self._functions(original, outcome)}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if self.compiled.supported:
                    self.compiled.apply(ds, lookup)
                    result = ds
                else:
                    parser = DicomParser(ds, recipe=self.recipe)
                    parser.lookup.update(lookup)
                    parser.parse(remove_private=False)
                    result = parser.dicom
        except Exception as error:
            raise DeidentificationError(f"recipe failed ({type(error).__name__})") from None
        finally:
            _get_fields_inner.cache_clear()
            bot.history.clear()
        self._stamp(result, outcome.cleaned_pixels)
        as_read.restore(result)
        outcome.study_uid = str(result.get("StudyInstanceUID", ""))
        outcome.series_uid = str(result.get("SeriesInstanceUID", ""))
        outcome.sop_uid = str(result.get("SOPInstanceUID", ""))
        return outcome

    def _functions(self, original: IdentifyingValues, outcome: Outcome) -> dict[str, Callable]:
        def uid(item: Any, value: Any, field: Any, dicom: Any = None, **_: Any) -> Any:
            element = field.element
            if element.tag.group == 0x0002 and element.keyword != "MediaStorageSOPInstanceUID":
                return element.value
            kind = CROSSWALK_KINDS.get(element.keyword)
            return _each(element.value, lambda v: self._record(outcome, kind, v))

        def shift_date(item: Any, value: Any, field: Any, dicom: Any = None, **_: Any) -> Any:
            return _each(field.element.value, self.shift_date)

        def clean_text(item: Any, value: Any, field: Any, dicom: Any = None, **_: Any) -> Any:
            # Text made only of identifying values would end empty: a Type 1 label must
            # keep a value, so it says what happened instead.
            return _each(
                field.element.value,
                lambda v: original.scrub(str(v)) or (DUMMY_TEXT if str(v) else ""),
            )

        def dummy(item: Any, value: Any, field: Any, dicom: Any = None, **_: Any) -> Any:
            return DUMMIES.get(field.element.VR, DUMMY_TEXT)

        return {"uid": uid, "shift_date": shift_date, "clean_text": clean_text, "dummy": dummy}

    def _record(self, outcome: Outcome, kind: str | None, value: str) -> str:
        new = self.map_uid(value)
        if kind and new != value:
            outcome.crosswalk[(kind, str(value).strip())] = new
        return new

    def _clean_pixels(self, ds: Dataset) -> None:
        """Blank the regions the recipe's %filter defines for this image (deid's coordinates),
        or refuse the file: an image at risk is never archived as it is."""
        if "PixelData" not in ds:
            raise BurnedInAnnotationError("no pixels to clean (a document or a report)")
        syntax = ds.file_meta.get("TransferSyntaxUID")
        if syntax is not None and syntax.is_compressed:
            raise BurnedInAnnotationError("compressed pixels cannot be cleaned in place")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found = has_burned_pixels(ds, deid=self.recipe)
            regions = [c for r in found.get("results", []) for c in r.get("coordinates", [])]
            if not found.get("flagged") or not regions:
                raise BurnedInAnnotationError("no cleaning region defined for this image")
            try:
                cleaned = clean_pixel_data(ds, found)
            except Exception as error:  # deid/numpy raise anything here
                raise BurnedInAnnotationError(f"cleaning failed ({type(error).__name__})") from None
        ds.PixelData = cleaned.astype(ds.pixel_array.dtype).tobytes()
        ds.BurnedInAnnotation = "NO"

    def _stamp(self, ds: Dataset, cleaned_pixels: bool = False) -> None:
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = (
            f"trialpipe {__version__} {self.protocol.recipe_version}; PS3.15 E.1-1"
        )[:64]
        encoding = getattr(ds, "original_encoding", None)
        if encoding in ((True, True), (False, True)):
            # The same sequence for every file of the batch: encoded once, and each file
            # gets it as read (an immutable element, written back as its bytes).
            ds._dict[_METHOD_CODES] = self._method_codes(encoding[0], cleaned_pixels)
        else:
            ds.DeidentificationMethodCodeSequence = self._method_code_items(cleaned_pixels)
        meta = ds.file_meta
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        for keyword in (
            "SourceApplicationEntityTitle",
            "SendingApplicationEntityTitle",
            "ReceivingApplicationEntityTitle",
            "PrivateInformationCreatorUID",
            "PrivateInformation",
        ):
            if keyword in meta:
                delattr(meta, keyword)

    def _method_code_items(self, cleaned_pixels: bool) -> Sequence:
        """De-identification Method Code Sequence: the profile and every claimed option."""
        codes = option_codes()
        claimed = [codes[o] for o in self.protocol.options]
        if cleaned_pixels:
            claimed.append(CLEAN_PIXEL_CODE)
        items = []
        for code, meaning in [PROFILE_CODE, *claimed]:
            item = Dataset()
            item.CodeValue = code
            item.CodingSchemeDesignator = "DCM"
            item.CodeMeaning = meaning
            items.append(item)
        return Sequence(items)

    def _method_codes(self, implicit: bool, cleaned_pixels: bool) -> RawDataElement:
        """:meth:`_method_code_items` encoded little endian, as pydicom reads it back."""
        found = self._stamps.get((implicit, cleaned_pixels))
        if found is not None:
            return found
        holder = Dataset()
        holder.DeidentificationMethodCodeSequence = self._method_code_items(cleaned_pixels)
        buffer = DicomBytesIO()
        buffer.is_little_endian, buffer.is_implicit_VR = True, implicit
        write_dataset(buffer, holder)
        buffer.seek(0)
        read = read_dataset(buffer, implicit, True)
        found = self._stamps[(implicit, cleaned_pixels)] = read._dict[_METHOD_CODES]
        return found


_METHOD_CODES = Tag(0x00120064)  # De-identification Method Code Sequence


class _AsRead:
    """A dataset's top-level elements as read, still encoded, so that those
    de-identification leaves unchanged are written back as the same bytes.

    Writing a decoded element means encoding it again, which costs several times writing
    the bytes it was read from, and most of a header comes through unchanged. Sequences are
    never put back (their items are de-identified one by one), and nothing is when the
    character set changed, since the bytes were decoded under it.
    """

    def __init__(self, ds: Dataset, encoded: Mapping[BaseTag, Any] | None = None) -> None:
        self.encoded = dict(ds._dict) if encoded is None else encoded
        self.values: dict[Any, tuple[Any, Any]] = {}
        self.charset: Any = None

    def decoded(self, ds: Dataset) -> None:
        """Note the value of each element decoded so far (call before any is changed)."""
        for tag, element in ds._dict.items():
            if isinstance(self.encoded.get(tag), RawDataElement) and element.VR != "SQ":
                self.values[tag] = (element, _copy(element.value))
        self.charset = _copy(ds.get("SpecificCharacterSet"))

    def restore(self, ds: Dataset) -> None:
        """Put the bytes as read back for every element whose value is unchanged."""
        if _copy(ds.get("SpecificCharacterSet")) != self.charset:
            return
        for tag, (element, value) in self.values.items():
            # pydicom assigns a new value to the same element object: compare values.
            if ds._dict.get(tag) is element and _copy(element.value) == value:
                ds._dict[tag] = self.encoded[tag]


def _copy(value: Any) -> Any:
    return list(value) if isinstance(value, MultiValue) else value


def remove_structural(ds: Dataset, safe: tuple[SafePrivate, ...] = ()) -> None:
    """Remove what the profile removes by tag range, not by attribute: private elements
    (Table E.1-1 "Private attributes": X) except those a claimed Retain Safe Private lists,
    curve groups (50xx) and overlay groups (60xx, whose Overlay Data and Comments are X;
    the rest of a plane is useless without them). Recurses into sequence items."""
    keep = _safe_private_tags(ds, safe)
    for tag in list(ds._dict):
        if (tag.is_private and tag not in keep) or _repeating_group(tag.group):
            del ds[tag]
    for tag in list(ds._dict):
        if element_vr(ds, tag) == "SQ":
            for item in ds[tag].value or ():
                remove_structural(item, safe)


def _safe_private_tags(ds: Dataset, safe: tuple[SafePrivate, ...]) -> set[int]:
    """Tags of the safe-listed private elements present in ``ds`` and their creators."""
    keep: set[int] = set()
    for rule in safe:
        creators = [t for t in ds._dict if t.group == rule.group and 0x10 <= t.element <= 0xFF]
        for creator_tag in creators:
            if str(ds[creator_tag].value).strip() != rule.creator:
                continue
            block_number = creator_tag.element
            listed = {Tag(rule.group, (block_number << 8) | e) for e in rule.elements}
            present = {t for t in listed if t in ds}
            if present:
                keep |= present | {creator_tag}
    return keep


def _repeating_group(group: int) -> bool:
    return group % 2 == 0 and (0x5000 <= group <= 0x501E or 0x6000 <= group <= 0x601E)


def _each(value: Any, transform: Callable[[str], str]) -> Any:
    if isinstance(value, (list, tuple, MultiValue)):
        return [transform(v) for v in value]
    return transform(value)
