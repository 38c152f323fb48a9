"""Wrap monitoring/prometheus/alerts.yml into the PrometheusRule of the Kubernetes deployment.

One rule file serves both the single-machine stack (compose.yaml mounts it) and the
Prometheus operator (this PrometheusRule), so alerts are written and unit-tested once.

    python kuberay/render_prometheus_rule.py           # rewrite kuberay/base/prometheusrule.yaml
    python kuberay/render_prometheus_rule.py --check   # exit 1 if it is out of date
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
ALERTS = REPO / "monitoring" / "prometheus" / "alerts.yml"
PROMETHEUS_RULE = REPO / "kuberay" / "base" / "prometheusrule.yaml"

HEADER = """\
# GENERATED from monitoring/prometheus/alerts.yml by `python kuberay/render_prometheus_rule.py`.
# Do not edit: change the rule file (and its promtool tests), then rerun the script.
# The `release` label must match your Prometheus's ruleSelector.
"""


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings, so PromQL stays readable in the generated file."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render(alerts_text: str) -> str:
    """The PrometheusRule manifest holding the rule groups of alerts.yml."""
    groups = yaml.safe_load(alerts_text)["groups"]
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "speech-alerts",
            "labels": {"app.kubernetes.io/part-of": "speech-service", "release": "prometheus"},
        },
        "spec": {"groups": groups},
    }
    return HEADER + yaml.dump(rule, Dumper=_Dumper, sort_keys=False, width=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail instead of writing")
    args = parser.parse_args(argv)
    wanted = render(ALERTS.read_text())
    current = PROMETHEUS_RULE.read_text() if PROMETHEUS_RULE.exists() else ""
    if current == wanted:
        return 0
    if args.check:
        print(f"{PROMETHEUS_RULE} is out of date: run python kuberay/render_prometheus_rule.py", file=sys.stderr)
        return 1
    PROMETHEUS_RULE.write_text(wanted)
    print(f"wrote {PROMETHEUS_RULE.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
