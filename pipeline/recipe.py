"""Composing a protocol's de-identification recipe from layers, in deid's grammar.

Layers, in order: the base profile (``recipes/base/deid.dicom``), one file per option the
protocol claims (``recipes/base/options/<option>.dicom``), then the protocol's own
``deid.dicom``. A later layer *overrides* an earlier one: an action on a field selector that
an earlier layer also names replaces the earlier action in place. deid itself would run both
(a KEEP anywhere wins, a function runs twice, a BLANK before a REPLACE loses the value), which
is not what a reviewer reading "the protocol overrides the base" expects.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

ACTIONS = ("ADD", "REPLACE", "REMOVE", "KEEP", "BLANK", "JITTER")
_SECTION = re.compile(r"^%(\w+)\s*(.*)$")


class RecipeError(ValueError):
    """A recipe line that cannot be understood; the message names file and line."""


@dataclass(frozen=True)
class HeaderAction:
    action: str
    selector: str
    value: str
    source: str  # "file:line", for provenance comments and error messages

    def line(self) -> str:
        return " ".join(p for p in (self.action, self.selector, self.value) if p)


@dataclass(frozen=True)
class ComposedRecipe:
    text: str
    actions: tuple[HeaderAction, ...]
    digest: str

    @functools.cached_property
    def kept(self) -> frozenset[str]:
        """Attributes whose values the composed recipe keeps on purpose (KEEP, or kept and
        cleaned of the subject's identifying values): their own values are not PHI."""
        return frozenset(
            a.selector
            for a in self.actions
            if a.action == "KEEP" or (a.action == "REPLACE" and a.value == "func:clean_text")
        )

    @property
    def path(self) -> Path:
        """The composed recipe as a file, which is what deid's DeidRecipe reads."""
        return _materialise(self.text, self.digest)


def parse_header_actions(path: Path) -> tuple[list[HeaderAction], list[str]]:
    """The ``%header`` actions of one recipe file, plus its other sections verbatim."""
    actions: list[HeaderAction] = []
    other: list[str] = []
    section = None
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{path.name}:{number}"
        if line.upper().startswith("FORMAT"):
            if line.split()[-1].lower() != "dicom":
                raise RecipeError(f"{where}: only FORMAT dicom is supported")
            continue
        match = _SECTION.match(line)
        if match:
            section = match.group(1).lower()
            if section != "header":
                other.append(raw)
            continue
        if section != "header":
            if section is None:
                raise RecipeError(f"{where}: action outside a section (start with %header)")
            other.append(raw)
            continue
        parts = line.split(None, 2)
        action = parts[0].upper()
        if action not in ACTIONS:
            raise RecipeError(
                f"{where}: unknown action {parts[0]!r} (expected {', '.join(ACTIONS)})"
            )
        if len(parts) < 2:
            raise RecipeError(f"{where}: {action} needs a field")
        value = parts[2].strip() if len(parts) > 2 else ""
        if action in ("ADD", "REPLACE", "JITTER") and not value:
            raise RecipeError(f"{where}: {action} {parts[1]} needs a value")
        actions.append(HeaderAction(action, parts[1], value, where))
    return actions, other


def compose(files: tuple[Path, ...]) -> ComposedRecipe:
    """Merge recipe layers with override-by-selector semantics (see module docstring)."""
    merged: dict[str, HeaderAction] = {}
    others: list[str] = []
    for path in files:
        actions, other = parse_header_actions(path)
        for action in actions:
            key = action.selector.lower()
            if key in merged and merged[key].source.split(":")[0] == path.name:
                # Two actions on one selector in one file: both stand (e.g. REMOVE ALL + KEEP).
                key = f"{key}#{action.source}"
            merged[key] = action
        others.extend(other)
    ordered = tuple(merged.values())
    lines = ["FORMAT dicom", "", "%header", ""]
    lines += [a.line() for a in ordered]
    if others:
        lines += ["", *others]
    text = "\n".join(lines) + "\n"
    return ComposedRecipe(text, ordered, hashlib.sha256(text.encode()).hexdigest()[:16])


@lru_cache(maxsize=32)
def _materialise(text: str, digest: str) -> Path:
    folder = Path(tempfile.gettempdir()) / "trialpipe-recipes"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{digest}.dicom"
    if not path.exists():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return path
