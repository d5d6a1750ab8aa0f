"""Archive, tables and quarantine on an object store: a real S3 endpoint (moto's server, a
process of its own on 127.0.0.1), real s3fs, real DuckDB. The batches run through the DAG's
task functions in-process, as in test_batch_flow."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pipeline import (
    batch,
    compaction,
    enrollment,
    intake,
    ledger,
    quarantine,
    query,
    store,
    tables,
    watch,
)
from pipeline.cli import main
from pipeline.demo import upload_trial
from pipeline.embedded import free_port
from pipeline.home import DataHome, data_home
from tests.accounting import enroll_late, process, stage
from tests.conftest import phi_leaks
from tests.test_tables import _row

STARTUP_SECONDS = 60
TABLE_KEY = re.compile(
    r"^(instances|series|batches|qc_findings)/protocol=[^/]+/site=[^/]+/[^/]+\.parquet$"
)


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's S3 server on a free port of 127.0.0.1, stopped after the module's tests."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with open(log, "wb") as output:
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        _wait_until_serving(endpoint, server, log)
        yield endpoint
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)


def _wait_until_serving(endpoint: str, server: subprocess.Popen, log: Path) -> None:
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 only
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"moto server exited with {server.returncode}: {log.read_text()[-2000:]}")
        try:
            with direct.open(f"{endpoint}/", timeout=2):
                return
        except urllib.error.HTTPError:
            return  # an HTTP answer, whatever its status: the server is up
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"moto server not serving after {STARTUP_SECONDS} s: {log.read_text()[-2000:]}")


@dataclass(frozen=True)
class Bucket:
    """The test's bucket, read directly with s3fs (not through the pipeline)."""

    name: str
    fs: Any

    def objects(self, prefix: str) -> dict[str, dict[str, Any]]:
        """Key below ``prefix`` -> the object's listing (ETag, size, LastModified)."""
        found = self.fs.find(f"{self.name}/{prefix}", detail=True)
        return {key.removeprefix(f"{self.name}/{prefix}/"): info for key, info in found.items()}

    def read(self, key: str) -> bytes:
        return self.fs.cat_file(f"{self.name}/{key}")


@pytest.fixture
def bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Bucket:
    """A fresh bucket; the archive and the tables configured into it by environment."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        "AWS_EC2_METADATA_DISABLED": "true",
        "NO_PROXY": "127.0.0.1",
        "no_proxy": "127.0.0.1",
        store.ENDPOINT_VARIABLE: s3_endpoint,
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    name = f"trialpipe-{uuid.uuid4().hex[:12]}"
    monkeypatch.setenv("TRIALPIPE_ARCHIVE_URL", f"s3://{name}/archive")
    monkeypatch.setenv("TRIALPIPE_TABLES_URL", f"s3://{name}/tables")
    fs = store.location(f"s3://{name}").fs
    fs.mkdir(name)
    return Bucket(name, fs)


@pytest.fixture
def s3_home(bucket: Bucket, tmp_path: Path, protocol, trial) -> DataHome:
    """A data home whose archive and tables are in the bucket, the trial enrolled."""
    return _enrolled_home(tmp_path, protocol, trial)


@pytest.fixture(params=["local inbox", "inbox in the bucket"])
def s3_quarantine_home(
    request, bucket: Bucket, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, protocol, trial
) -> DataHome:
    """As ``s3_home``, the quarantine in the bucket too, and the inbox in the data home
    or in the bucket (where a release then uploads its batch)."""
    monkeypatch.setenv("TRIALPIPE_QUARANTINE_URL", f"s3://{bucket.name}/quarantine")
    if request.param == "inbox in the bucket":
        monkeypatch.setenv("TRIALPIPE_INBOX_URL", f"s3://{bucket.name}/inbox")
    home = _enrolled_home(tmp_path, protocol, trial)
    assert not store.is_local(home.quarantine)
    return home


@pytest.fixture
def s3_inbox_home(
    bucket: Bucket, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, protocol, trial
) -> DataHome:
    """As ``s3_home``, the upload area in the bucket too."""
    monkeypatch.setenv("TRIALPIPE_INBOX_URL", f"s3://{bucket.name}/inbox")
    home = _enrolled_home(tmp_path, protocol, trial)
    assert not store.is_local(home.inbox) and store.is_local(home.claimed)
    return home


def _enrolled_home(tmp_path: Path, protocol, trial) -> DataHome:
    home = data_home(tmp_path / "home").ensure()
    assert not store.is_local(home.archive) and not store.is_local(home.parquet)
    enrollment.import_csv(home, protocol, trial.enrollment_csv)
    return home


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_archive_and_tables_land_in_the_bucket_and_duckdb_reads_them_back(
    s3_home, bucket, trial, tmp_path
):
    for batch_id in upload_trial(s3_home, trial):
        process(s3_home, batch_id)
    archived = [f for f in ledger.file_rows(s3_home) if f["disposition"] == "archived"]
    assert archived
    archive = bucket.objects("archive")
    assert sorted(archive) == sorted(f["archive_path"] for f in archived)
    for f in archived:
        assert _sha256(bucket.read(f"archive/{f['archive_path']}")) == f["sha256_out"]
    assert not (s3_home.root / "archive").exists()  # nothing archived on the local disk

    table_keys = bucket.objects("tables")
    assert table_keys and all(TABLE_KEY.match(key) for key in table_keys)
    assert {key.split("/")[0] for key in table_keys} >= {"instances", "series", "batches"}
    assert sorted(p.name for p in (s3_home.root / "parquet").iterdir()) == [".locks"]

    by_arm = Counter(path.split("/")[1] for path in archive)
    counts = query.run(s3_home, "SELECT arm, count(*) FROM instances GROUP BY arm ORDER BY arm")
    assert counts.rows == sorted(by_arm.items())
    paths = query.run(s3_home, "SELECT archive_path, sha256, protocol, site FROM instances")
    assert {(p, s) for p, s, _, _ in paths.rows} == {
        (f["archive_path"], f["sha256_out"]) for f in archived
    }
    assert {(p, s) for _, _, p, s in paths.rows} <= {("DEMO-01", b.site_id) for b in trial.batches}
    batches = query.run(s3_home, "SELECT count(*) FROM batches").rows
    assert batches == [(len(ledger.batch_summaries(s3_home)),)]
    assert tables.read_table(s3_home, "instances").num_rows == len(archived)
    # A statistician's command, configured by the environment alone, in a process of its own.
    command = [sys.executable, "-m", "pipeline.cli", "--home", str(s3_home.root), "query"]
    cli = subprocess.run(
        [*command, "--format", "csv", "SELECT count(*) AS images FROM instances"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert (cli.returncode, cli.stdout.split()) == (0, ["images", str(len(archived))]), cli.stderr

    copy = tmp_path / "bucket-copy"
    bucket.fs.get(f"{bucket.name}/", str(copy), recursive=True)
    assert sum(1 for p in copy.rglob("*") if p.is_file()) == len(archive) + len(table_keys)
    assert phi_leaks(copy, trial.phi_values(), boundary=()) == []


def test_rerun_of_a_batch_adds_no_rows_or_objects(s3_home, bucket, trial):
    planned = trial.batches[1]
    batch_id = intake.stage_batch(
        s3_home, "DEMO-01", planned.site_id, planned.subject_id, planned.visit, [planned.folder]
    )
    for step in ("claim", "deidentify", "verify", "validate", "write_tables", "route"):
        batch.run_task(step, batch_id, s3_home)
    archive, table_keys = bucket.objects("archive"), bucket.objects("tables")
    rows = query.run(s3_home, "SELECT count(*) FROM instances").rows
    assert archive and rows == [(len(archive),)]

    # Airflow retries of tasks that had done their work but not yet recorded it.
    batch.write_tables(s3_home, batch_id)
    batch.route(s3_home, batch_id)
    batch.run_task("finalize", batch_id, s3_home)
    process(s3_home, batch_id)  # the whole batch again: finalized, a no-op

    assert bucket.objects("archive") == archive  # the same objects, none uploaded again
    again = bucket.objects("tables")
    assert {k: v["ETag"] for k, v in again.items() if not k.startswith("batches/")} == {
        k: v["ETag"] for k, v in table_keys.items()
    }
    assert query.run(s3_home, "SELECT count(*) FROM instances").rows == rows
    assert query.run(s3_home, "SELECT count(*) FROM batches").rows == [(1,)]
    assert ledger.batch_summary(s3_home, batch_id)["state"] == "done"


def test_compaction_on_the_object_store_changes_no_query_result(s3_home, bucket):
    for n, site in ((1, "SITE-01"), (2, "SITE-01"), (3, "SITE-02"), (4, "SITE-01")):
        rows = [_row(n * 10 + i, batch_id=f"b{n}") for i in range(3)]
        tables.write_batch(s3_home, "instances", "DEMO-01", site, f"b{n}", rows)
    everything = "SELECT * FROM instances ORDER BY sop_instance_uid"
    before = query.run(s3_home, everything).rows

    done = compaction.compact_all(s3_home)

    assert [(c.partition, c.files_merged) for c in done] == [("protocol=DEMO-01/site=SITE-01", 3)]
    site_01 = [k for k in bucket.objects("tables") if "site=SITE-01/" in k]
    assert len(site_01) == 1 and site_01[0].split("/")[-1].startswith("compacted-")
    assert query.run(s3_home, everything).rows == before
    tables.write_batch(s3_home, "instances", "DEMO-01", "SITE-01", "b2", [_row(99, batch_id="b2")])
    counts = query.run(s3_home, "SELECT batch_id, count(*) FROM instances GROUP BY 1 ORDER BY 1")
    assert counts.rows == [("b1", 3), ("b2", 1), ("b3", 3), ("b4", 3)]
    assert tables.read_table(s3_home, "instances").num_rows == 10


def test_a_write_that_fails_half_way_leaves_no_object(s3_home, bucket):
    target = s3_home.table_file("instances", "DEMO-01", "SITE-01", "b1")

    def broken(handle):
        handle.write(b"PAR1 half a table")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        store.write_with(target, broken)
    assert bucket.objects("tables") == {}
    assert not target.exists()


def test_quarantine_on_the_object_store_holds_the_originals_until_released(
    s3_quarantine_home, bucket, protocol, trial, tmp_path, capsys
):
    home = s3_quarantine_home
    planned = next(b for b in trial.batches if b.expect == "unenrolled_subject")
    batch_id = stage(home, planned, check=False)[0]  # by a drop folder: the client would refuse it
    process(home, batch_id, steps=tuple(batch.TASKS)[:-1])  # all but finalize
    # A finalize cut off after it had put the originals: the retry uploads none again.
    worklist = batch._load(home, batch_id, "route")
    refused = [
        (entry, batch.original_path(home, batch_id, entry), "unenrolled_subject", None)
        for entry in worklist.files
        if not entry.expanded
    ]
    quarantine.put(home, worklist, refused)
    first = bucket.objects(f"quarantine/{batch_id}")
    time.sleep(1.1)  # S3 times an object to the second: a second upload would show
    batch.run_task("finalize", batch_id, home)

    held = ledger.file_rows(home, batch_id)
    assert held and {f["disposition"] for f in held} == {"quarantined"}
    objects = bucket.objects(f"quarantine/{batch_id}")
    assert {k: v["LastModified"] for k, v in objects.items() if k != quarantine.RECORD} == {
        k: v["LastModified"] for k, v in first.items() if k != quarantine.RECORD
    }
    originals = sorted(k for k in objects if k.startswith(f"{intake.FILES}/"))
    assert sorted(objects) == sorted([*originals, intake.MANIFEST, quarantine.RECORD])
    assert sorted(_sha256(bucket.read(f"quarantine/{batch_id}/{k}")) for k in originals) == sorted(
        f["sha256_in"] for f in held
    )
    record = json.loads(bucket.read(f"quarantine/{batch_id}/{quarantine.RECORD}"))
    assert {(f["reason"], f["present"]) for f in record["files"]} == {("unenrolled_subject", True)}
    assert quarantine.read_record(home, batch_id) == record
    assert not (home.root / "quarantine" / batch_id).exists()  # nothing of it on local disk
    held_copy = tmp_path / "held"
    bucket.fs.get(f"{bucket.name}/quarantine/", str(held_copy), recursive=True)
    assert phi_leaks(held_copy, trial.phi_values(), boundary=())  # the originals, PHI and all
    assert not home.claimed_batch(batch_id).exists()

    assert main(["--home", str(home.root), "quarantine", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert sorted(r["file_no"] for r in listed if r["batch_id"] == batch_id) == sorted(
        f["file_no"] for f in held
    )

    enroll_late(home, protocol, trial, planned, tmp_path)
    assert main(["--home", str(home.root), "quarantine", "release", batch_id]) == 0
    new_id = capsys.readouterr().out.split(" as batch ")[1].split()[0]
    assert sorted(bucket.objects(f"quarantine/{batch_id}")) == [
        intake.MANIFEST,
        quarantine.RECORD,
    ]  # the originals left the bucket for the inbox
    released = json.loads(bucket.read(f"quarantine/{batch_id}/{quarantine.RECORD}"))
    assert {(f["released_to"], f["present"]) for f in released["files"]} == {(new_id, False)}

    assert [b.batch_id for b in intake.ready_batches(home)] == [new_id]
    process(home, new_id)
    done = ledger.batch_summary(home, new_id)
    assert (done["state"], done["released_from"]) == ("done", batch_id)
    assert done["archived"] == done["files"] == len(held)
    archived = [f for f in ledger.file_rows(home, new_id) if f["disposition"] == "archived"]
    for f in archived:
        assert _sha256(bucket.read(f"archive/{f['archive_path']}")) == f["sha256_out"]
    assert main(["--home", str(home.root), "quarantine", "list"]) == 0
    assert batch_id not in capsys.readouterr().out

    copy = tmp_path / "bucket-copy"
    bucket.fs.get(f"{bucket.name}/", str(copy), recursive=True)
    assert phi_leaks(copy, trial.phi_values(), boundary=("quarantine",)) == []
    assert phi_leaks(home.root, trial.phi_values()) == []


def test_an_upload_to_the_bucket_inbox_is_claimed_processed_and_leaves_nothing_there(
    s3_inbox_home, bucket, trial
):
    home = s3_inbox_home
    planned = trial.batches[1]
    batch_id = intake.stage_batch(
        home, "DEMO-01", planned.site_id, planned.subject_id, planned.visit, [planned.folder]
    )
    uploaded = bucket.objects(f"inbox/DEMO-01/{planned.site_id}/{batch_id}")
    manifest = json.loads(bucket.read(f"inbox/DEMO-01/{planned.site_id}/{batch_id}/manifest.json"))
    assert sorted(uploaded) == sorted(
        [intake.READY, intake.MANIFEST, *(f"{intake.FILES}/{f['path']}" for f in manifest["files"])]
    )
    assert not (home.root / "inbox" / "DEMO-01").exists()  # nothing uploaded to the disk
    assert [b.batch_id for b in intake.ready_batches(home)] == [batch_id]
    assert watch.ready_batch_ids(str(home.root)) == [batch_id]

    # A claim cut off half-way left a download short: the next claim downloads again.
    first = manifest["files"][0]["path"]
    cut = home.claimed / f".{batch_id}.partial" / intake.FILES / first
    cut.parent.mkdir(parents=True)
    cut.write_bytes(b"DICM cut short")
    process(home, batch_id)

    assert ledger.batch_summary(home, batch_id)["state"] == "done"
    assert bucket.objects("inbox") == {}  # the batch's objects are gone
    assert intake.ready_batches(home) == [] and watch.ready_batch_ids(str(home.root)) == []
    assert list(home.claimed.iterdir()) == []  # no partial download, no lock file left
    archive = bucket.objects("archive")
    archived = [f for f in ledger.file_rows(home, batch_id) if f["disposition"] == "archived"]
    assert archive and len(archive) == len(archived)
    rows = query.run(home, "SELECT count(*) FROM instances").rows

    process(home, batch_id)  # a rerun: finalized, a no-op
    assert bucket.objects("archive") == archive and bucket.objects("inbox") == {}
    assert query.run(home, "SELECT count(*) FROM instances").rows == rows
    assert ledger.batch_summary(home, batch_id)["state"] == "done"


def test_a_file_the_site_corrupted_in_the_bucket_inbox_is_quarantined_not_stuck(
    s3_inbox_home, bucket, trial
):
    home = s3_inbox_home
    planned = trial.batches[1]
    batch_id = intake.stage_batch(
        home, "DEMO-01", planned.site_id, planned.subject_id, planned.visit, [planned.folder]
    )
    prefix = f"inbox/DEMO-01/{planned.site_id}/{batch_id}"
    manifest = json.loads(bucket.read(f"{prefix}/{intake.MANIFEST}"))
    corrupted = manifest["files"][0]["path"]
    bucket.fs.pipe_file(f"{bucket.name}/{prefix}/{intake.FILES}/{corrupted}", b"not the upload")

    batch.run_task("claim", batch_id, home)
    # A claim cut off while deleting the objects (READY went first): the retry deletes the rest.
    bucket.fs.pipe_file(f"{bucket.name}/{prefix}/{intake.MANIFEST}", json.dumps(manifest).encode())
    assert intake.ready_batches(home) == []
    intake.claim(home, batch_id)
    assert bucket.objects("inbox") == {}
    process(home, batch_id)  # claimed already: the claim task finds its worklist

    files = {f["file_no"]: f for f in ledger.file_rows(home, batch_id)}
    refused = [f for f in files.values() if f["disposition"] == "quarantined"]
    assert [f["reason"] for f in refused] == ["checksum_mismatch"]
    assert sum(f["disposition"] == "archived" for f in files.values()) == len(files) - 1
    assert ledger.batch_summary(home, batch_id)["state"] == "done"


def test_a_release_repeated_after_the_ingest_took_its_batch_leaves_no_originals_behind(
    s3_inbox_home, protocol, trial, tmp_path, monkeypatch
):
    """A release to the bucket inbox cut off after its upload, before it removed its local
    building folder; the ingest claims the batch; the release repeated removes the folder,
    so no original stays in ``claimed/.release-<id>/``."""
    from pipeline import release

    home = s3_inbox_home
    planned = next(b for b in trial.batches if b.expect == "unenrolled_subject")
    batch_id = stage(home, planned, check=False)[0]  # by a drop folder: the client would refuse it
    process(home, batch_id)
    enroll_late(home, protocol, trial, planned, tmp_path)

    class CutOff(Exception):
        pass

    def cut_off(folder):
        raise CutOff

    with monkeypatch.context() as patched:
        patched.setattr(release.intake, "remove_tree", cut_off)
        with pytest.raises(CutOff):
            release.release(home, batch_id)
    (ready,) = intake.ready_batches(home)
    building = home.claimed / f".release-{ready.batch_id}"
    assert any(p.is_file() for p in building.rglob("*"))
    batch.run_task("claim", ready.batch_id, home)
    assert release.release(home, batch_id)[0] == ready.batch_id
    assert not building.exists()
    process(home, ready.batch_id)
    assert ledger.batch_summary(home, ready.batch_id)["state"] == "done"
