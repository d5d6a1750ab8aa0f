"""Images that may carry burned-in text are cleaned by a region the protocol defines, or
quarantined; never archived as they are."""

import datetime as dt
import shutil
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from pipeline.deidentify import BurnedInAnnotationError, Deidentifier, Subject
from pipeline.dicomio import read_dicom
from pipeline.enrollment import Enrollee
from pipeline.home import REPO_ROOT
from pipeline.protocol import load_protocol
from tests.accounting import process

SUBJECT = Subject(Enrollee("DEMO-01-00002", "SITE-01", "B", dt.date(2022, 5, 2)), "BASELINE")
BANNER = """
%filter graylist

LABEL Ultrasound banner with the patient's name
  contains Modality US
  coordinates 0,0,640,40
"""


@pytest.fixture
def protocol_with_region(tmp_path, monkeypatch):
    recipes = tmp_path / "recipes"
    shutil.copytree(REPO_ROOT / "recipes", recipes)
    with (recipes / "DEMO-01" / "deid.dicom").open("a") as handle:
        handle.write(BANNER)
    monkeypatch.setenv("TRIALPIPE_RECIPES", str(recipes))
    load_protocol.cache_clear()
    yield load_protocol("DEMO-01")
    load_protocol.cache_clear()


def _ultrasound():
    return read_dicom(Path(get_testdata_file("US1_UNCR.dcm"))).dataset


def test_an_ultrasound_is_cleaned_by_the_protocols_region_and_says_so(home, protocol_with_region):
    ds = _ultrasound()
    assert ds.pixel_array[:40].any()
    outcome = Deidentifier(home, protocol_with_region, SUBJECT).apply(ds)
    assert outcome.cleaned_pixels
    assert not ds.pixel_array[:40].any() and ds.pixel_array[40:].any()
    assert ds.BurnedInAnnotation == "NO"
    assert "113101" in [i.CodeValue for i in ds.DeidentificationMethodCodeSequence]


def test_an_ultrasound_without_a_region_is_refused(home, protocol):
    with pytest.raises(BurnedInAnnotationError, match="no cleaning region"):
        Deidentifier(home, protocol, SUBJECT).apply(_ultrasound())


def test_a_ct_flagged_as_burned_in_is_refused(home, protocol):
    ds = read_dicom(Path(get_testdata_file("CT_small.dcm"))).dataset
    ds.BurnedInAnnotation = "YES"
    with pytest.raises(BurnedInAnnotationError):
        Deidentifier(home, protocol, SUBJECT).apply(ds)


def test_compressed_pixels_at_risk_are_refused_even_with_a_region(home, protocol_with_region):
    ds = read_dicom(Path(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))).dataset
    ds.Modality = "US"
    with pytest.raises(BurnedInAnnotationError, match="compressed"):
        Deidentifier(home, protocol_with_region, SUBJECT).apply(ds)


def test_in_a_batch_the_refused_image_is_quarantined_as_burned_in(enrolled, trial):
    from pipeline import intake, ledger

    planned = next(b for b in trial.batches if b.expect == "done" and not b.bad_files)
    folder = planned.folder
    shutil.copy(get_testdata_file("US1_UNCR.dcm"), folder / "us.dcm")
    ds = read_dicom(folder / "us.dcm").dataset
    first = read_dicom(sorted((folder / "CT").glob("*.dcm"))[0]).dataset
    ds.PatientID, ds.PatientName = first.PatientID, first.PatientName  # same patient
    ds.save_as(folder / "us.dcm")
    batch_id = intake.stage_batch(
        enrolled, "DEMO-01", planned.site_id, planned.subject_id, planned.visit, [folder]
    )
    process(enrolled, batch_id)
    reasons = {f["reason"] for f in ledger.file_rows(enrolled, batch_id) if f["reason"]}
    assert reasons == {"burned_in_annotation"}
    assert ledger.batch_summary(enrolled, batch_id)["state"] == "done"
