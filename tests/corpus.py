"""Real DICOM files no one on this project wrote: pydicom's test files and pydicom-data's."""

from __future__ import annotations

from pathlib import Path

import data_store
from pydicom.data import get_testdata_files


def corpus_files() -> list[Path]:
    """Every .dcm file pydicom ships for its tests, plus the pydicom-data package's."""
    bundled = [Path(p) for p in get_testdata_files("*.dcm")]
    extra = sorted((Path(data_store.__file__).parent / "data").glob("*.dcm"))
    return sorted(bundled) + extra
