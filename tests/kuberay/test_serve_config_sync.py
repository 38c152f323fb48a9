"""The RayService runs exactly the Serve application of serve_config.gpu.yaml."""

from __future__ import annotations

import sys

import yaml

from tests.kuberay.conftest import KUBERAY, REPO, load_docs, run


def _rayservice() -> dict:
    (doc,) = load_docs(KUBERAY / "base" / "rayservice.yaml")
    return doc


def test_serve_config_v2_equals_the_gpu_profile() -> None:
    embedded = yaml.safe_load(_rayservice()["spec"]["serveConfigV2"])
    assert embedded == yaml.safe_load((REPO / "serve_config.gpu.yaml").read_text()), (
        "run: python kuberay/render_serve_config.py")


def test_render_script_reports_nothing_to_do() -> None:
    result = run([sys.executable, str(KUBERAY / "render_serve_config.py"), "--check"])
    assert result.returncode == 0, result.stderr


def test_embedded_config_is_a_valid_serve_deploy_config_with_fractional_gpus() -> None:
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load(_rayservice()["spec"]["serveConfigV2"]))
    (app,) = config.applications
    assert app.import_path == "serve.app:app"
    gpus = {d.name: d.ray_actor_options.num_gpus if d.ray_actor_options else 0 for d in app.deployments}
    assert 0 < gpus["ASRDeployment"] < 1 and 0 < gpus["DiarizationDeployment"] < 1


def test_render_replaces_only_the_serve_config_block() -> None:
    sys.path.insert(0, str(KUBERAY))
    try:
        import render_serve_config as r
    finally:
        sys.path.remove(str(KUBERAY))
    text = "spec:\n  serveConfigV2: |\n    old: 1\n\n    older: 2\n  rayClusterConfig:\n    rayVersion: x\n"
    out = r.render(text, "a: 1\nb:\n  - c\n")
    assert out == "spec:\n  serveConfigV2: |\n    a: 1\n    b:\n      - c\n  rayClusterConfig:\n    rayVersion: x\n"


def test_serve_config_overrules_none_of_the_pods_settings() -> None:
    """Issue 13 bug 4 on KubeRay: Ray applies an application's runtime_env `env_vars` over the
    environment of the pods, so a name pinned there would silently win over the ConfigMap (and
    over the cpu group's own AI_DEVICE). The pods' environment must be what decides."""
    spec = _rayservice()["spec"]
    embedded = yaml.safe_load(spec["serveConfigV2"])
    pinned = {name for app in embedded["applications"]
              for name in ((app.get("runtime_env") or {}).get("env_vars") or {})}
    (configmap,) = load_docs(KUBERAY / "base" / "configmap.yaml")
    pod_env = set(configmap["data"])
    cluster = spec["rayClusterConfig"]
    for group in (cluster["headGroupSpec"], *cluster["workerGroupSpecs"]):
        for container in group["template"]["spec"]["containers"]:
            pod_env |= {e["name"] for e in container.get("env") or []}
    assert "AI_DEVICE" in pod_env
    assert not pinned & pod_env, f"serve_config.gpu.yaml's runtime_env overrules the pods on {pinned & pod_env}"
