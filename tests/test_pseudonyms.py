import datetime as dt
import re

import pytest

from pipeline.home import data_home
from pipeline.pseudonyms import (
    MissingTrialSecret,
    date_offset_days,
    patient_fingerprint,
    pseudonymous_uid,
    trial_secret,
)

UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
ORIGINAL = "1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322"


def test_uid_pseudonyms_are_stable_valid_and_keyed():
    key, other = b"k" * 32, b"x" * 32
    uid = pseudonymous_uid(key, "2.25", ORIGINAL)
    assert uid == pseudonymous_uid(key, "2.25", ORIGINAL)
    assert uid != pseudonymous_uid(other, "2.25", ORIGINAL)
    assert uid.startswith("2.25.") and UID.match(uid) and len(uid) <= 64


def test_uid_pseudonyms_fit_64_characters_under_a_long_root():
    root = "1.2.826.0.1.3680043.10.999.123456789.42"
    uid = pseudonymous_uid(b"k" * 32, root, ORIGINAL)
    assert uid.startswith(root + ".") and len(uid) <= 64 and UID.match(uid)


def test_trial_secret_is_created_once_and_private(home):
    key = trial_secret(home, "DEMO-01")
    assert len(key) == 32
    assert trial_secret(home, "DEMO-01") == key
    assert home.secret_file("DEMO-01").stat().st_mode & 0o077 == 0


def test_randomization_day_maps_to_the_anchor():
    offset = date_offset_days(dt.date(2025, 3, 4), dt.date(2000, 1, 1))
    assert dt.date(2025, 3, 4) + dt.timedelta(days=offset) == dt.date(2000, 1, 1)


def test_patient_fingerprint_ignores_case_and_falls_back_to_name_and_birth_date():
    key = b"k" * 32
    assert patient_fingerprint(key, "mrn1", "A^B", "") == patient_fingerprint(key, "MRN1", "", "")
    assert patient_fingerprint(key, "", "DOE^JO", "19700101") != patient_fingerprint(
        key, "", "DOE^JO", "19700102"
    )


def test_a_trial_key_the_deployment_provides_is_read_not_replaced(home, tmp_path, monkeypatch):
    provided = tmp_path / "run-secrets"
    provided.mkdir()
    (provided / "DEMO-01.key").write_text("ab" * 32 + "\n")
    monkeypatch.setenv("TRIALPIPE_HOME", str(home.root))
    monkeypatch.setenv("TRIALPIPE_SECRETS_DIR", str(provided))
    deployed = data_home()
    assert trial_secret(deployed, "DEMO-01") == bytes.fromhex("ab" * 32)
    assert not (home.restricted / "secrets").exists()


def test_a_missing_provided_trial_key_stops_instead_of_making_a_new_one(
    home, tmp_path, monkeypatch
):
    provided = tmp_path / "run-secrets"
    provided.mkdir()
    monkeypatch.setenv("TRIALPIPE_HOME", str(home.root))
    monkeypatch.setenv("TRIALPIPE_SECRETS_DIR", str(provided))
    with pytest.raises(MissingTrialSecret):
        trial_secret(data_home(), "DEMO-01")
    assert list(provided.iterdir()) == []
