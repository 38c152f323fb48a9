"""Write the five Grafana dashboards of the operations guide as JSON files.

The dashboards are plain Grafana JSON (provisioned from monitoring/grafana/dashboards by
compose.yaml, importable by hand elsewhere); this script is how they are written, so panels
stay uniform. Edit the panel lists below and rerun:

    python monitoring/grafana/build_dashboards.py           # rewrite the JSON files
    python monitoring/grafana/build_dashboards.py --check   # exit 1 if they are out of date

Metric names: the ingress's `speech_*` (prometheus-client), the replicas' `ray_speech_*`
(ray.util.metrics, prefixed by Ray) and Ray's own `ray_*`; see serve/metrics.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

Panel = dict[str, Any]


def ts(title: str, targets: dict[str, str], unit: str = "short", description: str = "") -> Panel:
    """A time series panel; `targets` maps legend format to PromQL."""
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
        "targets": [
            {"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend, "datasource": DATASOURCE}
            for i, (legend, expr) in enumerate(targets.items())
        ],
    }


def stat(title: str, expr: str, unit: str = "short", description: str = "") -> Panel:
    """A single-number panel."""
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "value"},
        "targets": [{"refId": "A", "expr": expr, "datasource": DATASOURCE}],
    }


def dashboard(uid: str, title: str, description: str, panels: list[Panel]) -> dict[str, Any]:
    """Lay panels out two per row (stats four per row) and wrap them in a dashboard."""
    x = y = 0
    row_h = 0
    laid = []
    for i, panel in enumerate(panels):
        w, h = (6, 4) if panel["type"] == "stat" else (12, 8)
        if x + w > 24:
            x, y = 0, y + row_h
            row_h = 0
        laid.append({"id": i + 1, "gridPos": {"x": x, "y": y, "w": w, "h": h}, **panel})
        x += w
        row_h = max(row_h, h)
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["speech-service"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {
            "list": [{"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus"}]
        },
        "annotations": {"list": []},
        "panels": laid,
    }


def _quantiles(metric: str, by: str, selector: str = "") -> dict[str, str]:
    return {
        f"p{q} {{{{{by}}}}}": f"histogram_quantile(0.{q}, sum by ({by}, le) (rate({metric}_bucket{selector}[5m])))"
        for q in ("50", "95", "99")
    }


DASHBOARDS = {
    "application-overview": dashboard(
        "speech-overview",
        "Speech service / Application overview",
        "Is the service up and doing work? Traffic, errors, latency, jobs and audio processed.",
        [
            stat("Availability (1 h)", '1 - sum(rate(speech_http_requests_total{status=~"5.."}[1h])) '
                 "/ sum(rate(speech_http_requests_total[1h]))", "percentunit", "Target 99.9%"),
            stat("Requests / s", "sum(rate(speech_http_requests_total[5m]))", "reqps"),
            stat("Queued jobs", "max(speech_job_queue_depth)", "short", "Alert above 100"),
            stat("Audio transcribed (24 h)", "sum(increase(ray_speech_asr_audio_seconds_total[24h]))", "s"),
            ts("Requests by status", {"{{status}}": "sum by (status) (rate(speech_http_requests_total[5m]))"},
               "reqps"),
            ts("5xx share", {"5xx": 'sum(rate(speech_http_requests_total{status=~"5.."}[5m])) '
                                    "/ sum(rate(speech_http_requests_total[5m]))"},
               "percentunit", "Alert above 10%"),
            ts("p95 latency by route", _quantiles("speech_http_request_duration_seconds", "route"), "s"),
            ts("Jobs by status", {"{{status}}": "sum by (status) (speech_jobs)"}),
            ts("Audio seconds processed per second",
               {"ASR": "sum(rate(ray_speech_asr_audio_seconds_total[5m]))",
                "diarization": "sum(rate(ray_speech_diarization_audio_seconds_total[5m]))"}, "short"),
            ts("Healthy Serve replicas",
               {"{{deployment}}": "sum by (deployment) (ray_serve_deployment_replica_healthy)"}),
        ],
    ),
    "api-performance": dashboard(
        "speech-api",
        "Speech service / API performance",
        "Per-route traffic, latency and errors at the ingress, and the Serve proxy underneath it.",
        [
            ts("Requests by route", {"{{method}} {{route}}": "sum by (route, method) (rate(speech_http_requests_total[5m]))"},
               "reqps"),
            ts("Errors by route and status",
               {"{{route}} {{status}}": 'sum by (route, status) (rate(speech_http_requests_total{status=~"[45].."}[5m]))'},
               "reqps"),
            ts("Latency quantiles by route", _quantiles("speech_http_request_duration_seconds", "route"), "s",
               "p95 alert at 2 s (audio routes excluded)"),
            ts("Mean latency by route",
               {"{{route}}": "sum by (route) (rate(speech_http_request_duration_seconds_sum[5m])) "
                             "/ sum by (route) (rate(speech_http_request_duration_seconds_count[5m]))"}, "s"),
            ts("Upload bytes / s", {"uploads": "sum(rate(speech_upload_bytes_total[5m]))"}, "Bps"),
            ts("Rate-limited and overloaded answers",
               {"{{status}}": 'sum by (status) (rate(speech_http_requests_total{status=~"429|503"}[5m]))'}, "reqps"),
            ts("Requests in flight at the Serve proxy",
               {"ongoing": "sum(ray_serve_num_ongoing_http_requests)"}),
            ts("Serve proxy p95 latency",
               {"p95": "histogram_quantile(0.95, sum by (le) (rate(ray_serve_http_request_latency_ms_bucket[5m])))"},
               "ms"),
        ],
    ),
    "job-processing": dashboard(
        "speech-jobs",
        "Speech service / Job processing",
        "The asynchronous job queue: backlog, its age, and the replicas that drain it.",
        [
            stat("Queued jobs", "max(speech_job_queue_depth)"),
            stat("Oldest queued job", "max(speech_job_oldest_queued_age_seconds)", "s"),
            stat("Running jobs", 'sum(speech_jobs{status="running"})'),
            stat("Failed jobs", 'sum(speech_jobs{status="failed"})'),
            ts("Jobs by status", {"{{status}}": "sum by (status) (speech_jobs)"}),
            ts("Queue depth and oldest job age",
               {"queued": "max(speech_job_queue_depth)",
                "oldest age (s)": "max(speech_job_oldest_queued_age_seconds)"}),
            ts("Windows waiting for an ASR batch",
               {"{{instance}}": "sum by (instance) (ray_speech_asr_queue_length)"}),
            ts("Requests queued at Serve deployments",
               {"{{deployment}}": "sum by (deployment) (ray_serve_deployment_queued_queries)"}),
            ts("Windows transcribed / s", {"windows": "sum(rate(ray_speech_asr_windows_total[5m]))"}),
            ts("Deployment requests / s",
               {"{{deployment}}": "sum by (deployment) (rate(ray_serve_deployment_request_counter_total[5m]))"},
               "reqps"),
        ],
    ),
    "infrastructure": dashboard(
        "speech-infra",
        "Speech service / Infrastructure",
        "Ray nodes: CPU, memory, GPU, object store, disk and network (Ray's node metrics).",
        [
            ts("CPU utilisation by node", {"{{ip}}": "max by (ip) (ray_node_cpu_utilization)"}, "percent",
               "Alert above 80% for 15 min"),
            ts("Memory used by node", {"{{ip}}": "max by (ip) (ray_node_mem_used) / max by (ip) (ray_node_mem_total)"},
               "percentunit", "Alert above 90% for 10 min"),
            ts("GPU utilisation", {"{{ip}} GPU {{GpuIndex}}": "max by (ip, GpuIndex) (ray_node_gpus_utilization)"},
               "percent"),
            ts("GPU memory used", {"{{ip}} GPU {{GpuIndex}}": "max by (ip, GpuIndex) (ray_node_gram_used)"}, "decmbytes"),
            ts("Object store memory", {"{{Location}}": "sum by (Location) (ray_object_store_memory)"}, "bytes"),
            ts("Disk used by node", {"{{ip}}": "max by (ip) (ray_node_disk_usage)"}, "bytes"),
            ts("Network by node",
               {"{{ip}} receive": "max by (ip) (ray_node_network_receive_speed)",
                "{{ip}} send": "max by (ip) (ray_node_network_send_speed)"}, "Bps"),
            ts("Resources in the cluster", {"{{Name}} {{State}}": "sum by (Name, State) (ray_resources)"}),
        ],
    ),
    "ai-models": dashboard(
        "speech-models",
        "Speech service / AI models",
        "Whisper and diarization replicas: batching, throughput, speed, load time and errors.",
        [
            stat("Real-time factor (ASR)", "avg(ray_speech_asr_real_time_factor)", "short",
                 "Audio seconds per compute second; higher is faster"),
            # windows over batches, not the histogram's _sum: Ray approximates that from bucket
            # midpoints, which reads about half the true size for small batches
            stat("Mean ASR batch size", "sum(rate(ray_speech_asr_windows_total[15m])) "
                 "/ sum(rate(ray_speech_asr_batch_size_count[15m]))"),
            stat("ASR errors (1 h)", "sum(increase(ray_speech_asr_errors_total[1h]))"),
            stat("Longest model load", "max(ray_speech_model_load_seconds)", "s"),
            ts("ASR batch size quantiles",
               {"p50": "histogram_quantile(0.5, sum by (le) (rate(ray_speech_asr_batch_size_bucket[5m])))",
                "p95": "histogram_quantile(0.95, sum by (le) (rate(ray_speech_asr_batch_size_bucket[5m])))"}),
            ts("Real-time factor by replica", {"{{instance}}": "avg by (instance) (ray_speech_asr_real_time_factor)"}),
            ts("Audio seconds processed per second",
               {"ASR": "sum(rate(ray_speech_asr_audio_seconds_total[5m]))",
                "diarization": "sum(rate(ray_speech_diarization_audio_seconds_total[5m]))"}),
            ts("Windows / s and batches / s",
               {"windows": "sum(rate(ray_speech_asr_windows_total[5m]))",
                "batches": "sum(rate(ray_speech_asr_batch_size_count[5m]))"}),
            ts("Model load time by model", {"{{model}}": "max by (model) (ray_speech_model_load_seconds)"}, "s"),
            ts("ASR errors / s", {"errors": "sum(rate(ray_speech_asr_errors_total[5m]))"}),
            ts("Replica processing latency p95",
               {"{{deployment}}": "histogram_quantile(0.95, sum by (deployment, le) "
                                  "(rate(ray_serve_deployment_processing_latency_ms_bucket[5m])))"}, "ms"),
            ts("GPU memory used", {"{{ip}} GPU {{GpuIndex}}": "max by (ip, GpuIndex) (ray_node_gram_used)"}, "decmbytes"),
        ],
    ),
}


def render() -> dict[Path, str]:
    """File path -> JSON text of every dashboard."""
    return {OUT / f"{name}.json": json.dumps(d, indent=2) + "\n" for name, d in DASHBOARDS.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail instead of writing")
    args = parser.parse_args(argv)
    stale = [p for p, text in render().items() if not p.exists() or p.read_text() != text]
    if args.check:
        for p in stale:
            print(f"{p} is out of date: run python monitoring/grafana/build_dashboards.py", file=sys.stderr)
        return 1 if stale else 0
    OUT.mkdir(parents=True, exist_ok=True)
    for p in stale:
        p.write_text(render()[p])
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
