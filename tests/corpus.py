"""Real DICOM files no one on this project wrote: pydicom's test files and pydicom-data's."""

from __future__ import annotations

from pathlib import Path

import data_store
from pydicom.data.data_manager import DATA_ROOT


def corpus_files() -> list[Path]:
    """Every .dcm file pydicom ships for its tests, plus the pydicom-data package's.

    Both are globbed on disk: pydicom's own ``get_testdata_files`` would also try to
    download the files it lists online, and nothing here may reach the network.
    """
    bundled = sorted((Path(DATA_ROOT) / "test_files").glob("*.dcm"))
    extra = sorted((Path(data_store.__file__).parent / "data").glob("*.dcm"))
    return bundled + extra
