"""Kubernetes manifests validated offline: KubeRay resources against the CRD schemas in
tests/data/kuberay-crds, built-in kinds against Kubernetes' own schemas (kubernetes-validate)."""

from __future__ import annotations

import copy
import functools
import shutil
import subprocess

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.kuberay.conftest import CRDS, KUBERAY, load_docs

K8S_VERSION = "1.33"
KUBERAY_KINDS = {"RayService": "ray.io_rayservices.yaml", "RayJob": "ray.io_rayjobs.yaml",
                 "RayCluster": "ray.io_rayclusters.yaml"}
# Custom resources of the Prometheus operator: no schema here; checked by hand below.
MONITORING_KINDS = {"PodMonitor", "ServiceMonitor", "PrometheusRule"}

MANIFESTS = sorted((KUBERAY / "base").glob("*.yaml")) + sorted((KUBERAY / "jobs").glob("*.yaml"))
MANIFESTS = [p for p in MANIFESTS if p.name != "kustomization.yaml"]


def _strict(schema: dict) -> dict:
    """The CRD schema with unknown fields refused, as the API server prunes them silently:
    a misspelt field would otherwise pass here and vanish in the cluster."""
    schema = copy.deepcopy(schema)

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if (node.get("type") == "object" and "properties" in node
                    and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    schema["properties"]["metadata"] = {"type": "object"}
    return schema


@functools.cache
def _crd_validator(kind: str, version: str) -> jsonschema.Draft7Validator:
    # libyaml when present: the CRD files are over 1 MB each.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((CRDS / KUBERAY_KINDS[kind]).read_text(), Loader=loader)
    (ver,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    assert ver["served"], f"{kind} {version} is not served by the operator"
    return jsonschema.Draft7Validator(_strict(ver["schema"]["openAPIV3Schema"]))


def _docs() -> list[tuple[str, dict]]:
    return [(f"{p.relative_to(KUBERAY)}#{i}", d) for p in MANIFESTS for i, d in enumerate(load_docs(p))]


def _rendered_overlays() -> list[tuple[str, dict]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return []
    out = []
    for overlay in sorted((KUBERAY / "overlays").iterdir()):
        text = subprocess.run([kubectl, "kustomize", str(overlay)], check=True,
                              capture_output=True, text=True).stdout
        out += [(f"overlays/{overlay.name}#{i}", d) for i, d in enumerate(yaml.safe_load_all(text)) if d]
    return out


ALL_DOCS = _docs() + _rendered_overlays()


def _check_crd(doc: dict) -> list[str]:
    group, version = doc["apiVersion"].split("/")
    assert group == "ray.io"
    validator = _crd_validator(doc["kind"], version)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


@pytest.mark.parametrize("where,doc", ALL_DOCS, ids=[w for w, _ in ALL_DOCS])
def test_manifest_is_valid(where: str, doc: dict) -> None:
    kind = doc["kind"]
    assert doc["metadata"].get("name"), f"{where}: unnamed {kind}"
    if kind in KUBERAY_KINDS:
        errors = _check_crd(doc)
        assert not errors, f"{where} ({kind}):\n" + "\n".join(errors)
    elif kind in MONITORING_KINDS:
        assert doc["apiVersion"] == "monitoring.coreos.com/v1"
        assert doc["metadata"]["labels"]["release"] == "prometheus"
    else:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(map(str, exc.path))
            pytest.fail(f"{where} ({kind}) {path}: {exc.message}")


def test_strict_crd_check_catches_a_misspelt_field() -> None:
    doc = copy.deepcopy(next(d for _, d in _docs() if d["kind"] == "RayService"))
    doc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    assert any("imagePullPolcy" in e for e in _check_crd(doc))


def _rayservice() -> dict:
    return next(d for _, d in _docs() if d["kind"] == "RayService")


def test_rayservice_autoscales_gpu_workers_from_zero_and_head_runs_no_workload() -> None:
    cluster = _rayservice()["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    gpu = next(g for g in cluster["workerGroupSpecs"] if g["groupName"] == "gpu")
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 1


def test_every_ray_container_gets_the_settings_and_runs_non_root() -> None:
    for _, doc in _docs():
        if doc["kind"] not in KUBERAY_KINDS:
            continue
        cluster = doc["spec"].get("rayClusterConfig") or doc["spec"]["rayClusterSpec"]
        groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
        for group in groups:
            pod = group["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True
            for c in pod["containers"]:
                refs = {next(iter(r.values()))["name"] for r in c["envFrom"]}
                assert refs == {"speech-config", "speech-secrets"}, doc["metadata"]["name"]
                assert c["securityContext"]["allowPrivilegeEscalation"] is False


def test_configmap_has_the_guides_variables_and_secrets_stay_out_of_it() -> None:
    (config,) = load_docs(KUBERAY / "base" / "configmap.yaml")
    (secret,) = load_docs(KUBERAY / "base" / "secret.template.yaml")
    assert {"ENVIRONMENT", "REDIS_URL", "AI_DEVICE", "WHISPER_MODEL_PATH", "DIARIZATION_MODEL_PATH",
            "STORAGE_TYPE", "STORAGE_BASE_PATH", "AUDIO_MAX_FILE_SIZE"} <= set(config["data"])
    assert {"SECRET_KEY", "DB_URL", "HF_TOKEN"} <= set(secret["stringData"])
    assert not {"SECRET_KEY", "DB_URL", "HF_TOKEN"} & set(config["data"])
    assert all("<replace" in v for v in secret["stringData"].values()), "real secrets in the template?"
    kustomization = yaml.safe_load((KUBERAY / "base" / "kustomization.yaml").read_text())
    assert "secret.template.yaml" not in kustomization["resources"]


def test_ingress_has_tls_and_a_body_limit_above_the_upload_limit() -> None:
    (ingress,) = load_docs(KUBERAY / "base" / "ingress.yaml")
    (config,) = load_docs(KUBERAY / "base" / "configmap.yaml")
    assert ingress["spec"]["tls"][0]["secretName"]
    body = ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"]
    assert body.endswith("m") and int(body[:-1]) * 2**20 >= int(config["data"]["AUDIO_MAX_FILE_SIZE"])


def test_rayjob_runs_the_bulk_pipeline_and_cleans_up() -> None:
    (job,) = load_docs(KUBERAY / "jobs" / "rayjob-batch-transcribe.yaml")
    assert job["spec"]["entrypoint"].startswith("python -m pipelines.batch_transcribe --input ")
    assert "--output " in job["spec"]["entrypoint"]
    assert job["spec"]["shutdownAfterJobFinishes"] is True


def test_kustomization_lists_every_base_manifest() -> None:
    kustomization = yaml.safe_load((KUBERAY / "base" / "kustomization.yaml").read_text())
    files = {p.name for p in (KUBERAY / "base").glob("*.yaml")} - {"kustomization.yaml", "secret.template.yaml"}
    assert set(kustomization["resources"]) == files


def test_overlays_name_their_namespace() -> None:
    for overlay in (KUBERAY / "overlays").iterdir():
        k = yaml.safe_load((overlay / "kustomization.yaml").read_text())
        assert k["namespace"] == f"speech-{overlay.name}"
