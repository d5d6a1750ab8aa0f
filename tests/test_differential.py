"""trialpipe's own code around deid must not change what the recipe does: for the same
composed recipe, functions and variables, the result equals deid's own DicomParser run with
``remove_private=True``, apart from what trialpipe adds on purpose (the de-identification
stamps, the file meta it completes, the curve and overlay groups it removes)."""

import datetime as dt

import pytest

from pipeline.deidentify import Deidentifier, Outcome, Subject, burned_in_risk
from pipeline.dicomio import read_dicom, read_upload
from pipeline.enrollment import Enrollee
from pipeline.verify import identifying_values
from tests.test_conformance import READABLE

SUBJECT = Subject(Enrollee("DEMO-01-00004", "SITE-01", "B", dt.date(2023, 9, 4)), "WEEK24")
STAMPED = {0x00120062, 0x00120063, 0x00120064, 0x00280301}
PIXEL_TAGS = (0x7FE00008, 0x7FE00009, 0x7FE00010)


def _content(ds, prefix=()):
    """(path, tag, value) of every element outside the stamps and repeating groups."""
    found = set()
    for element in ds:
        group = element.tag.group
        if int(element.tag) in STAMPED or (
            0x5000 <= group <= 0x60FF and group % 2 == 0 and (group <= 0x501E or group >= 0x6000)
        ):
            continue
        if element.VR == "SQ":
            for number, item in enumerate(element.value):
                found |= _content(item, (*prefix, int(element.tag), number))
        else:
            found.add((prefix, int(element.tag), repr(element.value)))
    return found


@pytest.mark.parametrize(
    "source",
    [p for p in READABLE if not burned_in_risk(read_dicom(p).dataset)],
    ids=lambda p: p.name,
)
def test_trialpipe_equals_deid_for_the_same_recipe(source, home, protocol):
    from deid.dicom.parser import DicomParser

    deidentifier = Deidentifier(home, protocol, SUBJECT)
    assert deidentifier.compiled.supported  # the compiled fast path is what is compared
    ours = read_dicom(source).dataset
    deidentifier.apply(ours)
    # The deidentify task's way: the header alone parsed from memory, the pixels kept apart.
    upload = read_upload(source.read_bytes())
    deidentifier.apply(upload.dataset, upload.encoded)

    theirs = read_dicom(source).dataset
    original = identifying_values(theirs, deidentifier.composed.kept)
    parser = DicomParser(theirs, recipe=deidentifier.recipe)
    parser.lookup.update(deidentifier.variables)
    parser.lookup.update(deidentifier._functions(original, Outcome("", "", "")))
    parser.parse(remove_private=True)

    assert _content(ours) == _content(parser.dicom)
    assert ours.file_meta.MediaStorageSOPInstanceUID == parser.dicom.SOPInstanceUID
    kept_apart = {int(t) for t in PIXEL_TAGS} if upload.pixels is not None else set()
    assert _content(upload.dataset) == {c for c in _content(parser.dicom) if c[1] not in kept_apart}


def test_a_recipe_beyond_the_compiled_form_falls_back_to_deids_parser(tmp_path):
    from deid.config import DeidRecipe

    from pipeline.fastdeid import CompiledRecipe

    plain = tmp_path / "plain.dicom"
    plain.write_text("FORMAT dicom\n%header\nREMOVE PatientName\nREPLACE StudyDate var:day\n")
    assert CompiledRecipe(DeidRecipe(str(plain))).supported
    for line in ("REMOVE contains:Patient", "JITTER StudyDate 1", "REMOVE values:names"):
        other = tmp_path / "other.dicom"
        other.write_text(f"FORMAT dicom\n%header\n{line}\n")
        assert not CompiledRecipe(DeidRecipe(str(other))).supported, line
