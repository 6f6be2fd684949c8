"""``--json`` follows agent/doctor/schema.json: the schema is valid JSON Schema 2020-12, carries the
version the output names, and the fixed node's report validates (the live runs validate in
test_live.py); a report that breaks the contract does not."""

from __future__ import annotations

import copy
import json

import jsonschema
import pytest

from agent.doctor.analyse import CHECKS, analyse
from agent.doctor.cpu import window
from agent.doctor.report_json import SCHEMA_ID, dumps, schema, to_dict
from tests.agent.doctor import fixed


def fixed_report() -> dict:
    before, after = fixed.readings()
    report = analyse(
        before, after, window(fixed.CPU_BEFORE, fixed.CPU_AFTER), fixed.TUNING, {"lockstat": "x"}, "n", "live"
    )
    return json.loads(dumps(report))


def test_schema_is_valid_and_versioned() -> None:
    s = schema()
    jsonschema.Draft202012Validator.check_schema(s)
    assert s["$id"] == SCHEMA_ID and SCHEMA_ID.endswith("/v1.json")
    assert s["properties"]["schema"] == {"const": SCHEMA_ID}
    assert s["$defs"]["finding"]["properties"]["id"]["enum"] == [c for c, _f, _n in CHECKS]


def test_fixed_report_validates_with_every_finding_and_histograms() -> None:
    report = fixed_report()
    jsonschema.validate(report, schema())
    assert report["schema"] == SCHEMA_ID and report["exit_code"] == 2
    by_id = {f["id"]: f for f in report["findings"]}
    assert by_id["locks.contention"]["verdict"] == "SKIP"
    rq = by_id["cpu.runqueue"]["histograms"][0]["buckets"]
    assert rq[-1] == {"le": "+Inf", "count": 0} and sum(b["count"] for b in rq) == 5000


@pytest.mark.parametrize(
    "breakage",
    [
        lambda r: r.update(verdict="BAD"),
        lambda r: r.update(exit_code=4),
        lambda r: r["findings"][0].update(surprise=1),
        lambda r: r["findings"][0].pop("fix"),
        lambda r: r["findings"][3]["histograms"][0]["buckets"].append({"le": -1, "count": 1}),
    ],
)
def test_a_report_that_breaks_the_contract_does_not_validate(breakage) -> None:
    report = copy.deepcopy(fixed_report())
    breakage(report)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(report, schema())


def test_json_and_text_carry_the_same_findings() -> None:
    before, after = fixed.readings()
    report = analyse(before, after, window(fixed.CPU_BEFORE, fixed.CPU_AFTER), fixed.TUNING, {}, "n", "live")
    data = to_dict(report)
    assert [(f["id"], f["verdict"], f["summary"]) for f in data["findings"]] == [
        (f.id, f.verdict, f.summary) for f in report.findings
    ]


def test_non_finite_numbers_become_null_not_invalid_json() -> None:
    """Lesser point: json.dumps writes NaN / Infinity, which is not JSON; every number of a finding
    (value, thresholds, offenders' values, bucket bounds) is finite or null."""
    import json
    import math

    from agent.doctor import report_json
    from agent.doctor.findings import WARN, Finding, Offender, Report

    r = Report("n", "live", 1.0, 1)
    r.findings.append(
        Finding(
            "cpu.throttling", "t", WARN, "s", value=math.nan, warn=math.inf,
            offenders=(Offender("workload", "w", math.inf, "d"),), fix="f",
        )
    )  # fmt: skip
    data = json.loads(report_json.dumps(r), parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    f = data["findings"][0]
    assert f["value"] is None and f["thresholds"]["warn"] is None and f["offenders"][0]["value"] is None
    jsonschema.validate(data, schema())
