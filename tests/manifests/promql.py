"""What a PromQL expression reads: metric names, the label names of its matchers, and the label names
of its grouping clauses. A small lexer, enough for the rules and dashboard queries of this repository
(promtool checks that they parse; this finds the names in them)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_SELECTOR = re.compile(r"([a-zA-Z_:][\w:]*)?\s*\{([^{}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)")
_RANGE = re.compile(r"\[[^\]]*\]")
_IDENT = re.compile(r"(?<![\w.:$])([a-zA-Z_:][\w:]*)(?![\w:])(?!\s*\()")
_KEYWORDS = {"and", "or", "unless", "offset", "bool", "inf", "nan", "atan2"}


@dataclass
class Reads:
    metrics: set[str] = field(default_factory=set)
    #: metric name -> label names its matchers use ("" for a selector without a name)
    matchers: dict[str, set[str]] = field(default_factory=dict)
    grouping: set[str] = field(default_factory=set)


def reads(expr: str) -> Reads:
    out = Reads()
    text = _STRING.sub('""', expr)
    for m in _GROUPING.finditer(text):
        out.grouping |= {label.strip() for label in m.group(2).split(",") if label.strip()}
    text = _GROUPING.sub(" ", text)

    def selector(m: re.Match[str]) -> str:
        name = m.group(1) or ""
        out.matchers.setdefault(name, set()).update(_MATCHER.findall(m.group(2)))
        if name:
            out.metrics.add(name)
        return f" {name} "

    text = _SELECTOR.sub(selector, text)
    text = _RANGE.sub(" ", text)
    for name in _IDENT.findall(text):
        if name.lower() not in _KEYWORDS and not re.fullmatch(r"[eE]\d+|0x[0-9a-fA-F]+", name):
            out.metrics.add(name)
    return out
