"""Loading a protocol definition (``recipes/<PROTOCOL-ID>/protocol.yaml``).

The protocol is policy as data: sites, arms, visits, the UID root, the date policy, the
de-identification options it claims and the tags each modality must carry. Nothing in the
pipeline branches on a protocol's name; it reads this object.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from pipeline.annex_e import option_codes
from pipeline.home import recipes_dir


class ProtocolError(ValueError):
    """The protocol is unknown or its definition is invalid."""


@dataclass(frozen=True)
class Visit:
    visit_id: str
    day: int
    window_days: int


@dataclass(frozen=True)
class TagRule:
    """A protocol's requirement on one attribute of one modality."""

    keyword: str
    on_failure: str = "quarantine"  # or "flag": record a finding, archive anyway
    min: float | None = None
    max: float | None = None
    allowed: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Limits:
    """What one upload may hold before it is refused unread (protocol.yaml ``intake``)."""

    max_file_mb: float = 2048
    max_archive_mb: float = 16384  # a zip's total expanded size
    max_archive_files: int = 20000
    max_expansion_ratio: float = 1000  # expanded bytes per zipped byte, a zip bomb's mark

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_mb * 1024 * 1024)

    @property
    def max_archive_bytes(self) -> int:
        return int(self.max_archive_mb * 1024 * 1024)


@dataclass(frozen=True)
class SafePrivate:
    """Private elements a protocol keeps under Retain Safe Private: in ``group``, the block
    reserved by ``creator``, the element offsets listed (0x00-0xFF)."""

    group: int
    creator: str
    elements: frozenset[int]


@dataclass(frozen=True)
class Protocol:
    protocol_id: str
    name: str
    sponsor: str
    uid_root: str
    date_anchor: dt.date
    arms: tuple[str, ...]
    sites: tuple[str, ...]
    visits: tuple[Visit, ...]
    options: tuple[str, ...]
    required_tags: dict[str, tuple[TagRule, ...]]
    recipe_files: tuple[Path, ...]
    recipe_version: str
    folder: Path
    safe_private: tuple[SafePrivate, ...] = ()
    limits: Limits = Limits()

    @property
    def visit_ids(self) -> tuple[str, ...]:
        return tuple(v.visit_id for v in self.visits)


def known_protocols() -> list[str]:
    """IDs of the protocols defined under ``recipes/``."""
    return sorted(p.parent.name for p in recipes_dir().glob("*/protocol.yaml"))


@lru_cache(maxsize=16)
def load_protocol(protocol_id: str) -> Protocol:
    """Read and check ``recipes/<protocol_id>/protocol.yaml``."""
    folder = recipes_dir() / protocol_id
    path = folder / "protocol.yaml"
    if not path.is_file():
        raise ProtocolError(f"unknown protocol {protocol_id!r}")
    raw = yaml.safe_load(path.read_text()) or {}
    if raw.get("protocol_id") != protocol_id:
        raise ProtocolError(f"{path}: protocol_id must be {protocol_id!r}")
    try:
        deid = raw.get("deidentification", {})
        options = tuple(str(o) for o in deid.get("options", []))
        unknown = sorted(set(options) - set(option_codes()))
        if unknown:
            raise ProtocolError(f"{path}: unknown de-identification option(s) {unknown}")
        option_layers = (recipes_dir() / "base" / "options" / f"{o}.dicom" for o in options)
        recipe_files = (
            recipes_dir() / "base" / "deid.dicom",
            *(layer for layer in option_layers if layer.exists()),
            recipes_dir() / "base" / "trial.dicom",
            folder / "deid.dicom",
        )
        for recipe in recipe_files:
            if not recipe.is_file():
                raise ProtocolError(f"{path}: recipe {recipe} does not exist")
        digest = hashlib.sha256()
        for recipe in recipe_files:
            digest.update(recipe.read_bytes())
        digest.update(path.read_bytes())
        return Protocol(
            protocol_id=protocol_id,
            name=str(raw["name"]),
            sponsor=str(raw.get("sponsor", "")),
            uid_root=str(raw.get("uid_root", "2.25")),
            date_anchor=_as_date(raw.get("dates", {}).get("anchor", "2000-01-01")),
            arms=tuple(str(a) for a in raw["arms"]),
            sites=tuple(str(s) for s in raw["sites"]),
            visits=tuple(
                Visit(str(v["id"]), int(v.get("day", 0)), int(v.get("window_days", 0)))
                for v in raw["visits"]
            ),
            options=options,
            required_tags={
                str(modality): tuple(_tag_rule(rule) for rule in rules)
                for modality, rules in (raw.get("required_tags") or {}).items()
            },
            recipe_files=recipe_files,
            recipe_version=f"{protocol_id}@{digest.hexdigest()[:12]}",
            folder=folder,
            safe_private=(
                tuple(_safe_private(item) for item in deid.get("safe_private") or [])
                if "retain_safe_private" in options
                else ()
            ),
            limits=Limits(**(raw.get("intake") or {})),
        )
    except (KeyError, TypeError, ValueError) as error:
        if isinstance(error, ProtocolError):
            raise
        raise ProtocolError(f"{path}: invalid protocol definition ({error})") from error


def _as_date(value: Any) -> dt.date:
    return value if isinstance(value, dt.date) else dt.date.fromisoformat(str(value))


def _safe_private(item: Any) -> SafePrivate:
    return SafePrivate(
        group=int(str(item["group"]), 16),
        creator=str(item["creator"]),
        elements=frozenset(int(str(e), 16) for e in item["elements"]),
    )


def _tag_rule(rule: Any) -> TagRule:
    if isinstance(rule, str):
        return TagRule(rule)
    allowed = rule.get("allowed")
    return TagRule(
        keyword=str(rule["tag"]),
        on_failure=str(rule.get("on_failure", "quarantine")),
        min=rule.get("min"),
        max=rule.get("max"),
        allowed=tuple(str(a) for a in allowed) if allowed else None,
    )
