"""Keyed pseudonyms: UIDs by HMAC under the trial's secret, per-subject date offsets.

The secret is created once per protocol under ``restricted/secrets/`` and never leaves it,
unless the deployment provides the keys (``$TRIALPIPE_SECRETS_DIR``): then each is read from
there and never created. The same original always maps to the same pseudonym, so a subject's
visits link up across batches, while nobody without the secret can recompute or reverse the
mapping.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
import secrets
from functools import lru_cache
from pathlib import Path

from pipeline import atomic
from pipeline.home import DataHome


class MissingTrialSecret(RuntimeError):
    """The deployment provides the trial keys, but not this protocol's."""


def trial_secret(home: DataHome, protocol_id: str) -> bytes:
    """The per-trial HMAC key, created on first use with owner-only permissions.

    A key the deployment provides is only read: workers that each made up their own key
    would give one subject different pseudonyms, so a missing one stops the task instead.
    """
    path = home.secret_file(protocol_id)
    if home.provides_secrets and not path.exists():
        raise MissingTrialSecret(f"no trial key {path.name} in $TRIALPIPE_SECRETS_DIR")
    return _read_or_create(path)


@lru_cache(maxsize=16)
def _read_or_create(path: Path) -> bytes:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)
    # Created once: no reader ever sees a key half-written (or left empty by a full disk),
    # and of two processes creating it at once both read the first one's key.
    key = bytes.fromhex(atomic.create_secret(path, secrets.token_hex(32) + "\n").strip())
    if len(key) < 32:
        raise ValueError(f"trial secret {path} is too short")
    return key


def keyed_digest(key: bytes, purpose: str, value: str) -> bytes:
    """HMAC-SHA256 of ``value`` for one ``purpose`` (so a UID and an ID never collide)."""
    return hmac.new(key, f"{purpose}\x00{value}".encode(), hashlib.sha256).digest()


def pseudonymous_uid(key: bytes, uid_root: str, original: str) -> str:
    """Map a UID to a new one under ``uid_root`` (``2.25`` or the protocol's root).

    The suffix is a decimal number from the HMAC, as long as the 64-character limit allows
    (the full 128 bits under ``2.25``, per PS3.5 B.2).
    """
    digest = int.from_bytes(keyed_digest(key, "uid", original.strip())[:16], "big")
    room = 64 - len(uid_root) - 1
    suffix = digest % (10 ** min(room, 39))
    return f"{uid_root}.{suffix or 1}"


def patient_fingerprint(key: bytes, patient_id: str, patient_name: str, birth_date: str) -> str:
    """A keyed fingerprint of the patient a file belongs to, for wrong-patient checks.

    The PatientID is the identity a site's PACS keeps stable; the name and birth date only
    count when no ID is present.
    """
    identity = patient_id.strip().upper() or f"{patient_name.strip().upper()}|{birth_date}"
    return keyed_digest(key, "patient", identity).hex()


def date_offset_days(randomization: dt.date, anchor: dt.date) -> int:
    """Days to add to the subject's dates so that randomization falls on the anchor date.

    Every date of the subject moves by the same amount, so intervals are kept and the
    shifted date minus the anchor is the study day.
    """
    return (anchor - randomization).days
