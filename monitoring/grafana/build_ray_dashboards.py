"""Write Ray's own Grafana dashboards (the ones the Ray dashboard embeds) as JSON files.

The Ray dashboard's Metrics and Serve pages show panels of these dashboards by their uid
(rayDefaultDashboard, rayServeDashboard, rayServeDeploymentDashboard, rayDataDashboard) from the
Grafana at RAY_GRAFANA_HOST / RAY_GRAFANA_IFRAME_HOST; Ray writes them on its head at start
(session_latest/metrics/grafana/dashboards), where our Grafana cannot see them. They are
generated here from the installed Ray, with the same factory, and provisioned next to ours
(monitoring/grafana/provisioning/dashboards/speech.yml, folder "Ray").

    python monitoring/grafana/build_ray_dashboards.py           # rewrite the JSON files
    python monitoring/grafana/build_ray_dashboards.py --check   # exit 1 if they are out of date
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "ray-dashboards"
DASHBOARDS = {  # file name -> generator in ray.dashboard.modules.metrics.grafana_dashboard_factory
    "ray-default.json": "generate_default_grafana_dashboard",
    "ray-serve.json": "generate_serve_grafana_dashboard",
    "ray-serve-deployment.json": "generate_serve_deployment_grafana_dashboard",
    "ray-data.json": "generate_data_grafana_dashboard",
}


def render() -> dict[Path, str]:
    from ray.dashboard.modules.metrics import grafana_dashboard_factory as factory

    out = {}
    for name, generator in DASHBOARDS.items():
        content, _uid = getattr(factory, generator)()
        out[OUT / name] = json.dumps(json.loads(content), indent=1, sort_keys=True) + "\n"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail instead of writing")
    args = parser.parse_args(argv)
    stale = {p: t for p, t in render().items() if not p.exists() or p.read_text() != t}
    if args.check:
        for p in stale:
            print(f"{p} is out of date: run python monitoring/grafana/build_ray_dashboards.py", file=sys.stderr)
        return 1 if stale else 0
    OUT.mkdir(exist_ok=True)
    for p, t in stale.items():
        p.write_text(t)
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
