"""Grafana dashboards: the five views of the operations guide, each query valid PromQL that
names only metrics the service (or Ray) exports."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

from tests.kuberay.conftest import MONITORING, REPO, run

DASHBOARDS = MONITORING / "grafana" / "dashboards"
VIEWS = {"application-overview", "api-performance", "job-processing", "infrastructure", "ai-models"}

# The contract's names (serve/metrics.py). Histograms export _bucket/_sum/_count series.
INGRESS_COUNTERS = {"speech_http_requests_total", "speech_upload_bytes_total"}
INGRESS_GAUGES = {"speech_jobs", "speech_job_queue_depth", "speech_job_oldest_queued_age_seconds"}
INGRESS_HISTOGRAMS = {"speech_http_request_duration_seconds"}
# Replica metrics (ray.util.metrics), exported by Ray with a `ray_` prefix.
REPLICA_METRICS = {"speech_asr_windows_total", "speech_asr_audio_seconds_total", "speech_asr_real_time_factor",
                   "speech_model_load_seconds", "speech_asr_queue_length", "speech_asr_errors_total",
                   "speech_diarization_audio_seconds_total"}
REPLICA_HISTOGRAMS = {"speech_asr_batch_size"}

PROMQL_WORDS = {
    "sum", "avg", "max", "min", "count", "by", "without", "on", "ignoring", "group_left", "group_right",
    "rate", "irate", "increase", "histogram_quantile", "and", "or", "unless", "offset", "bool", "topk",
    "bottomk", "abs", "clamp_min", "clamp_max", "deriv", "delta", "time", "vector", "scalar", "le",
}


def _histogram_series(names: set[str]) -> set[str]:
    return {f"{n}_{s}" for n in names for s in ("bucket", "sum", "count")}


def _ray_own_metric_names() -> set[str]:
    """Every `ray_*` name used by the Grafana panels that the installed Ray ships."""
    ray_dir = Path(importlib.util.find_spec("ray").origin).parent  # without importing Ray
    panels = ray_dir / "dashboard" / "modules" / "metrics" / "dashboards"
    return {m for f in panels.glob("*.py") for m in re.findall(r"\bray_[a-z0-9_]+", f.read_text())}


KNOWN = (INGRESS_COUNTERS | INGRESS_GAUGES | _histogram_series(INGRESS_HISTOGRAMS)
         | {f"ray_{n}" for n in REPLICA_METRICS | _histogram_series(REPLICA_HISTOGRAMS)})


def _metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers outside label matchers, grouping
    clauses, strings and durations that are not PromQL functions or keywords."""
    expr = re.sub(r'"[^"]*"', "", expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    return {w for w in re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b", expr)
            if w not in PROMQL_WORDS and not re.fullmatch(r"\d+[smhdwy]?", w)}


def _queries() -> list[tuple[str, str]]:
    out = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                out.append((f"{path.stem}: {panel['title']}", target["expr"]))
    return out


def test_the_five_views_of_the_guide_exist_and_parse() -> None:
    assert {p.stem for p in DASHBOARDS.glob("*.json")} == VIEWS
    uids = set()
    for path in DASHBOARDS.glob("*.json"):
        board = json.loads(path.read_text())
        assert board["panels"], path.name
        uids.add(board["uid"])
    assert len(uids) == len(VIEWS)


def test_dashboards_are_what_the_builder_writes() -> None:
    result = run([sys.executable, str(MONITORING / "grafana" / "build_dashboards.py"), "--check"])
    assert result.returncode == 0, result.stderr


def test_contract_names_are_defined_in_serve_metrics() -> None:
    source = (REPO / "serve" / "metrics.py").read_text()
    bases = ({n.removesuffix("_total") for n in INGRESS_COUNTERS} | INGRESS_GAUGES | INGRESS_HISTOGRAMS
             | REPLICA_METRICS | REPLICA_HISTOGRAMS)
    missing = {n for n in bases if f'"{n}"' not in source and f'"{n}_total"' not in source}
    assert not missing, f"serve/metrics.py does not define {missing}"


@pytest.mark.parametrize("where,expr", _queries(), ids=[w for w, _ in _queries()])
def test_every_query_names_an_exported_metric(where: str, expr: str) -> None:
    names = _metric_names(expr)
    assert names, f"{where}: no metric in {expr!r}"
    unknown = names - KNOWN - _ray_own_metric_names()
    assert not unknown, f"{where}: {sorted(unknown)} is not exported by the service or Ray ({expr})"


def test_every_query_is_valid_promql(promtool: str, tmp_path: Path) -> None:
    rules = {"groups": [{"name": "dashboards", "rules": [
        {"record": f"dashboard:query_{i}", "expr": expr} for i, (_, expr) in enumerate(_queries())]}]}
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(json.dumps(rules))
    result = run([promtool, "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_name_extractor_sees_through_labels_and_grouping() -> None:
    expr = 'histogram_quantile(0.95, sum by (route, le) (rate(speech_http_request_duration_seconds_bucket{route!~"/v1/.*"}[5m])))'
    assert _metric_names(expr) == {"speech_http_request_duration_seconds_bucket"}
