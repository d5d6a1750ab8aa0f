"""Real files no one on this project wrote, with PHI planted in every Annex E attribute, in
nested items and in a private block: none of it survives, every output reads back, and the
same originals get the same UIDs within a study and across two batches of one subject."""

import datetime as dt
from collections import defaultdict

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from pipeline import annex_e
from pipeline.deidentify import Deidentifier, Subject, burned_in_risk
from pipeline.dicomio import read_dicom, read_upload, write_dicom
from pipeline.enrollment import Enrollee
from pipeline.verify import identifying_values, residual_phi, residual_phi_in_file
from tests.test_conformance import READABLE

NAME, FAMILY, GIVEN = "ZZPHIPLANT^ALICIA^Q", "ZZPHIPLANT", "ALICIA"
PATIENT_ID = "PHIMRN773412"
BIRTH = "19660317"
ACCESSION = "PHIACC99812"
ADDRESS = "99 Phiplanted Lane, Gotham"
PHONE = "555-0199-732"
INSTITUTION = "Phiplanted General Hospital"
DOCTOR = "PHIDOCTOR^BORIS"
PLANTED = [
    NAME,
    FAMILY,
    GIVEN,
    PATIENT_ID,
    BIRTH,
    ACCESSION,
    ADDRESS,
    PHONE,
    INSTITUTION,
    "PHIDOCTOR",
    "BORIS",
]
TEXT = {
    "PN": DOCTOR,
    "SH": PATIENT_ID,
    "LO": f"{PATIENT_ID} {FAMILY}",
    "ST": f"{NAME} {PATIENT_ID} {ADDRESS}",
    "LT": f"{NAME} {PATIENT_ID} {ADDRESS}",
    "UT": f"{NAME} {PATIENT_ID} {ADDRESS}",
    "DA": BIRTH,
    "DT": BIRTH + "101500",
}


SHARES = 6  # each file gets every sixth attribute: across the corpus, every one many times


def plant_phi(ds: Dataset, share: int | None = None) -> None:
    """Put one invented patient's identity where Table E.1-1 names attributes (all of them,
    or one ``share`` of them), in nested items and in a private block."""
    rows = [r for r in annex_e.load_table() if r.keyword and r.vr in TEXT]
    for index, row in enumerate(rows):
        if share is None or index % SHARES == share:
            setattr(ds, row.keyword, TEXT[row.vr])
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = NAME, PATIENT_ID, BIRTH
    ds.AccessionNumber, ds.PatientAddress = ACCESSION, ADDRESS
    ds.PatientTelephoneNumbers, ds.InstitutionName = PHONE, INSTITUTION
    other = Dataset()
    other.PatientID, other.IssuerOfPatientID = PATIENT_ID, INSTITUTION
    ds.OtherPatientIDsSequence = Sequence([other])
    reference = Dataset()
    reference.ReferencedSOPClassUID = ds.get("SOPClassUID", "1.2.840.10008.5.1.4.1.1.7")
    reference.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    reference.PatientName, reference.AccessionNumber = NAME, ACCESSION  # deep and wrong
    ds.ReferencedImageSequence = Sequence([reference])
    block = ds.private_block(0x0029, "PHI VENDOR 1", create=True)
    block.add_new(0x01, "LO", NAME)
    block.add_new(0x02, "LT", f"{PATIENT_ID} {ADDRESS}")
    ds.file_meta.SourceApplicationEntityTitle = "PHIPACS01"


def _subject(visit: str) -> Subject:
    return Subject(Enrollee("DEMO-01-00007", "SITE-02", "B", dt.date(2021, 3, 1)), visit)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, protocol):
    """Every readable corpus file, planted, de-identified as two batches (two visits)."""
    from pipeline.home import data_home

    home = data_home(tmp_path_factory.mktemp("corpus") / "home").ensure()
    first, second = (
        Deidentifier(home, protocol, _subject("BASELINE")),
        Deidentifier(home, protocol, _subject("WEEK12")),
    )
    results = []
    folder = tmp_path_factory.mktemp("out")
    for number, source in enumerate(READABLE):
        originals = []
        everything = source.name in ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm")
        if burned_in_risk(read_dicom(source).dataset):
            continue  # quarantined unless cleaned by region: tests/test_burned_in.py
        for deidentifier in (first, second):
            # The first batch reads each file whole; the second as the deidentify task
            # does: the header alone, the pixels kept apart as the bytes read.
            upload = read_upload(source.read_bytes()) if deidentifier is second else None
            ds = upload.dataset if upload else read_dicom(source).dataset
            plant_phi(ds, None if everything else number % SHARES)
            originals.append(
                {
                    k: str(ds.get(k, ""))
                    for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
                }
            )
            before = identifying_values(ds, deidentifier.composed.kept)
            deidentifier.apply(ds, upload.encoded if upload else None)
            path = folder / f"{number:04d}-{len(results) % 2}.dcm"
            write_dicom(ds, path, upload.pixels if upload else None)
            results.append((source, originals[-1], before, path))
    return results


def test_no_planted_value_survives_anywhere_in_any_output(outputs):
    leaks = []
    for source, _, _, path in outputs:
        data = path.read_bytes().upper()
        leaks += [(source.name, v) for v in PLANTED if v.upper().encode() in data]
    assert leaks == []


def test_no_original_uid_is_left(outputs):
    hits = []
    for source, original, _, path in outputs:
        data = path.read_bytes()
        hits += [(source.name, k) for k, uid in original.items() if uid and uid.encode() in data]
    assert hits == []


def test_verification_flags_only_files_whose_own_identity_is_in_kept_text(outputs):
    """The residual-PHI check is conservative: a test file whose patient is called "Last
    Name^First Name" has "Name" in kept text such as CodeMeaning, and is quarantined. No
    file may be flagged for an attribute the profile should have changed."""
    changed_by_profile = {r.keyword for r in annex_e.load_table() if r.keyword}
    for source, _, before, path in outputs:
        hits = residual_phi(before, pydicom.dcmread(path))
        for attribute in hits:
            assert attribute not in changed_by_profile, (source.name, attribute)
        assert residual_phi_in_file(before, path) == hits  # the verify task's own reading


def test_every_output_reads_back_completely(outputs):
    for _, _, _, path in outputs:
        ds = pydicom.dcmread(path)
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert str(ds)  # every element decodes


def test_uids_are_consistent_within_a_study_and_across_two_batches(outputs):
    studies = defaultdict(set)
    per_batch = defaultdict(list)
    for index, (_, original, _, path) in enumerate(outputs):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        uids = tuple(ds.get(k) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))
        if original["StudyInstanceUID"]:
            studies[original["StudyInstanceUID"]].add(uids[0])
        per_batch[index // 2].append(uids)
    assert all(len(pseudonyms) == 1 for pseudonyms in studies.values())
    for first, second in per_batch.values():
        assert first == second
