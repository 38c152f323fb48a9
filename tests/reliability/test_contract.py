"""The service keeps the promises of its own OpenAPI document (schemathesis against the stack).

The document is the one the running service serves (`GET /openapi.json`). Schemathesis's engine
(what its CLI runs) sends generated requests to every operation, valid and invalid: its coverage
and fuzzing phases (no examples phase: the document has none; no stateful phase: it has no links
between job ids). Every request is alice's, with keys of her own made for this file and rotated per
request, so that the per-key rate limit never decides an answer. Each response must:

- never be a 5xx;
- have a status the document declares for the operation, the declared content type and a body
  matching the declared schema (errors: OpenAI's `{"error": {...}}`), and declared headers;
- refuse invalid input with a 4xx (`negative_data_rejection`), an undeclared method with 405 and
  an `Allow` header.

Not checked: `positive_data_acceptance` (schema-valid is not enough here: random bytes are a valid
`file` but not audio, a random job id a valid path but no job) and the stateful checks.

Bounded: MAX_EXAMPLES per operation and phase, no shrinking, and BUDGET_S of wall clock; a run
that passes its budget fails (operations would go untested), as does any skipped scenario.
(The schemathesis pytest plugin's `from_fixture` does not work with pytest 9: it sets
`Function._nodeid`, which pytest 9 no longer has; the engine needs no plugin.)
"""

from __future__ import annotations

import itertools
import time
from collections import Counter

import schemathesis
from schemathesis.engine import Status, StopReason, events, from_schema

from tests.reliability.support import Stack, user_keys

MAX_EXAMPLES = 30
BUDGET_S = 200
"""Wall-clock bound of the whole run. (Schemathesis's own `max-time` does not bound: with it set,
the engine fuzzes again and again until the time is up.)"""
SKIPPED_CHECKS = ("positive_data_acceptance", "use_after_free", "ensure_resource_availability",
                  "ignored_auth", "object_level_authorization")


def _config() -> schemathesis.Config:
    return schemathesis.Config.from_dict({
        "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "no-shrink": True,
                       "deterministic": True},
        # no `examples` phase: the document has no examples, so it would only report skips
        "phases": {"examples": {"enabled": False}, "stateful": {"enabled": False}},
        "checks": {name: {"enabled": False} for name in SKIPPED_CHECKS},
        "suppress-health-check": ["all"],
        "request-timeout": 60,
        "cache": {"enabled": False},
    })


def test_every_operation_answers_as_its_openapi_document_says_and_never_with_a_server_error(
        stack: Stack) -> None:
    keys = itertools.cycle(user_keys(stack.db_url, "alice@example.com", 8, name="contract"))
    schema = schemathesis.openapi.from_url(stack.url("/openapi.json"), config=_config(), timeout=30)

    @schema.auth(refresh_interval=None)
    class RotatingKeys:
        def get(self, case: schemathesis.Case, ctx: schemathesis.AuthContext) -> str:
            return next(keys).key

        def set(self, case: schemathesis.Case, data: str, ctx: schemathesis.AuthContext) -> None:
            case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}

    operations = {f"{op.method.upper()} {op.path}" for op in
                  (r.ok() for r in schema.get_all_operations())}
    statuses: Counter[int] = Counter()
    tested: set[str] = set()
    failures: dict[tuple[str, str, str], str] = {}
    problems: list[str] = []
    finished: events.EngineFinished | None = None
    t0 = time.monotonic()
    stream = from_schema(schema).execute()
    for event in stream:
        if time.monotonic() - t0 > BUDGET_S and finished is None:
            stream.stop()
            problems.append(f"the run passed its budget of {BUDGET_S} s: lower MAX_EXAMPLES")
        if isinstance(event, events.ScenarioFinished):
            if event.status == Status.SKIP:
                problems.append(f"skipped: {event.label} ({event.phase}): {event.skip_reason}")
                continue
            tested.add(event.label)
            for interaction in event.recorder.interactions.values():
                if interaction.response is not None:
                    statuses[interaction.response.status_code] += 1
                    stack.ledger.request(interaction.response.status_code)
            for nodes in event.recorder.checks.values():
                for node in nodes:
                    if node.status == Status.FAILURE and node.failure_info is not None:
                        failure = node.failure_info.failure
                        key = (event.label, node.name, failure.title)
                        failures.setdefault(key, f"{failure.message}\n{node.failure_info.code_sample}")
        elif isinstance(event, events.NonFatalError):
            problems.append(f"error: {event.label}: {event.info.title}: {event.info.message}")
        elif isinstance(event, events.FatalError):
            raise event.exception
        elif isinstance(event, events.EngineFinished):
            finished = event
    assert finished is not None
    report = [f"{label} [{check}] {title}:\n    " + detail.strip().replace("\n", "\n    ")
              for (label, check, title), detail in sorted(failures.items())]
    report += [f"{f.operation}: {f.title}: {f.message}" for f in finished.failures]
    assert not report, f"{len(report)} contract failures:\n" + "\n".join(report)
    assert not problems, "\n".join(problems)
    assert finished.stop_reason == StopReason.COMPLETED, finished.stop_reason
    assert tested == operations, f"untested: {sorted(operations - tested)}"
    assert sum(statuses.values()) >= MAX_EXAMPLES * len(operations), statuses
    assert not [s for s in statuses if s >= 500], statuses
