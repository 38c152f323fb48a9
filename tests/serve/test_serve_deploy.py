"""`serve build` and `serve deploy serve_config.yaml` against a local head started by `ray start`.

The head is private to this test: its own ports, its own temp dir (so no other `ray.init()` on
the machine finds it), RAY_AUTH_MODE=disabled set explicitly, and it is stopped through the
handle of the `ray start --block` process that owns it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from speech.evaluation import word_error_rate
from tests.serve.support import JFK, create_local_key, free_port, reference

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CONFIG = REPO / "serve_config.yaml"


def cli(*args: str, env: dict[str, str], timeout: float = 300) -> str:
    done = subprocess.run([str(BIN / args[0]), *args[1:]], cwd=REPO, env=env, timeout=timeout,
                          capture_output=True, text=True)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def head() -> Iterator[tuple[str, int, dict[str, str], str]]:
    """(dashboard address, free serve port, env, API key) of a fresh `ray start --head`."""
    tmp = Path(tempfile.mkdtemp(prefix="rsd", dir="/tmp"))
    dash, gcs, client, agent, metrics_port = (free_port() for _ in range(5))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    settings_env = {"STORAGE_BASE_PATH": str(tmp / "storage"), "JOB_RUNNER_CONCURRENCY": "0",
                    "ENVIRONMENT": "test"}
    env.update(RAY_AUTH_MODE="disabled", PYTHONPATH=str(REPO), **settings_env)
    api_key = create_local_key(settings_env)
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=2",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
         f"--metrics-export-port={metrics_port}", f"--temp-dir={tmp}"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, "ray start exited"
            try:
                if httpx.get(address + "/api/version", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the head's dashboard never came up"
            time.sleep(1)
        yield address, free_port(), env, api_key
    finally:
        subprocess.run([str(BIN / "serve"), "shutdown", "-y", "-a", address], cwd=REPO, env=env,
                       capture_output=True, timeout=120)
        proc.send_signal(signal.SIGTERM)  # `ray start --block` stops its cluster on SIGTERM
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def test_serve_build_writes_a_deployable_config(tmp_path: Path) -> None:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    out = tmp_path / "built.yaml"
    cli("serve", "build", "serve.app:app", "-o", str(out), env=env)
    built = yaml.safe_load(out.read_text())
    names = {d["name"] for d in built["applications"][0]["deployments"]}
    assert names == {"Ingress", "ASRDeployment", "DiarizationDeployment", "JobRunnerDeployment"}


def test_serve_deploy_of_the_cpu_profile_serves_transcriptions(head, tmp_path: Path) -> None:  # noqa: ANN001
    address, port, env, api_key = head
    config = yaml.safe_load(CONFIG.read_text())
    config["http_options"]["port"] = port  # the file's 8000 may be taken on a shared machine
    deployed = tmp_path / "serve_config.yaml"
    deployed.write_text(yaml.safe_dump(config))
    cli("serve", "deploy", str(deployed), "-a", address, env=env)

    deadline = time.monotonic() + 300
    while True:
        status = yaml.safe_load(cli("serve", "status", "-a", address, env=env))
        app = (status.get("applications") or {}).get("speech", {})
        if app.get("status") == "RUNNING":
            break
        assert app.get("status") != "DEPLOY_FAILED", status
        assert time.monotonic() < deadline, status
        time.sleep(3)

    base = f"http://127.0.0.1:{port}"
    assert httpx.get(base + "/ready", timeout=30).status_code == 200
    with open(JFK, "rb") as f:
        r = httpx.post(base + "/v1/audio/transcriptions", data={"model": "whisper-1"},
                       files={"file": ("jfk.flac", f)}, timeout=300,
                       headers={"Authorization": f"Bearer {api_key}"})
    assert r.status_code == 200, r.text
    assert word_error_rate([reference(JFK)], [r.json()["text"]]) <= 0.10, r.text
