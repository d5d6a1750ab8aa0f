"""Required-tag validation with Great Expectations, one suite per protocol and modality.

The protocol's ``required_tags`` are compiled into expectations (not-null, range, allowed
set) and run on the de-identified metadata of a batch. A failure becomes a finding with a
reason code; the protocol's ``on_failure`` says whether it quarantines the file or only
flags it. Great Expectations is imported here, inside the task, never at DAG parse time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from pipeline.protocol import Protocol, TagRule
from pipeline.reasons import Reason

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")


@dataclass(frozen=True)
class Finding:
    """One failed rule for one file; ``quarantine`` False means archive and flag."""

    file_no: int
    keyword: str
    reason: Reason
    quarantine: bool

    @property
    def detail(self) -> str:
        return f"{self.keyword}: {self.reason.info.summary}"


def normalise(value: Any) -> str | None:
    """A tag value as comparable text (numbers in one canonical form); None if empty."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        parts = [normalise(v) for v in value]
        return "\\".join(p or "" for p in parts) if any(parts) else None
    text = str(value).strip()
    if not text:
        return None
    try:
        return repr(float(text))
    except ValueError:
        return text


def first_number(value: Any) -> float | None:
    """The first numeric value of a tag (for range rules on multi-valued attributes)."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else None
    try:
        return float(str(value).strip())
    except (TypeError, ValueError):
        return None


def required_keywords(protocol: Protocol) -> set[str]:
    """Every attribute some modality's rules look at."""
    return {rule.keyword for rules in protocol.required_tags.values() for rule in rules}


def check_batch(protocol: Protocol, rows: list[dict[str, Any]]) -> list[Finding]:
    """Run the protocol's suites on metadata rows (``file_no``, ``Modality`` and the
    required keywords, raw values); return the findings."""
    import great_expectations as gx
    import pandas as pd
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_pandas("batch")
    findings: list[Finding] = []
    for modality, rules in sorted(protocol.required_tags.items()):
        selected = [r for r in rows if str(r.get("Modality", "")) == modality]
        if not selected:
            continue
        frame = pd.DataFrame(
            {
                "file_no": [r["file_no"] for r in selected],
                **{
                    rule.keyword: [_cell(rule, r.get(rule.keyword)) for r in selected]
                    for rule in rules
                },
            }
        )
        suite = context.suites.add(gx.ExpectationSuite(name=f"{protocol.protocol_id}.{modality}"))
        meta: list[tuple[TagRule, Reason]] = []
        for rule in rules:
            for expectation, reason in _expectations(gx, rule):
                suite.add_expectation(expectation)
                meta.append((rule, reason))
        asset = source.add_dataframe_asset(modality)
        definition = asset.add_batch_definition_whole_dataframe(f"{modality}-rows")
        validation = context.validation_definitions.add(
            gx.ValidationDefinition(
                name=f"{protocol.protocol_id}.{modality}", data=definition, suite=suite
            )
        )
        result = validation.run(
            batch_parameters={"dataframe": frame},
            result_format={
                "result_format": "COMPLETE",
                "unexpected_index_column_names": ["file_no"],
            },
        )
        findings.extend(_findings(result, meta))
    return findings


def _cell(rule: TagRule, value: Any) -> Any:
    if rule.min is not None or rule.max is not None:
        return first_number(value)
    return normalise(value)


def _expectations(gx: Any, rule: TagRule) -> list[tuple[Any, Reason]]:
    column = rule.keyword
    made = [
        (gx.expectations.ExpectColumnValuesToNotBeNull(column=column), Reason.MISSING_REQUIRED_TAG)
    ]
    if rule.min is not None or rule.max is not None:
        made.append(
            (
                gx.expectations.ExpectColumnValuesToBeBetween(
                    column=column, min_value=rule.min, max_value=rule.max
                ),
                Reason.VALUE_OUT_OF_RANGE,
            )
        )
    if rule.allowed:
        made.append(
            (
                gx.expectations.ExpectColumnValuesToBeInSet(
                    column=column, value_set=sorted({normalise(a) for a in rule.allowed})
                ),
                Reason.VALUE_OUT_OF_RANGE,
            )
        )
    return made


def _findings(result: Any, meta: list[tuple[TagRule, Reason]]) -> list[Finding]:
    found: list[Finding] = []
    by_key = {(rule.keyword, reason): rule for rule, reason in meta}
    for item in result.results:
        if item.success:
            continue
        column = item.expectation_config.kwargs.get("column")
        kind = item.expectation_config.type
        reason = (
            Reason.MISSING_REQUIRED_TAG
            if kind == "expect_column_values_to_not_be_null"
            else Reason.VALUE_OUT_OF_RANGE
        )
        rule = by_key.get((column, reason))
        if rule is None:
            continue
        for unexpected in item.result.get("unexpected_index_list") or []:
            found.append(
                Finding(int(unexpected["file_no"]), rule.keyword, reason, rule.on_failure != "flag")
            )
    return found
