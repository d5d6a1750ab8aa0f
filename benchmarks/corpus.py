"""Benchmark corpus: realistic CT and MR series and header-heavy small files, generated.

CT and MR slices are 512x512 16-bit with real geometry, in series of up to 300 slices; the
header-heavy files are small images carrying many text attributes, nested sequences and
private blocks (what makes de-identification, not I/O, the cost). Every file belongs to one
invented patient, enrolled as one subject of DEMO-01, so the same folder can go through
every contender, trialpipe's own pipeline included.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from pipeline.protocol import load_protocol
from pipeline.synth import SeriesShape, make_series, make_trial, write_series

SERIES_SLICES = 300


@dataclass(frozen=True)
class Corpus:
    """A generated folder of one subject's images, and who the subject is."""

    root: Path
    enrollment_csv: Path
    site_id: str
    subject_id: str
    visit: str

    def folder(self, kind: str) -> Path:
        return self.root / kind


def _series(corpus: Corpus, kind: str, modality: str, count: int, rows: int, seed: int) -> None:
    trial_patient = json.loads((corpus.root / "patient.json").read_text())
    from pipeline.synth import Patient

    patient = Patient(**trial_patient)
    rng = random.Random(seed)
    study_uid = generate_uid()
    day = dt.date.fromisoformat((corpus.root / "randomized").read_text().strip())
    number = 0
    while number * SERIES_SLICES < count:
        slices = min(SERIES_SLICES, count - number * SERIES_SLICES)
        datasets = make_series(
            patient,
            modality,
            day,
            study_uid,
            f"{patient.accession_prefix}B",
            SeriesShape(rows=rows, columns=rows, slices=slices),
            rng,
            series_number=number + 2,
        )
        if kind == "small":
            for ds in datasets:
                _load_headers(ds, patient, rng)
        write_series(datasets, corpus.folder(kind), f"{modality}{number + 2}")
        number += 1


def _load_headers(ds: Dataset, patient, rng: random.Random) -> None:  # type: ignore[no-untyped-def]
    """Many text attributes, nested sequences and a private block, as real exports carry."""
    ds.StudyDescription = "CT CHEST ABDOMEN PELVIS W CONTRAST"
    ds.SeriesDescription = "AXIAL 2.5MM SOFT TISSUE"
    ds.ImageComments = f"Patient {patient.name.replace('^', ' ')} tolerated the exam well"
    ds.AdditionalPatientHistory = "Follow-up of pulmonary nodules; see prior exam"
    ds.RequestingPhysician = patient.physician
    ds.PerformingPhysicianName = patient.physician
    ds.OperatorsName = patient.operator
    ds.InstitutionAddress = patient.address
    ds.OtherPatientIDs = f"{patient.patient_id}-ALT"
    items = []
    for n in range(12):
        item = Dataset()
        item.CodeValue = f"C{n:04d}"
        item.CodingSchemeDesignator = "99LOCAL"
        item.CodeMeaning = f"Procedure step {n}"
        item.ReferencedSOPInstanceUID = generate_uid()
        item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        items.append(item)
    ds.ProcedureCodeSequence = Sequence(items)
    ds.ReferencedImageSequence = Sequence([Dataset() for _ in range(8)])
    for item in ds.ReferencedImageSequence:
        item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        item.ReferencedSOPInstanceUID = generate_uid()
    block = ds.private_block(0x0029, "BENCH VENDOR", create=True)
    for offset in range(16):
        block.add_new(offset, "LO", f"vendor value {rng.randrange(10**6)}")


def generate(root: Path, ct: int, mr: int, small: int, seed: int = 11) -> Corpus:
    """Write ``ct`` CT slices, ``mr`` MR slices (512x512) and ``small`` header-heavy files."""
    protocol = load_protocol("DEMO-01")
    root.mkdir(parents=True, exist_ok=True)
    trial = make_trial(
        root / "trial", protocol, subjects_per_site=1, shape=SeriesShape(8, 8, 1), bad_cases=False
    )
    planned = trial.batches[0]
    patient = trial.patients[planned.subject_id]
    (root / "patient.json").write_text(json.dumps(patient.__dict__))
    randomized = trial.randomization[planned.subject_id]
    (root / "randomized").write_text(randomized.isoformat())
    corpus = Corpus(root, trial.enrollment_csv, planned.site_id, planned.subject_id, planned.visit)
    (root / "corpus.json").write_text(
        json.dumps(
            {
                "enrollment_csv": str(trial.enrollment_csv),
                "site_id": planned.site_id,
                "subject_id": planned.subject_id,
                "visit": planned.visit,
            }
        )
    )
    if ct:
        _series(corpus, "ct", "CT", ct, 512, seed)
    if mr:
        _series(corpus, "mr", "MR", mr, 512, seed + 1)
    if small:
        _series(corpus, "small", "CT", small, 64, seed + 2)
    return corpus


def load(root: Path) -> Corpus:
    """A corpus generated earlier under ``root``."""
    raw = json.loads((root / "corpus.json").read_text())
    return Corpus(
        root, Path(raw["enrollment_csv"]), raw["site_id"], raw["subject_id"], raw["visit"]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--ct", type=int, default=1000)
    parser.add_argument("--mr", type=int, default=300)
    parser.add_argument("--small", type=int, default=500)
    args = parser.parse_args()
    generate(args.root, args.ct, args.mr, args.small)


if __name__ == "__main__":
    main()
