"""The GPU profile fits its own cluster, in the base and in every overlay (issue 16).

From the rendered manifests (the base as written, each overlay through `kubectl kustomize`):
the Ray resources of every worker group at its maxReplicas (CPUs and GPUs per pod from
rayStartParams, else the container's limits), and the Serve application of its serveConfigV2
(replicas at their maxima, each replica's num_cpus and num_gpus). Every replica at its maximum
must find a node (first fit, largest first; replicas asking for GPUs only on GPU nodes), the
GPU replicas must ask for more than all but the last GPU node can give (a node the group may add
can be used), and the CPU-only deployments (Ingress, job runner) must fit the cpu group alone, so
the API answers while no GPU node is up. The totals are printed.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

import pytest
import yaml

from tests.kuberay.conftest import KUBERAY, load_docs


@dataclass
class Group:
    name: str
    min: int
    max: int
    cpus: float
    gpus: float


@dataclass
class Deployment:
    name: str
    min: int
    max: int
    cpus: float
    gpus: float


def _quantity(value: object) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _rayservice(name: str) -> dict:
    if name == "base":
        docs = load_docs(KUBERAY / "base" / "rayservice.yaml")
    else:
        kubectl = shutil.which("kubectl")
        if kubectl is None:
            pytest.skip("issue 16: environment only, kubectl (for `kubectl kustomize`) is not installed here")
        text = subprocess.run([kubectl, "kustomize", str(KUBERAY / "overlays" / name)], check=True,
                              capture_output=True, text=True).stdout
        docs = [d for d in yaml.safe_load_all(text) if d]
    (doc,) = [d for d in docs if d.get("kind") == "RayService"]
    return doc


def _groups(spec: dict) -> list[Group]:
    groups = []
    for g in spec["rayClusterConfig"]["workerGroupSpecs"]:
        (container,) = [c for c in g["template"]["spec"]["containers"] if c["name"] == "ray-worker"]
        limits = container["resources"]["limits"]
        params = g.get("rayStartParams") or {}
        cpus = _quantity(params.get("num-cpus", limits["cpu"]))
        gpus = _quantity(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))
        groups.append(Group(g["groupName"], int(g["minReplicas"]), int(g["maxReplicas"]), cpus, gpus))
    return groups


def _deployments(spec: dict) -> list[Deployment]:
    config = yaml.safe_load(spec["serveConfigV2"])
    (app,) = config["applications"]
    out = []
    for d in app["deployments"]:
        scaling = d.get("autoscaling_config") or {}
        lo = int(scaling.get("min_replicas", d.get("num_replicas", 1)))
        hi = int(scaling.get("max_replicas", d.get("num_replicas", 1)))
        opts = d.get("ray_actor_options") or {}
        out.append(Deployment(d["name"], lo, hi, float(opts.get("num_cpus", 1)), float(opts.get("num_gpus", 0))))
    return out


def _pack(groups: list[Group], deployments: list[Deployment]) -> dict[str, list[str]]:
    """First fit, largest first: every replica at its maximum on a node; {node: [replicas]}."""
    nodes = [[f"{g.name}-{i}", g.cpus, g.gpus, []] for g in groups for i in range(g.max)]
    replicas = sorted(((d.name, d.cpus, d.gpus) for d in deployments for _ in range(d.max)),
                      key=lambda r: (r[2], r[1]), reverse=True)
    eps = 1e-9
    for name, cpus, gpus in replicas:
        for node in nodes:
            if gpus > 0 and node[2] <= eps:
                continue
            if node[1] + eps >= cpus and node[2] + eps >= gpus:
                node[1] -= cpus
                node[2] -= gpus
                node[3].append(name)
                break
        else:
            raise AssertionError(f"no node left for a {name} replica ({cpus} CPU, {gpus} GPU): {nodes}")
    return {n[0]: n[3] for n in nodes}


@pytest.mark.parametrize("where", ["base", "staging", "production"])
def test_gpu_profile_fits_its_cluster(where: str) -> None:
    spec = _rayservice(where)["spec"]
    groups, deployments = _groups(spec), _deployments(spec)
    gpu_groups = [g for g in groups if g.gpus > 0]
    cpu_groups = [g for g in groups if g.gpus == 0]
    assert gpu_groups and cpu_groups, groups

    gpu_capacity = sum(g.max * g.gpus for g in gpu_groups)
    gpu_demand = sum(d.max * d.gpus for d in deployments)
    cpu_capacity = sum(g.max * g.cpus for g in groups)
    cpu_demand = sum(d.max * d.cpus for d in deployments)
    cpu_only_demand = sum(d.max * d.cpus for d in deployments if d.gpus == 0)
    cpu_group_capacity = sum(g.max * g.cpus for g in cpu_groups)
    lines = [f"{where}: groups " + ", ".join(f"{g.name} {g.min}-{g.max} x ({g.cpus:g} CPU, {g.gpus:g} GPU)" for g in groups),
             f"  replicas at max: " + ", ".join(f"{d.name} {d.max} x ({d.cpus:g} CPU, {d.gpus:g} GPU)" for d in deployments),
             f"  GPUs {gpu_demand:g} asked / {gpu_capacity:g} at maxReplicas; CPUs {cpu_demand:g} / {cpu_capacity:g}; "
             f"CPU-only deployments {cpu_only_demand:g} / cpu group {cpu_group_capacity:g}"]
    print("\n" + "\n".join(lines))

    placed = _pack(groups, deployments)
    print("  packing: " + "; ".join(f"{node}: {', '.join(r) or '-'}" for node, r in placed.items()))
    assert gpu_demand <= gpu_capacity, lines
    largest_gpu_node = max(g.gpus for g in gpu_groups)
    assert gpu_demand > gpu_capacity - largest_gpu_node, (
        f"{where}: the GPU replicas at their maxima never use the last GPU node(s) the group may add", lines)
    assert cpu_only_demand <= cpu_group_capacity, lines
    at_min = [Deployment(d.name, d.min, d.min, d.cpus, d.gpus) for d in deployments if d.gpus == 0]
    _pack([Group(g.name, g.min, g.min, g.cpus, g.gpus) for g in cpu_groups], at_min)  # API up with no GPU node


def test_overlay_caps_shrink_the_replicas_not_the_rest_of_the_profile() -> None:
    base = yaml.safe_load(_rayservice("base")["spec"]["serveConfigV2"])
    staging = yaml.safe_load(_rayservice("staging")["spec"]["serveConfigV2"])
    for deployment in staging["applications"][0]["deployments"]:
        (deployment.get("autoscaling_config") or {}).pop("max_replicas", None)
    for deployment in base["applications"][0]["deployments"]:
        (deployment.get("autoscaling_config") or {}).pop("max_replicas", None)
    assert staging == base


def test_packing_check_fails_when_the_gpu_group_is_too_small() -> None:
    groups = [Group("cpu", 1, 4, 4, 0), Group("gpu", 0, 1, 8, 1)]
    deployments = [Deployment("ASRDeployment", 1, 3, 2, 0.5)]
    with pytest.raises(AssertionError, match="no node left"):
        _pack(groups, deployments)
