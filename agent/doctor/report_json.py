"""The report as JSON for scripts, following ``schema.json`` next to this file (JSON Schema 2020-12,
versioned by its ``$id``: a change that breaks a reader gets a new version). The same findings as the
text, as data: numbers in base units (seconds, ratios 0..1, counts)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from agent import __version__
from agent.doctor.findings import Finding, Report

SCHEMA_ID = "https://nodetune.invalid/schemas/doctor-report/v1.json"
SCHEMA_PATH = Path(__file__).with_name("schema.json")


def _number(x: float | None) -> float | None:
    """A finite number, or None: NaN and infinities are not JSON (json.dumps would write them)."""
    if x is None or not math.isfinite(x):
        return None
    return x


def finding(f: Finding) -> dict[str, Any]:
    return {
        "id": f.id,
        "resource": f.resource,
        "title": f.title,
        "verdict": f.verdict,
        "summary": f.summary,
        "value": _number(f.value),
        "unit": f.unit or None,
        "thresholds": {"warn": _number(f.warn), "crit": _number(f.crit)},
        "offenders": [
            {"kind": o.kind, "name": o.name, "value": _number(o.value), "detail": o.detail} for o in f.offenders
        ],
        "fix": f.fix or None,
        "histograms": [
            {
                "title": h.title,
                "buckets": [{"le": "+Inf" if math.isinf(le) else le, "count": c} for le, c in h.buckets],
            }
            for h in f.histograms
        ],
    }


def to_dict(report: Report) -> dict[str, Any]:
    return {
        "schema": SCHEMA_ID,
        "nodetune_version": __version__,
        "node": report.node,
        "source": report.source,
        "duration_seconds": report.duration_s,
        "cpus": report.cpus,
        "verdict": report.verdict,
        "exit_code": report.exit_code(),
        "findings": [finding(f) for f in report.findings],
    }


def dumps(report: Report) -> str:
    return json.dumps(to_dict(report), indent=2, allow_nan=False) + "\n"


def schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())
