"""Shared fixtures of the deployment tests: the repo paths and the external linters."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
KUBERAY = REPO / "kuberay"
MONITORING = REPO / "monitoring"
CRDS = REPO / "tests" / "data" / "kuberay-crds"
"""KubeRay's CRDs (RayService, RayJob, RayCluster), vendored with their licence and README."""
VENV_BIN = Path(sys.executable).parent


def load_docs(path: Path) -> list[dict]:
    """Every non-empty YAML document of a manifest file."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def tool(name: str) -> str | None:
    """A command from this virtualenv first (pip-installed linters), then PATH."""
    local = VENV_BIN / name
    return str(local) if local.exists() else shutil.which(name)


@pytest.fixture(scope="session")
def promtool() -> str:
    """promtool, installing Debian's `prometheus` package once if it is missing and we are root."""
    found = shutil.which("promtool")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "--no-install-recommends", "prometheus"]
        if subprocess.run(install, env=env, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update"], env=env, capture_output=True)
            subprocess.run(install, env=env, capture_output=True)
        found = shutil.which("promtool")
    if found is None:
        pytest.skip("issue 5: environment only, promtool not found and `apt-get install prometheus` was not possible here")
    return found


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run a linter; the test shows its output when it fails."""
    return subprocess.run(cmd, capture_output=True, text=True, **kwargs)
