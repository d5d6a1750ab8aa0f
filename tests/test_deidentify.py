import datetime as dt

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from pipeline.deidentify import Deidentifier, Subject
from pipeline.dicomio import read_dicom
from pipeline.enrollment import Enrollee
from pipeline.verify import identifying_values, residual_phi

RANDOMIZED = dt.date(2025, 2, 3)


@pytest.fixture
def deidentifier(home, protocol):
    subject = Subject(Enrollee("DEMO-01-01001", "SITE-01", "A", RANDOMIZED), "WEEK12")
    return Deidentifier(home, protocol, subject)


@pytest.fixture
def original(trial):
    path = sorted((trial.batches[0].folder / "CT").glob("CT2_000*.dcm"))[0]
    return read_dicom(path).dataset


def test_planted_phi_is_gone_and_nothing_identifying_remains(deidentifier, original, trial):
    before = identifying_values(original, deidentifier.composed.kept)
    deidentifier.apply(original)
    out = original
    assert residual_phi(before, out) == []
    text = str(out).lower()
    for value in trial.patients[trial.batches[0].subject_id].phi_values():
        if len(value) >= 4 and value not in ("SN-448812",):
            assert value.lower() not in text


def test_subject_and_trial_attributes_come_from_the_manifest(deidentifier, original):
    deidentifier.apply(original)
    out = original
    assert out.PatientName == "DEMO-01-01001" and out.PatientID == "DEMO-01-01001"
    assert out.ClinicalTrialProtocolID == "DEMO-01"
    assert out.ClinicalTrialSiteID == "SITE-01"
    assert out.ClinicalTrialSubjectID == "DEMO-01-01001"
    assert out.ClinicalTrialTimePointID == "WEEK12"


def test_what_was_done_is_stamped_in_the_file(deidentifier, original, protocol):
    deidentifier.apply(original)
    out = original
    assert out.PatientIdentityRemoved == "YES"
    assert out.LongitudinalTemporalInformationModified == "MODIFIED"
    codes = [item.CodeValue for item in out.DeidentificationMethodCodeSequence]
    assert codes[0] == "113100"
    assert {"113105", "113107", "113108", "113109"} <= set(codes)
    assert all(i.CodingSchemeDesignator == "DCM" for i in out.DeidentificationMethodCodeSequence)
    assert protocol.recipe_version in out.DeidentificationMethod


def test_dates_shift_so_randomization_falls_on_the_anchor(deidentifier, original):
    study = dt.datetime.strptime(original.StudyDate, "%Y%m%d").date()
    deidentifier.apply(original)
    out = original
    shifted = dt.datetime.strptime(out.StudyDate, "%Y%m%d").date()
    assert (shifted - dt.date(2000, 1, 1)).days == (study - RANDOMIZED).days
    assert out.StudyTime == "101500"  # times of day are kept
    assert "PatientBirthDate" in out and not out.PatientBirthDate  # type 2: kept, emptied


def test_uids_are_remapped_consistently_across_batches(home, protocol, trial):
    path = sorted((trial.batches[0].folder / "CT").glob("CT2_000*.dcm"))[0]
    subject = Subject(Enrollee("DEMO-01-01001", "SITE-01", "A", RANDOMIZED), "BASELINE")
    first, second = read_dicom(path).dataset, read_dicom(path).dataset
    Deidentifier(home, protocol, subject).apply(first)
    Deidentifier(home, protocol, subject).apply(second)
    original = read_dicom(path).dataset
    assert first.SOPInstanceUID == second.SOPInstanceUID != original.SOPInstanceUID
    assert first.StudyInstanceUID == second.StudyInstanceUID != original.StudyInstanceUID
    assert first.SOPInstanceUID.startswith("2.25.")
    assert first.file_meta.MediaStorageSOPInstanceUID == first.SOPInstanceUID
    assert first.SOPClassUID == original.SOPClassUID  # class UIDs identify no one


def test_references_in_nested_sequences_follow_the_same_mapping(deidentifier, original):
    own_uid = original.SOPInstanceUID
    item = Dataset()
    item.ReferencedSOPClassUID = original.SOPClassUID
    item.ReferencedSOPInstanceUID = own_uid
    series = Dataset()
    series.SeriesInstanceUID = original.SeriesInstanceUID
    series.ReferencedInstanceSequence = Sequence([item])
    original.ReferencedSeriesSequence = Sequence([series])
    deidentifier.apply(original)
    out = original
    nested = out.ReferencedSeriesSequence[0]
    assert nested.SeriesInstanceUID == out.SeriesInstanceUID
    assert nested.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == out.SOPInstanceUID


def test_every_file_of_a_batch_is_stamped_in_its_own_encoding(deidentifier, trial, tmp_path):
    """The code sequence is encoded once per batch and encoding: files of either little
    endian encoding, de-identified one after the other, each carry it, readable."""
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    from pipeline.dicomio import read_upload, write_dicom

    sources = sorted((trial.batches[0].folder / "CT").glob("CT2_000*.dcm"))[:2]
    stamped = []
    for round_number in range(2):  # the second round takes the encoded stamps made before
        for n, syntax in enumerate((ImplicitVRLittleEndian, ExplicitVRLittleEndian)):
            ds = pydicom.dcmread(sources[n])
            ds.file_meta.TransferSyntaxUID = syntax
            written = tmp_path / f"{round_number}-{syntax.name}.dcm"
            ds.save_as(tmp_path / "in.dcm", enforce_file_format=True)
            upload = read_upload((tmp_path / "in.dcm").read_bytes())
            deidentifier.apply(upload.dataset, upload.encoded)
            write_dicom(upload.dataset, written, upload.pixels)
            back = pydicom.dcmread(written)
            assert back.file_meta.TransferSyntaxUID == syntax
            stamped.append(
                [
                    (i.CodeValue, i.CodingSchemeDesignator, i.CodeMeaning)
                    for i in back.DeidentificationMethodCodeSequence
                ]
            )
    assert stamped[0][0] == ("113100", "DCM", "Basic Application Confidentiality Profile")
    assert {"113105", "113107", "113108", "113109"} <= {code for code, _, _ in stamped[0]}
    assert all(codes == stamped[0] for codes in stamped)


def test_private_elements_are_removed(deidentifier, original):
    assert any(e.tag.is_private for e in original.iterall())
    deidentifier.apply(original)
    out = original
    assert not any(e.tag.is_private for e in out.iterall())


def test_output_is_written_as_valid_readable_dicom(deidentifier, original, tmp_path):
    deidentifier.apply(original)
    out = original
    path = tmp_path / "out.dcm"
    out.save_as(path, enforce_file_format=True)
    back = pydicom.dcmread(path)
    assert back.pixel_array.shape == (32, 32)
    assert back.file_meta.MediaStorageSOPInstanceUID == back.SOPInstanceUID


def test_descriptions_are_kept_but_cleaned_of_the_patients_name(deidentifier, original):
    deidentifier.apply(original)
    out = original
    assert out.SeriesDescription == "CHEST ABD"
    assert "MRN" in out.ImageComments and original.PatientID not in out.ImageComments
