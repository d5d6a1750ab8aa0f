"""A synthetic multi-site trial: enrollment list, CT and MR series, PHI where scanners put it.

Everything here is invented (names, IDs, dates, pixel data), so it can be committed, printed
and shared. The same seed yields the same trial, file for file. Besides clean batches it makes
the bad cases a core lab meets: truncated files, non-DICOM files, another patient's image in
a batch, and batches of subjects who are not enrolled.
"""

from __future__ import annotations

import csv
import datetime as dt
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

from pipeline.protocol import Protocol

FIRST_NAMES = [
    "JANE",
    "JOHN",
    "MARIA",
    "AHMED",
    "WEI",
    "OLGA",
    "PEDRO",
    "AMARA",
    "LIAM",
    "SOFIA",
    "KENJI",
    "FATIMA",
    "NOAH",
    "INGRID",
    "RAVI",
    "CHLOE",
]
LAST_NAMES = [
    "DOE",
    "SMITH",
    "GARCIA",
    "KHAN",
    "CHEN",
    "IVANOVA",
    "SILVA",
    "OKAFOR",
    "MURPHY",
    "ROSSI",
    "TANAKA",
    "HADDAD",
    "MILLER",
    "LARSEN",
    "PATEL",
    "MARTIN",
]
INSTITUTIONS = {
    "SITE-01": "St Elsewhere General Hospital",
    "SITE-02": "Mercy West Medical Center",
    "SITE-03": "Princeton-Plainsboro Teaching Hospital",
}
PRIVATE_CREATOR = "ACME MEDICAL 1.0"


@dataclass(frozen=True)
class Patient:
    """An invented patient as a hospital knows them: the PHI that must never leave."""

    name: str
    patient_id: str
    birth_date: str
    sex: str
    accession_prefix: str
    address: str
    phone: str
    physician: str
    operator: str
    institution: str

    def phi_values(self) -> list[str]:
        """Every identifying string planted in this patient's files."""
        family, given = self.name.split("^")[:2]
        return [
            self.name,
            family,
            given,
            self.patient_id,
            self.birth_date,
            self.address,
            self.phone,
            self.physician,
            self.operator,
            self.institution,
            self.accession_prefix,
        ]


@dataclass
class PlannedBatch:
    """One upload as the synthetic trial wants it made, and what should become of it."""

    site_id: str
    subject_id: str
    visit: str
    folder: Path
    expect: str = "done"  # or the batch-level reason code expected
    bad_files: dict[str, str] = field(default_factory=dict)  # file name -> expected reason
    flagged_files: dict[str, str] = field(default_factory=dict)  # file name -> attribute


@dataclass
class SyntheticTrial:
    enrollment_csv: Path
    batches: list[PlannedBatch]
    patients: dict[str, Patient]  # subject_id -> patient
    randomization: dict[str, dt.date]
    arms: dict[str, str]

    def phi_values(self) -> list[str]:
        """All planted identifying values across the trial (for leak scans in tests)."""
        values: set[str] = set()
        for patient in self.patients.values():
            values.update(v for v in patient.phi_values() if len(v) >= 4)
        return sorted(values)


@dataclass(frozen=True)
class SeriesShape:
    """Image size of the generated series; the demo keeps it small, benchmarks go big."""

    rows: int = 128
    columns: int = 128
    slices: int = 6


def make_patient(rng: random.Random, site_id: str) -> Patient:
    family, given = rng.choice(LAST_NAMES), rng.choice(FIRST_NAMES)
    born = dt.date(1940, 1, 1) + dt.timedelta(days=rng.randrange(0, 365 * 50))
    return Patient(
        name=f"{family}^{given}^{rng.choice('ABCDEFGHJK')}",
        patient_id=f"MRN{rng.randrange(10**7, 10**8)}",
        birth_date=born.strftime("%Y%m%d"),
        sex=rng.choice("MF"),
        accession_prefix=f"ACC{rng.randrange(10**5, 10**6)}",
        address=f"{rng.randrange(1, 999)} {rng.choice(LAST_NAMES).title()} Street, Springfield",
        phone=f"555-{rng.randrange(1000, 9999)}",
        physician=f"{rng.choice(LAST_NAMES)}^{rng.choice(FIRST_NAMES)}^^DR",
        operator=f"{rng.choice(LAST_NAMES)}^{rng.choice(FIRST_NAMES)}",
        institution=INSTITUTIONS.get(site_id, f"{site_id} Hospital"),
    )


def make_series(
    patient: Patient,
    modality: str,
    study_date: dt.date,
    study_uid: str,
    accession: str,
    shape: SeriesShape,
    rng: random.Random,
    series_number: int = 1,
) -> list[Dataset]:
    """A series of ``shape.slices`` axial images with real geometry and phantom pixels."""
    series_uid = generate_uid(entropy_srcs=[study_uid, modality, str(series_number)])
    frame_uid = generate_uid(entropy_srcs=[study_uid, "frame", str(series_number)])
    spacing = 0.7 if modality == "CT" else 0.9
    thickness = 2.5 if modality == "CT" else 4.0
    datasets = []
    for index in range(shape.slices):
        ds = _base_dataset(patient, modality, study_date, study_uid, accession)
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[series_uid, str(index)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesNumber = series_number
        ds.InstanceNumber = index + 1
        ds.SeriesDescription = (
            f"{'CHEST ABD' if modality == 'CT' else 'T1 AX BRAIN'} {patient.name.split('^')[0]}"
        )
        ds.ImageComments = f"pt {patient.name.replace('^', ' ').title()} MRN {patient.patient_id}"
        z = -100.0 + index * thickness
        ds.ImagePositionPatient = [-shape.columns * spacing / 2, -shape.rows * spacing / 2, z]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [spacing, spacing]
        ds.SliceThickness = thickness
        ds.SliceLocation = z
        if modality == "CT":
            ds.KVP = rng.choice([100, 120, 140])
            ds.ConvolutionKernel = rng.choice(["STANDARD", "B30f", "SOFT"])
            ds.XRayTubeCurrent = rng.randrange(80, 400)
            ds.ExposureTime = 500
            ds.RescaleIntercept = -1024
            ds.RescaleSlope = 1
            ds.RescaleType = "HU"
        else:
            ds.MagneticFieldStrength = rng.choice([1.5, 3.0])
            ds.RepetitionTime = rng.choice([450.0, 500.0, 2000.0])
            ds.EchoTime = rng.choice([10.0, 15.0, 90.0])
            ds.FlipAngle = 90
            ds.ScanningSequence = "SE"
            ds.SequenceVariant = "NONE"
            ds.ScanOptions = ""
            ds.MRAcquisitionType = "2D"
        _set_pixels(ds, shape, index, rng)
        datasets.append(ds)
    return datasets


def _base_dataset(
    patient: Patient, modality: str, study_date: dt.date, study_uid: str, accession: str
) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage if modality == "CT" else MRImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.Modality = modality
    day = study_date.strftime("%Y%m%d")
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = day
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = "101500"
    ds.AccessionNumber = accession
    ds.Manufacturer = "ACME Medical"
    ds.ManufacturerModelName = "Imager 3000" if modality == "CT" else "Magnet 15"
    ds.DeviceSerialNumber = "SN-448812"
    ds.SoftwareVersions = "4.2.1"
    ds.InstitutionName = patient.institution
    ds.InstitutionAddress = patient.address.replace("Street", "Avenue")
    ds.StationName = "CTROOM2" if modality == "CT" else "MRI1"
    ds.ReferringPhysicianName = patient.physician
    ds.PerformingPhysicianName = patient.physician
    ds.OperatorsName = patient.operator
    ds.StudyDescription = f"{'CT' if modality == 'CT' else 'MR'} TRIAL {patient.name.split('^')[0]}"
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.IssuerOfPatientID = patient.institution
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    age = (
        study_date
        - dt.date.fromisoformat(
            f"{patient.birth_date[:4]}-{patient.birth_date[4:6]}-{patient.birth_date[6:]}"
        )
    ).days // 365
    ds.PatientAge = f"{age:03d}Y"
    ds.PatientWeight = 72.5
    ds.PatientSize = 1.74
    ds.PatientAddress = patient.address
    ds.PatientTelephoneNumbers = patient.phone
    ds.StudyInstanceUID = study_uid
    ds.StudyID = accession[-6:]
    ds.BodyPartExamined = "CHEST" if modality == "CT" else "HEAD"
    ds.PatientPosition = "HFS"
    other = Dataset()
    other.PatientID = f"{patient.patient_id}-B"
    other.IssuerOfPatientID = "REGIONAL MPI"
    ds.OtherPatientIDsSequence = Sequence([other])
    request = Dataset()
    request.AccessionNumber = accession
    request.RequestedProcedureID = f"RP{accession[-5:]}"
    request.RequestingPhysician = patient.physician
    referenced = Dataset()
    referenced.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    referenced.ReferencedSOPInstanceUID = generate_uid(entropy_srcs=[study_uid, "pps"])
    request.ReferencedStudySequence = Sequence([referenced])
    ds.RequestAttributesSequence = Sequence([request])
    block = ds.private_block(0x0009, PRIVATE_CREATOR, create=True)
    block.add_new(0x10, "LO", patient.name)
    block.add_new(0x11, "LO", patient.patient_id)
    block.add_new(0x12, "DS", "1.25")
    return ds


def _set_pixels(ds: Dataset, shape: SeriesShape, index: int, rng: random.Random) -> None:
    """A body-like phantom: an ellipse of soft tissue with a brighter disc that moves."""
    yy, xx = np.mgrid[0 : shape.rows, 0 : shape.columns]
    cy, cx = shape.rows / 2, shape.columns / 2
    body = ((yy - cy) / (shape.rows * 0.42)) ** 2 + ((xx - cx) / (shape.columns * 0.35)) ** 2 <= 1
    lesion = (yy - cy - index) ** 2 + (xx - cx * 0.8) ** 2 <= (shape.rows * 0.06) ** 2
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0, 12, (shape.rows, shape.columns))
    image = np.where(body, 1064, 24) + np.where(lesion, 180, 0) + noise
    pixels = np.clip(image, 0, 4095).astype(np.uint16)
    ds.Rows, ds.Columns = shape.rows, shape.columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()


def write_series(datasets: list[Dataset], folder: Path, prefix: str) -> list[Path]:
    """Write datasets as ``prefix_0001.dcm``… under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, ds in enumerate(datasets, start=1):
        path = folder / f"{prefix}_{number:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def make_trial(
    root: Path,
    protocol: Protocol,
    subjects_per_site: int = 2,
    visits: tuple[str, ...] | None = None,
    shape: SeriesShape | None = None,
    seed: int = 7,
    bad_cases: bool = True,
) -> SyntheticTrial:
    """Generate a trial under ``root``: ``enrollment.csv`` and one folder per planned batch.

    Subjects alternate between the protocol's arms; each visit is one batch with a CT and
    an MR series. With ``bad_cases`` it adds a truncated and a non-DICOM file to one batch,
    another patient's image to another, and a batch from a subject who is not enrolled.
    """
    rng = random.Random(seed)
    shape = shape or SeriesShape()
    visits = visits or protocol.visit_ids[:2]
    visit_days = {v.visit_id: v.day for v in protocol.visits}
    root.mkdir(parents=True, exist_ok=True)
    patients: dict[str, Patient] = {}
    randomization: dict[str, dt.date] = {}
    arms: dict[str, str] = {}
    batches: list[PlannedBatch] = []
    number = 0
    for site_index, site_id in enumerate(protocol.sites):
        for _ in range(subjects_per_site):
            number += 1
            subject_id = f"{protocol.protocol_id}-{site_index + 1:02d}{number:03d}"
            patients[subject_id] = make_patient(rng, site_id)
            arms[subject_id] = protocol.arms[(number - 1) % len(protocol.arms)]
            randomization[subject_id] = dt.date(2025, 1, 6) + dt.timedelta(days=rng.randrange(200))
            for visit in visits:
                batches.append(
                    _make_batch(
                        root,
                        protocol,
                        site_id,
                        subject_id,
                        visit,
                        patients[subject_id],
                        randomization[subject_id],
                        visit_days.get(visit, 0),
                        shape,
                        rng,
                    )
                )
    _write_enrollment(root / "enrollment.csv", protocol, patients, arms, randomization)
    if bad_cases:
        _add_bad_cases(root, protocol, batches, patients, shape, rng)
    return SyntheticTrial(root / "enrollment.csv", batches, patients, randomization, arms)


def _make_batch(
    root: Path,
    protocol: Protocol,
    site_id: str,
    subject_id: str,
    visit: str,
    patient: Patient,
    randomized: dt.date,
    day: int,
    shape: SeriesShape,
    rng: random.Random,
) -> PlannedBatch:
    folder = root / "uploads" / f"{subject_id}_{visit}"
    study_date = randomized + dt.timedelta(days=day + rng.randrange(0, 3))
    accession = f"{patient.accession_prefix}{visit[:2]}"
    for modality, series_number in (("CT", 2), ("MR", 5)):
        study_uid = generate_uid(entropy_srcs=[subject_id, visit, modality])
        datasets = make_series(
            patient, modality, study_date, study_uid, accession, shape, rng, series_number
        )
        write_series(datasets, folder / modality, f"{modality}{series_number}")
    return PlannedBatch(site_id, subject_id, visit, folder)


def _write_enrollment(
    path: Path,
    protocol: Protocol,
    patients: dict[str, Patient],
    arms: dict[str, str],
    randomization: dict[str, dt.date],
) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["site_id", "subject_id", "arm", "randomization_date"])
        for subject_id in patients:
            site_index = int(subject_id.rsplit("-", 1)[1][:2]) - 1
            writer.writerow(
                [
                    protocol.sites[site_index],
                    subject_id,
                    arms[subject_id],
                    randomization[subject_id].isoformat(),
                ]
            )


def _add_bad_cases(
    root: Path,
    protocol: Protocol,
    batches: list[PlannedBatch],
    patients: dict[str, Patient],
    shape: SeriesShape,
    rng: random.Random,
) -> None:
    # Broken files in the first batch: the rest of that batch must still be archived.
    first = batches[0]
    source = sorted((first.folder / "CT").glob("*.dcm"))[0]
    data = source.read_bytes()
    (first.folder / "CT" / "CT2_truncated.dcm").write_bytes(data[: len(data) // 2])
    (first.folder / "scan_report.txt").write_text("Radiology report: see PACS.\n")
    first.bad_files = {"CT2_truncated.dcm": "truncated", "scan_report.txt": "not_dicom"}
    # Protocol QC in the second batch: a slice too thick (quarantined) and a slice without
    # its reconstruction kernel (a flag-only rule: archived, with a finding).
    if len(batches) > 1:
        second = batches[1]
        thick, no_kernel = sorted((second.folder / "CT").glob("*.dcm"))[:2]
        ds = dcmread(thick)
        ds.SliceThickness = "7.0"
        ds.save_as(thick)
        ds = dcmread(no_kernel)
        del ds.ConvolutionKernel
        ds.save_as(no_kernel)
        second.bad_files = {thick.name: "value_out_of_range"}
        second.flagged_files = {no_kernel.name: "ConvolutionKernel"}
    # Another patient's image slipped into a later batch: the whole batch is refused.
    mixed = batches[min(3, len(batches) - 1)]
    intruder = make_patient(rng, mixed.site_id)
    patients[f"intruder-of-{mixed.subject_id}"] = intruder
    study_uid = generate_uid(entropy_srcs=["intruder", mixed.subject_id])
    day = dt.date(2025, 9, 1)
    ds = make_series(
        intruder,
        "CT",
        day,
        study_uid,
        f"{intruder.accession_prefix}X",
        SeriesShape(shape.rows, shape.columns, 1),
        rng,
    )[0]
    write_series([ds], mixed.folder / "CT", "CT9_other_patient")
    mixed.expect = "mixed_patients"
    # A subject the randomization list does not know.
    stranger = make_patient(rng, protocol.sites[0])
    subject_id = f"{protocol.protocol_id}-99999"
    patients[subject_id] = stranger
    folder = root / "uploads" / f"{subject_id}_{protocol.visit_ids[0]}"
    study_uid = generate_uid(entropy_srcs=[subject_id, "CT"])
    write_series(
        make_series(
            stranger,
            "CT",
            day,
            study_uid,
            f"{stranger.accession_prefix}B",
            SeriesShape(shape.rows, shape.columns, 2),
            rng,
        ),
        folder / "CT",
        "CT2",
    )
    batches.append(
        PlannedBatch(
            protocol.sites[0],
            subject_id,
            protocol.visit_ids[0],
            folder,
            expect="unenrolled_subject",
        )
    )


def make_wrong_patient_batch(
    root: Path,
    protocol: Protocol,
    trial: SyntheticTrial,
    subject_id: str,
    visit: str,
    seed: int = 11,
) -> PlannedBatch:
    """A follow-up batch for ``subject_id`` holding a different patient's images."""
    rng = random.Random(seed)
    site_id = next(b.site_id for b in trial.batches if b.subject_id == subject_id)
    impostor = make_patient(rng, site_id)
    trial.patients[f"impostor-of-{subject_id}"] = impostor
    folder = root / "uploads" / f"{subject_id}_{visit}_wrong_patient"
    study_uid = generate_uid(entropy_srcs=["impostor", subject_id, visit])
    write_series(
        make_series(
            impostor,
            "CT",
            dt.date(2025, 11, 3),
            study_uid,
            f"{impostor.accession_prefix}W",
            SeriesShape(64, 64, 2),
            rng,
        ),
        folder / "CT",
        "CT2",
    )
    return PlannedBatch(site_id, subject_id, visit, folder, expect="patient_mismatch")
