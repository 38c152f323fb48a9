"""The Ray dashboard as the operators' capacity view is wired to the monitoring stack (issue 16).

Without RAY_PROMETHEUS_HOST / RAY_GRAFANA_HOST the Ray dashboard's Metrics and Serve charts are
empty. The RayService head and the compose service point them at the monitoring stack, the
network policies let the head reach it, and Ray's own Grafana dashboards (whose uids the Ray
dashboard embeds) are provisioned next to ours, as the installed Ray generates them.
"""

from __future__ import annotations

import sys

import yaml

from tests.kuberay.conftest import KUBERAY, MONITORING, REPO, load_docs, run

RAY_UIDS = {"rayDefaultDashboard", "rayServeDashboard", "rayServeDeploymentDashboard", "rayDataDashboard"}


def _head_env() -> dict[str, str]:
    (doc,) = load_docs(KUBERAY / "base" / "rayservice.yaml")
    head = doc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    (container,) = [c for c in head["containers"] if c["name"] == "ray-head"]
    return {e["name"]: e.get("value", "") for e in container.get("env") or []}


def test_rayservice_head_points_the_ray_dashboard_at_the_monitoring_stack() -> None:
    env = _head_env()
    assert env["RAY_PROMETHEUS_HOST"].startswith("http://") and ".monitoring.svc:9090" in env["RAY_PROMETHEUS_HOST"]
    assert env["RAY_GRAFANA_HOST"].startswith("http://") and ".monitoring.svc" in env["RAY_GRAFANA_HOST"]
    assert env["RAY_GRAFANA_IFRAME_HOST"].startswith("http://")


def test_network_policy_lets_the_head_reach_prometheus_and_grafana() -> None:
    policies = {d["metadata"]["name"]: d for d in load_docs(KUBERAY / "base" / "networkpolicies.yaml")}
    policy = policies["ray-head-to-monitoring"]["spec"]
    assert policy["podSelector"]["matchLabels"]["ray.io/node-type"] == "head"
    (rule,) = policy["egress"]
    assert rule["to"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] == "monitoring"
    assert {p["port"] for p in rule["ports"]} == {9090, 3000}


def test_compose_wires_the_ray_dashboard_to_its_own_prometheus_and_grafana() -> None:
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    services = compose["services"]
    env = services["speech"]["environment"]
    assert env["RAY_PROMETHEUS_HOST"] == "http://prometheus:9090" and "prometheus" in services
    assert env["RAY_GRAFANA_HOST"] == "http://grafana:3000" and "grafana" in services
    published = {p.split(":")[-1] for p in services["grafana"]["ports"]}
    assert env["RAY_GRAFANA_IFRAME_HOST"].rsplit(":", 1)[-1] in published
    grafana = services["grafana"]
    assert grafana["environment"]["GF_SECURITY_ALLOW_EMBEDDING"] == "true"
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"] if v.startswith("./")}
    providers = yaml.safe_load((MONITORING / "grafana" / "provisioning" / "dashboards" / "speech.yml").read_text())
    for provider in providers["providers"]:
        source = mounts[provider["options"]["path"]]
        assert (REPO / source).is_dir() and any((REPO / source).glob("*.json")), provider


def test_ray_dashboards_are_what_the_installed_ray_generates() -> None:
    import json

    result = run([sys.executable, str(MONITORING / "grafana" / "build_ray_dashboards.py"), "--check"])
    assert result.returncode == 0, result.stderr
    uids = {json.loads(p.read_text())["uid"] for p in (MONITORING / "grafana" / "ray-dashboards").glob("*.json")}
    assert uids == RAY_UIDS
