"""The alert rules of the operations guide: valid, unit-tested, and the same on Kubernetes."""

from __future__ import annotations

import sys

import yaml

from tests.kuberay.conftest import KUBERAY, MONITORING, REPO, run

ALERTS = MONITORING / "prometheus" / "alerts.yml"
ALERTS_TEST = MONITORING / "prometheus" / "alerts_test.yml"

# The guide's list: availability < 99.9%, error rate > 10%, p95 > 2 s, > 100 queued jobs,
# CPU > 80%, memory > 90%.
GUIDE_ALERTS = {
    "SpeechAvailabilityBelowSLO": "< 0.999",
    "SpeechHighErrorRate": "> 0.10",
    "SpeechHighLatencyP95": "> 2",
    "SpeechJobQueueBacklog": "> 100",
    "SpeechNodeHighCPU": "> 80",
    "SpeechNodeHighMemory": "> 0.90",
}


def _alerts() -> dict[str, dict]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return {r["alert"]: r for g in groups for r in g["rules"] if "alert" in r}


def test_every_alert_of_the_guide_exists_with_its_threshold() -> None:
    alerts = _alerts()
    assert set(GUIDE_ALERTS) <= set(alerts), f"missing: {set(GUIDE_ALERTS) - set(alerts)}"
    for name, threshold in GUIDE_ALERTS.items():
        expr = " ".join(alerts[name]["expr"].split())
        assert expr.endswith(threshold), f"{name}: {expr!r} does not end with {threshold!r}"
        assert alerts[name]["labels"]["severity"] in {"warning", "critical"}


def test_promtool_accepts_the_rules(promtool: str) -> None:
    result = run([promtool, "check", "rules", str(ALERTS)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_each_alert_fires_in_a_unit_test_on_synthetic_series(promtool: str) -> None:
    tested = {
        case["alertname"]
        for t in yaml.safe_load(ALERTS_TEST.read_text())["tests"]
        for case in t.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert tested == set(_alerts()), f"alerts never shown firing: {set(_alerts()) - tested}"
    result = run([promtool, "test", "rules", ALERTS_TEST.name], cwd=ALERTS_TEST.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_rule_on_kubernetes_holds_the_same_groups() -> None:
    rule = yaml.safe_load((KUBERAY / "base" / "prometheusrule.yaml").read_text())
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"]
    result = run([sys.executable, str(KUBERAY / "render_prometheus_rule.py"), "--check"])
    assert result.returncode == 0, result.stderr


def test_compose_prometheus_config_is_valid(promtool: str) -> None:
    result = run([promtool, "check", "config", "--syntax-only",
                  str(MONITORING / "prometheus" / "prometheus.yml")], cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
