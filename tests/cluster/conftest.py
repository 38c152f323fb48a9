"""The multi-node tests' cluster: `ray start` nodes on this machine, the GPU profile deployed
with `serve deploy`, stopped by their handles (tests/cluster/support.py). Figures the tests
record (placement table, job-submit timings ...) are printed again at the end of the run."""

from __future__ import annotations

import pytest

from tests.cluster.support import FIGURES


def pytest_terminal_summary(terminalreporter) -> None:  # noqa: ANN001 - pytest's reporter
    if not FIGURES:
        return
    terminalreporter.section("cluster figures (tests/cluster)")
    for title, text in FIGURES:
        terminalreporter.write_line(title)
        for line in text.splitlines():
            terminalreporter.write_line("  " + line)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/tests/cluster/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.cluster)
