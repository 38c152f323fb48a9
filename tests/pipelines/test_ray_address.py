"""The bulk command after a Ray head on this machine has been stopped (issue 16).

`ray start --head` records its address in `<ray temp dir>/ray_current_cluster`, and stopping the
head leaves the file behind. `ray.init(address="auto")` then retried the dead GCS for ever, so the
README's bulk command (no `--ray-address`) hung. Here a real head is started and stopped in a
private temp dir (RAY_TMPDIR, so no other Ray on the machine is touched), then:
- the README's command gives up on the recorded address, says so naming it, starts its private
  Ray and transcribes the file;
- the same dead address given explicitly (RAY_ADDRESS, as `ray job submit` would set it) is a
  usage error (exit 2) naming the address.
Each subprocess has a timeout: a hang fails the test instead of blocking the suite.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.support import base_env, private_tmp, reap, remove_tmp, start_node, wait_for
from tests.serve.support import free_port

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def stale() -> Iterator[tuple[Path, str, dict[str, str]]]:
    """(temp dir, dead address, env) after a `ray start --head` there was stopped by its handle."""
    tmp = private_tmp("rst")
    env = base_env(tmp)
    gcs = free_port()
    node = start_node("stale-head", tmp, env, head=True, gcs_port=gcs, num_cpus=1)
    recorded = tmp / "ray" / "ray_current_cluster"
    try:
        wait_for("the head records its address", lambda: recorded.exists() and recorded.read_text().strip(), 120)
        node.record()
    finally:
        leaked = node.stop()
    address = recorded.read_text().strip()
    try:
        assert not leaked, f"Ray processes survived their head: {leaked}"
        assert address.endswith(f":{gcs}"), address
        yield tmp, address, env
    finally:
        remove_tmp(tmp)


def run_batch(args: list[str], env: dict[str, str], tmp: Path, timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    # its own session, so that whatever a failed run leaves behind can be found and stopped by PID
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.batch_transcribe", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    import psutil

    children: set[int] = set()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        children = {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
        proc.kill()
        out, err = proc.communicate()
        reap(children, timeout=5)
        pytest.fail(f"pipelines.batch_transcribe {args} still running after {timeout:g} s (hung?)\n{out}\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), time.monotonic() - t0


def test_bulk_command_after_a_stopped_head_starts_its_private_ray(stale, speech_data_dir: Path) -> None:  # noqa: ANN001
    tmp, address, env = stale
    clip = tmp / "in" / "jfk.flac"
    clip.parent.mkdir()
    shutil.copyfile(speech_data_dir / "jfk" / "jfk.flac", clip)
    out = tmp / "out.jsonl"
    done, took = run_batch(["--input", str(clip.parent), "--output", str(out), "--num-cpus", "1"], env, tmp, timeout=400)
    print(f"\nstale address {address}: README bulk command ended {done.returncode} after {took:.1f} s")
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert address in done.stdout and "does not answer" in done.stdout, done.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(Path(r["path"]).name, r["status"]) for r in records] == [("jfk.flac", "succeeded")], records
    assert "ask not what your country can do for you" in records[0]["text"].lower()


def test_a_dead_cluster_named_explicitly_is_a_usage_error(stale, speech_data_dir: Path) -> None:  # noqa: ANN001
    tmp, address, env = stale
    done, took = run_batch(["--input", str(speech_data_dir / "jfk" / "jfk.flac"), "--output", str(tmp / "x.jsonl")],
                           {**env, "RAY_ADDRESS": address}, tmp, timeout=120)
    print(f"\nRAY_ADDRESS={address} (dead): exit {done.returncode} after {took:.1f} s")
    assert done.returncode == 2, f"{done.stdout}\n{done.stderr}"
    assert address in done.stderr and "RAY_ADDRESS" in done.stderr, done.stderr
    assert not (tmp / "x.jsonl").exists()
