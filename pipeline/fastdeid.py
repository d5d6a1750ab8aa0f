"""deid's recipe actions, compiled once per batch and applied in one pass per file.

deid's ``DicomParser`` re-expands every action's field expression against every element of
every file (about 30 ms a file for a PS3.15 recipe). A trialpipe recipe names its fields by
keyword or tag, so each action's targets are a dictionary lookup; this module builds that
dictionary per file in one walk and runs the actions with deid's own semantics:

- the fields are every element of the dataset and its file meta, sequences expanded at any
  depth, minus deid's configured skip list and any tag a top-level KEEP names;
- REMOVE deletes (unless a REPLACE or JITTER names the field), BLANK sets the value to
  None, REPLACE sets what ``deid.utils.actions.parse_value`` returns (a func, a var, or a
  literal converted to the VR) unless that is None, ADD sets or creates a top-level element;
- actions run in recipe order, and a removed or blanked sequence takes its items' fields
  with it.

A recipe using anything else (expanders such as ``contains:``, values or fields lists,
JITTER, private-creator syntax) is not compiled: :attr:`CompiledRecipe.supported` is False
and the caller uses deid's parser. tests/test_differential.py holds this module to deid's
result on every corpus file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from deid.config import DeidRecipe
from deid.dicom.fields import DicomField
from deid.dicom.tags import get_tag
from deid.utils.actions import parse_value
from pydicom.datadict import DicomDictionary
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

_SUPPORTED = {"REMOVE", "BLANK", "REPLACE", "ADD", "KEEP"}
_PLAIN = re.compile(r"^[A-Za-z0-9]+$|^\([0-9A-Fa-f]{4},[0-9A-Fa-f]{4}\)$")


def _deid_config() -> dict[str, Any]:
    return json.loads(resources.files("deid.dicom").joinpath("config.json").read_text())


@dataclass(eq=False)
class _Field:
    element: DataElement
    name: str
    uid: str
    is_filemeta: bool
    parent: Dataset
    children: list[_Field] = field(default_factory=list)
    alive: bool = True

    def kill(self) -> None:
        self.alive = False
        for child in self.children:
            child.kill()


@dataclass(frozen=True)
class _Action:
    action: str
    field: str
    value: str | None


class CompiledRecipe:
    """A deid recipe ready to apply by lookup; build once per batch."""

    def __init__(self, recipe: DeidRecipe) -> None:
        config = _deid_config()
        self.skip = frozenset(config.get("get", {}).get("skip", []))
        actions = recipe.get_actions() or []
        self.actions = [
            _Action(a["action"], a["field"], a.get("value")) for a in actions if a.get("field")
        ]
        self.supported = (
            not recipe.has_values_lists()
            and not recipe.has_fields_lists()
            and all(a.action in _SUPPORTED and _PLAIN.match(a.field) for a in self.actions)
            and all(a["action"] in _SUPPORTED for a in config.get("put", {}).get("actions", []))
        )
        self.kept = {a.field.lower() for a in self.actions if a.action == "KEEP"}
        # Dictionary names that are one word equal to a recipe field (deid matches names).
        wanted = {a.field.lower() for a in self.actions}
        self.wanted = frozenset(wanted)
        # tag -> the recipe fields naming it; the same for every file, so found once.
        self._matches: dict[int, frozenset[str]] = {}
        self.named: dict[int, set[str]] = {}
        for tag, entry in DicomDictionary.items():
            if entry[2].lower() in wanted:
                self.named.setdefault(tag, set()).add(entry[2].lower())
        self.protected = [a.field.lower() for a in self.actions if a.action == "REPLACE"]
        self.added: dict[str, dict[str, Any] | None] = {}
        for action in self.actions:
            if action.action == "ADD":
                found = get_tag(action.field)
                self.added[action.field] = found or None
                if not found:
                    self.supported = False

    def _keys(self, element: DataElement) -> frozenset[str]:
        """The recipe fields naming ``element`` by a spelling deid's exact match accepts:
        keyword, tag, bare tag or dictionary name (``named``). A nested element's name
        and uid hold "__", which no plain field can, so only these spellings can match,
        and they depend on the tag alone."""
        tag = element.tag
        keys = self._matches.get(tag)
        if keys is None:
            text = str(tag).lower()
            spelled = {element.keyword.lower(), text, text[1:5] + text[6:10]}
            spelled |= self.named.get(int(tag), set())
            keys = self._matches[tag] = frozenset(spelled & self.wanted)
        return keys

    def apply(self, ds: Dataset, lookup: dict[str, Any]) -> None:
        """Run the recipe on ``ds`` in place, ``lookup`` holding deid's vars and funcs."""
        skip = self.skip | self._kept_tags(ds)
        fields = self._fields(ds, skip)
        index: dict[str, list[_Field]] = {}
        for item in fields.values():
            for key in self._keys(item.element):
                index.setdefault(key, []).append(item)
        protected = {id(f) for name in self.protected for f in index.get(name, [])}
        for action in self.actions:
            if action.action == "ADD":
                self._add(ds, action, lookup, fields, index)
                continue
            if action.action == "KEEP":
                continue
            targets = [f for f in index.get(action.field.lower(), []) if f.alive]
            for target in targets:
                if action.action == "REPLACE":
                    value = parse_value(
                        dicom=ds,
                        value=action.value,
                        item=lookup,
                        field=DicomField(
                            target.element, target.name, target.uid, target.is_filemeta
                        ),
                    )
                    if value is not None:
                        target.element.value = value
                elif action.action == "BLANK":
                    if target.element.tag in target.parent:
                        target.parent[target.element.tag].value = None
                        for child in target.children:
                            child.kill()
                elif action.action == "REMOVE":
                    if id(target) in protected:  # deid replaces what a REPLACE names
                        continue
                    if target.element.tag in target.parent:
                        del target.parent[target.element.tag]
                        target.kill()

    def _kept_tags(self, ds: Dataset) -> frozenset[str]:
        """Tags of top-level elements a KEEP names: deid skips that tag at every depth."""
        if not self.kept:
            return frozenset()
        kept = set()
        for dataset in (ds, getattr(ds, "file_meta", None)):
            if not dataset:
                continue
            for element in dataset:
                if self._keys(element) & self.kept:
                    kept.add(str(element.tag))
        # Nested matches count too when the same tag also appears at the top level; deid
        # compares the skip list with each element's bare tag, so only top-level uids bite.
        return frozenset(kept)

    def _fields(self, ds: Dataset, skip: frozenset[str]) -> dict[str, _Field]:
        fields: dict[str, _Field] = {}
        queue: list[tuple[Dataset, str | None, str | None, bool, _Field | None]] = [
            (ds, None, None, False, None)
        ]
        meta = ds.get("file_meta")
        if meta:
            queue.append((meta, None, None, True, None))
        while queue:
            dataset, prefix, parent_uid, is_meta, owner = queue.pop(0)
            for element in dataset:
                if element.keyword in skip or str(element.tag) in skip:
                    continue
                name = element.keyword if prefix is None else f"{prefix}__{element.keyword}"
                uid = str(element.tag) if parent_uid is None else f"{parent_uid}__{element.tag}"
                if uid in fields:
                    continue
                item = _Field(element, name, uid, is_meta, dataset)
                fields[uid] = item
                if owner is not None:
                    owner.children.append(item)
                if isinstance(element.value, Sequence):
                    for number, child in enumerate(element.value):
                        if isinstance(child, Dataset):
                            queue.append((child, name, f"{uid}__{number}", is_meta, item))
        # Items queued under an owner report to it, so removing a sequence removes them.
        return fields

    def _add(
        self,
        ds: Dataset,
        action: _Action,
        lookup: dict[str, Any],
        fields: dict[str, _Field],
        index: dict[str, list[_Field]],
    ) -> None:
        value = parse_value(dicom=ds, value=action.value, item=lookup, field=action.field)
        if value is None:
            return
        tag = self.added[action.field]
        assert tag is not None  # unsupported recipes never get here
        uid = str(tag["tag"])
        existing = fields.get(uid)
        if existing is not None and existing.alive:
            existing.element.value = value
            return
        element = DataElement(tag["tag"], tag["VR"], value)
        is_meta = uid.startswith("(0002")
        target = ds.file_meta if is_meta else ds
        target[element.tag] = element
        item = _Field(element, action.field, uid, is_meta, target)
        fields[uid] = item
        for key in self._keys(element):
            index.setdefault(key, []).append(item)
