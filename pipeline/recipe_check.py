"""``trialpipe recipe check``: what a recipe author gets wrong, found before any file is.

Checks a protocol's ``protocol.yaml`` and every layer of its recipe: syntax, attribute
keywords pydicom does not know, functions and variables trialpipe does not supply (deid
would quietly leave the original value), KEEPs of attributes the Basic Profile changes that
no claimed option retains, and the stamps every output must carry. Each problem is one line
``file:line: message``.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from pydicom.datadict import keyword_dict

from pipeline.annex_e import load_table, option_action
from pipeline.deidentify import RECIPE_FUNCTIONS, RECIPE_VARIABLES
from pipeline.home import recipes_dir
from pipeline.protocol import ProtocolError, load_protocol
from pipeline.recipe import HeaderAction, RecipeError, compose, parse_header_actions

_TAG = re.compile(r"^\(?[0-9A-Fa-f]{4},?[0-9A-Fa-f]{4}\)?$")
REQUIRED_STAMPS = ("PatientIdentityRemoved", "LongitudinalTemporalInformationModified")


def check(protocol_id: str) -> list[str]:
    """Every problem found in the protocol and its recipe layers (empty: all good)."""
    path = recipes_dir() / protocol_id / "protocol.yaml"
    if not path.is_file():
        return [f"{path}: no such protocol"]
    problems = _yaml_problems(path)
    if problems:
        return problems
    try:
        protocol = load_protocol(protocol_id)
    except ProtocolError as error:
        return [str(error)]
    problems += _required_tag_problems(path, protocol.required_tags)
    layers: list[HeaderAction] = []
    for layer in protocol.recipe_files:
        try:
            actions, _ = parse_header_actions(layer)
        except RecipeError as error:
            problems.append(f"{layer.parent.name}/{error}")
            continue
        layers += actions
        problems += [f"{layer.parent.name}/{p}" for p in _action_problems(actions)]
    if problems:
        return problems
    problems += _keep_problems(protocol.recipe_files[-1], protocol.options)
    composed = compose(protocol.recipe_files)
    added = {a.selector for a in composed.actions if a.action == "ADD"}
    removed = {a.selector for a in composed.actions if a.action in ("REMOVE", "BLANK")}
    for stamp in REQUIRED_STAMPS:
        if stamp not in added or stamp in removed:
            problems.append(
                f"{protocol.recipe_files[-1].name}: the composed recipe must ADD "
                f"{stamp} and never remove it"
            )
    return problems


def _yaml_problems(path: Path) -> list[str]:
    try:
        yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = mark.line + 1 if mark else 0
        return [f"{path.name}:{line}: not valid YAML ({getattr(error, 'problem', error)})"]
    return []


def _line_of(path: Path, text: str) -> int:
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if text in line:
            return number
    return 0


def _required_tag_problems(path: Path, required: dict) -> list[str]:
    problems = []
    for modality, rules in required.items():
        for rule in rules:
            if rule.keyword not in keyword_dict:
                problems.append(
                    f"{path.name}:{_line_of(path, rule.keyword)}: required tag "
                    f"{rule.keyword!r} for {modality} is not a DICOM keyword"
                )
    return problems


def _selector_known(selector: str) -> bool:
    return (
        selector in keyword_dict
        or bool(_TAG.match(selector))
        or ":" in selector
        or selector.upper() == "ALL"
        or selector.startswith("(")
    )


def _action_problems(actions: list[HeaderAction]) -> list[str]:
    problems = []
    for action in actions:
        if not _selector_known(action.selector):
            problems.append(f"{action.source}: unknown attribute keyword {action.selector!r}")
        kind, _, name = action.value.partition(":")
        if kind == "func" and name not in RECIPE_FUNCTIONS:
            problems.append(
                f"{action.source}: unknown function {name!r} (known: "
                f"{', '.join(sorted(RECIPE_FUNCTIONS))}); deid would keep the "
                "original value"
            )
        if kind == "var" and name not in RECIPE_VARIABLES:
            problems.append(
                f"{action.source}: unknown variable {name!r} (known: "
                f"{', '.join(sorted(RECIPE_VARIABLES))}); deid would keep the "
                "original value"
            )
    return problems


def _keep_problems(protocol_layer: Path, options: tuple[str, ...]) -> list[str]:
    """A protocol may only keep what the profile changes if a claimed option retains it."""
    actions, _ = parse_header_actions(protocol_layer)
    rows = {row.selector: row for row in load_table()}
    problems = []
    for action in actions:
        row = rows.get(action.selector)
        if action.action != "KEEP" or row is None:
            continue
        if not any(option_action(option, row) for option in options):
            problems.append(
                f"{action.source}: KEEP {action.selector} keeps an attribute the Basic "
                f"Profile changes ({row.basic}) and no claimed option retains it"
            )
    return problems
