"""kuberay/deploy.sh: refuses bad arguments, and under DRY_RUN=1 changes nothing but says
what it would apply."""

from __future__ import annotations

import os
import shutil
import sys

import pytest

from tests.kuberay.conftest import REPO, run

SCRIPT = REPO / "kuberay" / "deploy.sh"


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHON": sys.executable, **extra}


@pytest.mark.parametrize("args", [[], ["staging"], ["nowhere", "deploy"], ["staging", "destroy"]])
def test_bad_arguments_print_usage_and_fail(args: list[str]) -> None:
    result = run(["bash", str(SCRIPT), *args], env=_env())
    assert result.returncode != 0
    assert "usage:" in result.stderr


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="issue 5: environment only, kubectl (for kustomize) is not installed")
def test_dry_run_deploy_renders_the_overlay_and_mutates_nothing() -> None:
    result = run(["bash", str(SCRIPT), "staging", "deploy"], env=_env(DRY_RUN="1"))
    assert result.returncode == 0, result.stderr
    assert "namespace: speech-staging" in result.stdout
    assert "kind: RayService" in result.stdout
    mutations = [line for line in result.stdout.splitlines() if line.startswith("DRY-RUN: ")]
    assert mutations and all("kubectl" in m for m in mutations)
    assert any("wait rayservice/speech" in m for m in mutations)
