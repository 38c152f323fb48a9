"""One real service for the reliability suite, on the machine's PostgreSQL and a real Redis.

`stack` (package scope) starts, in order: a fresh PostgreSQL database of its own (migrated, with
an admin, two ordinary users and their keys), a `FaultProxy` in front of it, a private
`redis-server`, and `python -m serve` with its own local Ray cluster, the CPU profile of
`serve_config.yaml` and a job runner (`support.running_stack`, which bench/soak.py runs too).
Everything is stopped by its handle when the package's tests are done, even when they fail. The
suite's ledger is printed at the end of the run.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.reliability.support import (  # noqa: F401 - re-exported for the suite's tests
    KEY_LIMIT_PER_MINUTE,
    MAX_DURATION_S,
    MAX_UPLOAD_BYTES,
    Ledger,
    Stack,
    Caller,
    running_stack,
)

LEDGER = Ledger()


@pytest.fixture(scope="package")
def stack(tmp_path_factory: pytest.TempPathFactory, model_cache_dir: Path) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("reliability"), model_cache_dir, LEDGER) as s:
        yield s


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if LEDGER.counts or LEDGER.bad_inputs:
        terminalreporter.write_sep("=", "reliability ledger")
        terminalreporter.write_line(LEDGER.table())
