"""Modules trialpipe's libraries import but trialpipe never uses are imported on first use,
and then work as if imported at the start (pipeline.deferred)."""

import subprocess
import sys


def _run(script: str) -> list[str]:
    # A fresh interpreter: this test process has imported much already.
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()


def test_deid_loads_without_matplotlib_until_deid_draws():
    out = _run(
        """
import sys
from pipeline import deidentify
from deid.dicom.pixels import clean_pixel_data, has_burned_pixels
drawn = [m for m in ("matplotlib.figure", "matplotlib.colors") if m in sys.modules]
from deid.dicom.pixels import clean
figure, _ = clean.plt.subplots()  # what deid draws with: the real pyplot, on deid's backend
print(drawn, clean.plt.get_backend(), type(figure).__name__, sys.modules["matplotlib"].__name__)
print(type(sys.modules["matplotlib"]).__name__, type(sys.modules["matplotlib.pyplot"]).__name__)
"""
    )
    assert out == ["[]", "pdf", "Figure", "matplotlib", "module", "module"]


def test_a_module_imported_before_deferral_is_left_as_it_is():
    out = _run(
        """
import sys
import matplotlib
from pipeline import deferred
deferred.defer(("matplotlib", "no_such_module_anywhere"))
print(sys.modules["matplotlib"] is matplotlib, "no_such_module_anywhere" in sys.modules)
"""
    )
    assert out == ["True", "False"]


def test_a_backend_chosen_once_matplotlib_is_imported_is_chosen_at_once():
    out = _run(
        """
from pipeline import fastdeid
import deid.dicom.pixels.clean as clean  # deid's matplotlib.use("pdf"), kept for later
first = clean.matplotlib.get_backend()  # imports matplotlib, making the kept choice
clean.matplotlib.use("svg")  # through the stand-in deid holds, made at once
print(first, clean.plt.get_backend())
"""
    )
    assert out == ["pdf", "svg"]
