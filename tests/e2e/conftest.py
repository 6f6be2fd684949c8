"""End-to-end tests (``make e2e``): they need the image built by ``make image`` and run for minutes,
so ``make test`` deselects them (as it does the tracing tests); ``NODETUNE_E2E=1``, set by
``make e2e``, runs them."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("NODETUNE_E2E") == "1":
        return
    e2e = [item for item in items if "e2e" in item.path.parts]
    if e2e:
        config.hook.pytest_deselected(items=e2e)
        items[:] = [item for item in items if item not in e2e]
