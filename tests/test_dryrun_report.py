"""The dry run's report reads each file's top-level elements from its bytes: it must say
what pydicom's reading says, on every file pydicom ships that the byte walk reads."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_files
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from pipeline import dryrun
from pipeline.dicomscan import top_level


def _variants(ds: Dataset) -> dict[str, Dataset]:
    """The file written again unchanged, and with each kind of action done to it."""
    changed = pydicom.dcmread(io.BytesIO(_bytes(ds)), force=True)
    for keyword in ("PatientName", "InstitutionName"):
        if keyword in changed:
            del changed[keyword]  # removed
    if "PatientID" in changed:
        changed.PatientID = "ANON-1"  # replaced
    if "StudyDate" in changed:
        changed.StudyDate = ""  # emptied
    sequences = [e for e in changed if e.VR == "SQ"]
    if sequences:
        sequences[0].value = Sequence()  # a sequence emptied
    if len(sequences) > 1 and sequences[1].value:
        item = sequences[1].value[0]
        nested = next((e for e in item if e.VR in ("LO", "SH", "CS", "UI")), None)
        if nested is not None:
            nested.value = "1.2.3" if nested.VR == "UI" else "CHANGED"  # changed inside
    changed.PatientIdentityRemoved = "YES"  # added
    return {"unchanged": ds, "changed": changed}


def _bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


def _readable(path: str) -> tuple[bytes, Dataset] | None:
    data = Path(path).read_bytes()
    if top_level(data) is None:
        return None  # read by pydicom in the report too: nothing to compare
    try:
        return data, pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception:  # a file pydicom ships to show it refuses one
        return None


FILES = [f for f in sorted(get_testdata_files()) if f.endswith(".dcm")]
# The files the walk reads (the others take pydicom's way in the report itself).
WALKED = [f for f in FILES if _readable(f) is not None]


def test_the_byte_walk_reads_most_files_pydicom_ships():
    assert len(WALKED) > 0.6 * len(FILES), (len(WALKED), len(FILES))


@pytest.mark.parametrize("path", WALKED, ids=lambda f: Path(f).name)
def test_the_report_from_the_bytes_says_what_pydicom_reading_says(path, tmp_path):
    original, ds = _readable(path)
    (tmp_path / "in.dcm").write_bytes(original)
    compared = 0
    for name, variant in _variants(ds).items():
        try:
            output = _bytes(variant)
        except Exception:
            continue  # pydicom cannot write this one back; a de-identification would refuse it
        if top_level(output) is None:
            continue
        (tmp_path / f"{name}.dcm").write_bytes(output)
        by_bytes = dryrun.changes(tmp_path / "in.dcm", tmp_path / f"{name}.dcm")
        by_pydicom = dryrun.compare(
            dryrun.read_by_pydicom(original), dryrun.read_by_pydicom(output)
        )
        assert by_bytes == by_pydicom, name
        compared += 1
    assert compared, "neither output could be written and walked: nothing was compared"
    if ds.get("PatientID") is not None and compared == 2:
        assert "PatientID" in by_bytes["replaced"]


def test_an_element_whose_vr_the_walk_does_not_know_leaves_the_file_to_pydicom(tmp_path):
    from pydicom.data import get_testdata_file

    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    assert top_level(data) is not None
    # (0008,0008) Image Type, CS: its VR made two bytes no VR is.
    at = data.index(b"\x08\x00\x08\x00CS")
    broken = data[: at + 4] + b"ZZ" + data[at + 6 :]
    assert top_level(broken) is None
    (tmp_path / "in.dcm").write_bytes(data)
    (tmp_path / "out.dcm").write_bytes(broken)
    report = dryrun.changes(tmp_path / "in.dcm", tmp_path / "out.dcm")
    assert "PatientName" in report["kept"] and "PixelData" in report["kept"]


def test_a_sequence_written_again_unchanged_is_kept_though_its_bytes_differ(tmp_path):
    ds = pydicom.dcmread(get_testdata_files("CT_small.dcm")[0])
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator = "113100", "DCM"
    ds.DeidentificationMethodCodeSequence = Sequence([item])
    element = ds["DeidentificationMethodCodeSequence"]
    element.is_undefined_length = False
    (tmp_path / "in.dcm").write_bytes(_bytes(ds))
    element.is_undefined_length = True  # the same item, encoded with delimiters
    (tmp_path / "same.dcm").write_bytes(_bytes(ds))
    item.CodeValue = "113101"
    (tmp_path / "other.dcm").write_bytes(_bytes(ds))
    assert (tmp_path / "in.dcm").read_bytes() != (tmp_path / "same.dcm").read_bytes()
    kept = dryrun.changes(tmp_path / "in.dcm", tmp_path / "same.dcm")
    assert "DeidentificationMethodCodeSequence" in kept["kept"]
    replaced = dryrun.changes(tmp_path / "in.dcm", tmp_path / "other.dcm")
    assert "DeidentificationMethodCodeSequence" in replaced["replaced"]
