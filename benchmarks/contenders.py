"""The contenders, one per process so start-up is part of what is measured.

python -m benchmarks.contenders plain IN OUT       pydicom read + write: the floor
python -m benchmarks.contenders deid IN OUT RECIPE deid's replace_identifiers, naive use
python -m benchmarks.contenders dicognito IN OUT   dicognito's Anonymizer, a peer
python -m benchmarks.contenders library HOME BATCH trialpipe's tasks in one process
python -m benchmarks.contenders imports [workers]  only the modules trialpipe's tasks import
                                                   (with workers: those each worker needs)
"""

from __future__ import annotations

import sys
from pathlib import Path


def plain(source: Path, target: Path) -> int:
    import pydicom

    target.mkdir(parents=True, exist_ok=True)
    files = sorted(source.glob("*.dcm"))
    for path in files:
        pydicom.dcmread(path).save_as(target / path.name)
    return len(files)


def deid_naive(source: Path, target: Path, recipe: Path) -> int:
    import logging

    from deid.config import DeidRecipe
    from deid.dicom import get_identifiers, replace_identifiers
    from deid.logger import bot

    bot.level = 0
    logging.disable(logging.WARNING)
    target.mkdir(parents=True, exist_ok=True)
    files = [str(p) for p in sorted(source.glob("*.dcm"))]
    # One file at a time, as a naive script would: get the fields, replace, save.
    for path in files:
        ids = get_identifiers([path])
        replace_identifiers(
            [path],
            ids=ids,
            deid=DeidRecipe(str(recipe)),
            save=True,
            overwrite=True,
            output_folder=str(target),
        )
    return len(files)


def dicognito(source: Path, target: Path) -> int:
    import pydicom
    from dicognito.anonymizer import Anonymizer

    anonymizer = Anonymizer(seed="benchmark")
    target.mkdir(parents=True, exist_ok=True)
    files = sorted(source.glob("*.dcm"))
    for path in files:
        ds = pydicom.dcmread(path)
        anonymizer.anonymize(ds)
        ds.save_as(target / path.name)
    return len(files)


def library(home: Path, batch_id: str) -> int:
    from pipeline import batch, ledger
    from pipeline.home import data_home

    data = data_home(home)
    batch.run_in_process(data, batch_id)
    row = ledger.batch_summary(data, batch_id)
    assert row is not None and row["state"] == "done", row
    return int(row["files"])


def imports(workers_only: bool) -> int:
    """Import what the tasks import, and stop: the start-up no batch can avoid."""
    if workers_only:
        # What a worker runs on every file: pydicom and deid (the recipe, the writer).
        from pipeline import batch, deidentify  # noqa: F401
    else:
        from pipeline.preload import preload

        preload()
    return 0


def main(argv: list[str]) -> None:
    kind, *args = argv
    if kind == "plain":
        plain(Path(args[0]), Path(args[1]))
    elif kind == "deid":
        deid_naive(Path(args[0]), Path(args[1]), Path(args[2]))
    elif kind == "dicognito":
        dicognito(Path(args[0]), Path(args[1]))
    elif kind == "library":
        library(Path(args[0]), args[1])
    elif kind == "imports":
        imports(args == ["workers"])
    else:
        raise SystemExit(f"unknown contender {kind}")


if __name__ == "__main__":
    main(sys.argv[1:])
