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
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from pydicom.datadict import DicomDictionary
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag

from pipeline import deferred
from pipeline.dicomio import element_vr
from pipeline.dicomscan import keyword, tag_text

# deid imports matplotlib to draw cleaned images, which trialpipe never asks of it: put
# off until used (before deid is first imported, here).
deferred.defer(("matplotlib", "matplotlib.pyplot"))

from deid.config import DeidRecipe  # noqa: E402
from deid.dicom.fields import DicomField  # noqa: E402
from deid.dicom.tags import get_tag  # noqa: E402
from deid.utils.actions import parse_value  # noqa: E402

_SUPPORTED = {"REMOVE", "BLANK", "REPLACE", "ADD", "KEEP"}
_PLAIN = re.compile(r"^[A-Za-z0-9]+$|^\([0-9A-Fa-f]{4},[0-9A-Fa-f]{4}\)$")


def _deid_config() -> dict[str, Any]:
    return json.loads(resources.files("deid.dicom").joinpath("config.json").read_text())


@dataclass(eq=False)
class _Field:
    """One element deid would see, by where it is; its value is decoded only when an
    action needs it (most elements are named by no action and stay as read)."""

    tag: BaseTag
    name: str
    uid: str
    is_filemeta: bool
    parent: Dataset
    children: list[_Field] = field(default_factory=list)
    alive: bool = True

    @property
    def element(self) -> DataElement:
        return self.parent[self.tag]

    def deid_field(self) -> DicomField:
        """The field as deid hands it to a recipe function."""
        return DicomField(self.element, self.name, self.uid, self.is_filemeta)

    def kill(self) -> None:
        self.alive = False
        for child in self.children:
            child.kill()


@dataclass(frozen=True)
class _Action:
    action: str
    field: str
    value: str | None

    @property
    def variable(self) -> str | None:
        """The variable a ``var:`` value names (deid's parse_value looks it up and gives
        None when the lookup lacks it), else None."""
        if self.value and self.value.startswith("var:"):
            return self.value[4:]
        return None


def _value(action: _Action, ds: Dataset, lookup: dict[str, Any], field: Callable[[], Any]) -> Any:
    """What deid's ``parse_value`` gives for the action's value, ``field()`` making what
    it passes a function. A variable is a lookup, done here: the same answer, without
    decoding the element a function would be given."""
    name = action.variable
    if name is not None:
        return lookup.get(name)
    return parse_value(dicom=ds, value=action.value, item=lookup, field=field())


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
        # Each field's actions by position, so a file runs only the actions naming one of
        # its elements (and every ADD), still in recipe order.
        self._by_field: dict[str, list[int]] = {}
        for position, action in enumerate(self.actions):
            if action.action not in ("ADD", "KEEP"):
                self._by_field.setdefault(action.field.lower(), []).append(position)
        self._adds = [n for n, a in enumerate(self.actions) if a.action == "ADD"]
        self.added: dict[str, dict[str, Any] | None] = {}
        for action in self.actions:
            if action.action == "ADD":
                found = get_tag(action.field)
                self.added[action.field] = found or None
                if not found:
                    self.supported = False

    def _keys(self, tag: BaseTag) -> frozenset[str]:
        """The recipe fields naming the element ``tag`` by a spelling deid's exact match
        accepts: keyword, tag, bare tag or dictionary name (``named``). A nested element's
        name and uid hold "__", which no plain field can, so only these spellings can
        match, and they depend on the tag alone."""
        number = int(tag)  # an int key: BaseTag compares in Python, slowly
        keys = self._matches.get(number)
        if keys is None:
            text = tag_text(number).lower()
            spelled = {keyword(number).lower(), text, text[1:5] + text[6:10]}
            spelled |= self.named.get(number, set())
            keys = self._matches[number] = frozenset((spelled - {""}) & self.wanted)
        return keys

    def apply(self, ds: Dataset, lookup: dict[str, Any]) -> None:
        """Run the recipe on ``ds`` in place, ``lookup`` holding deid's vars and funcs."""
        fields = self._fields(ds, self._kept_tags(ds))
        index: dict[str, list[_Field]] = {}
        for item in fields.values():
            for key in self._keys(item.tag):
                index.setdefault(key, []).append(item)
        protected = {id(f) for name in self.protected for f in index.get(name, [])}
        positions = {n for key in index for n in self._by_field.get(key, ())}
        for position in sorted(positions.union(self._adds)):
            action = self.actions[position]
            if action.action == "ADD":
                self._add(ds, action, lookup, fields, index)
                continue
            targets = [f for f in index.get(action.field.lower(), []) if f.alive]
            for target in targets:
                if action.action == "REPLACE":
                    value = _value(action, ds, lookup, target.deid_field)
                    if value is not None:
                        target.element.value = value
                elif action.action == "BLANK":
                    if target.tag in target.parent:
                        target.parent[target.tag].value = None
                        for child in target.children:
                            child.kill()
                elif action.action == "REMOVE":
                    if id(target) in protected:  # deid replaces what a REPLACE names
                        continue
                    if target.tag in target.parent:
                        del target.parent[target.tag]
                        target.kill()

    def _kept_tags(self, ds: Dataset) -> frozenset[int]:
        """Tags of top-level elements a KEEP names: deid skips that tag at every depth."""
        if not self.kept:
            return frozenset()
        kept = set()
        for dataset in (ds, getattr(ds, "file_meta", None)):
            if not dataset:
                continue
            for tag in dataset._dict:
                if self._keys(tag) & self.kept:
                    kept.add(int(tag))
        # Nested matches count too when the same tag also appears at the top level; deid
        # compares the skip list with each element's bare tag, so only top-level uids bite.
        return frozenset(kept)

    def _fields(self, ds: Dataset, kept: frozenset[int]) -> dict[str, _Field]:
        """The fields an action names, and every sequence (whose removal takes its items'
        fields with it), in deid's order: the dataset, the file meta, then items."""
        fields: dict[str, _Field] = {}
        queue: list[tuple[Dataset, str | None, str | None, bool, _Field | None]] = [
            (ds, None, None, False, None)
        ]
        meta = ds.get("file_meta")
        if meta:
            queue.append((meta, None, None, True, None))
        while queue:
            dataset, prefix, parent_uid, is_meta, owner = queue.pop(0)
            for tag in list(dataset._dict):
                word = keyword(tag)
                if word in self.skip or tag in kept:
                    continue
                sequence = element_vr(dataset, tag) == "SQ"
                if not sequence and not self._keys(tag):
                    continue
                name = word if prefix is None else f"{prefix}__{word}"
                uid = tag_text(tag) if parent_uid is None else f"{parent_uid}__{tag_text(tag)}"
                if uid in fields:
                    continue
                item = _Field(tag, name, uid, is_meta, dataset)
                fields[uid] = item
                if owner is not None:
                    owner.children.append(item)
                if sequence:
                    for number, child in enumerate(dataset[tag].value or ()):
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
        value = _value(action, ds, lookup, lambda: action.field)
        if value is None:
            return
        tag = self.added[action.field]
        assert tag is not None  # unsupported recipes never get here
        uid = tag_text(tag["tag"])
        existing = fields.get(uid)
        if existing is not None and existing.alive:
            existing.element.value = value
            return
        element = DataElement(tag["tag"], tag["VR"], value)
        is_meta = uid.startswith("(0002")
        target = ds.file_meta if is_meta else ds
        target[element.tag] = element
        item = _Field(element.tag, action.field, uid, is_meta, target)
        fields[uid] = item
        for key in self._keys(element.tag):
            index.setdefault(key, []).append(item)
