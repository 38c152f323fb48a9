"""The GPU profile on a multi-node Ray cluster, as operators run it (issue 16).

One cluster for the module, all nodes on this machine and on 127.0.0.1 (tests/cluster/support.py):
- head: `--num-cpus 0` (no workload, like the RayService head), dashboard on 127.0.0.1;
- `cpu` worker: 4 CPUs (the RayService's cpu pod);
- two `gpu` workers: 8 CPUs and `--num-gpus 1` each, a logical GPU (the gpu pod; two because two
  ASR (2 x 0.5) and two diarization (2 x 0.25) replicas ask for 1.5 GPUs); with AI_DEVICE=cpu on
  every node the models compute on the CPU while Ray places them exactly as on a GPU node.
`serve_config.gpu.yaml` is deployed with `serve deploy` against the head's dashboard, changed
only as CHANGES lists. Then: placement through Ray's state API, the dashboard's Serve REST API,
requests through the head's proxy, and the bulk pipeline through `ray job submit` / `status` /
`logs` / `stop` exactly as the README shows it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from speech.evaluation import word_error_rate
from tests.cluster.support import (BIN, REPO, RayNode, base_env, dashboard_up, figure, private_tmp, remove_tmp,
                                   start_node, wait_for)
from tests.serve.support import JFK, create_local_key, free_port, reference

pytestmark = pytest.mark.cluster

CHANGES = [
    ("http_options.host", "0.0.0.0 -> 127.0.0.1", "every node binds and advertises 127.0.0.1"),
    ("http_options.port", "8000 -> a free port", "a shared machine"),
    ("proxy_location", "EveryNode -> HeadOnly", "three nodes on one host cannot each bind the same port; "
                                                "requests go through the head's proxy"),
    ("Ingress autoscaling", "min 2, max 8 -> min 1, max 1", "2 cores"),
    ("ASRDeployment autoscaling", "min 1, max 6 -> min 2, max 2", "two replicas placed, on 2 cores"),
    ("DiarizationDeployment autoscaling", "min 1, max 4 -> min 2, max 2", "two replicas placed, on 2 cores"),
    ("upscale_delay_s / downscale_delay_s", "30 / 300 -> 2 / 10", "shortened for the test"),
    ("device", "AI_DEVICE=cpu in the nodes' environment (not in the config)", "no real GPU here"),
]
"""Every change to serve_config.gpu.yaml the test makes; resource counts (num_cpus, num_gpus) are not changed."""

CLIPS = {  # name in the batch input folder -> clip in tests/data
    "jfk.flac": "jfk/jfk.flac",
    "leopard.wav": "picovoice_leopard/test.wav",
    "cards-001.wav": "pocketsphinx/cards/001.wav",
    "LJ002-0035.wav": "lhotse_fixtures/LJ002-0035.wav",
    "conv2spk.flac": "conv2spk_75s.flac",
    "conv3spk.flac": "conv3spk_64s.flac",
}
JOB_EXCLUDES = '{"excludes": ["tests/", "bench/", "docs/"]}'
"""The runtime-env excludes README.md documents for `ray job submit --working-dir .`."""


@dataclass
class Cluster:
    tmp: Path
    env: dict[str, str]
    dashboard: str
    gcs: str
    http: str
    api_key: str
    nodes: dict[str, RayNode]
    storage: Path

    def cli(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([str(BIN / args[0]), *args[1:]], cwd=REPO, env=self.env, timeout=timeout,
                              capture_output=True, text=True)
        if check:
            assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
        return done


def gpu_profile(port: int) -> dict:
    config = yaml.safe_load((REPO / "serve_config.gpu.yaml").read_text())
    config["http_options"].update(host="127.0.0.1", port=port)
    config["proxy_location"] = "HeadOnly"
    deployments = {d["name"]: d for d in config["applications"][0]["deployments"]}
    deployments["Ingress"]["autoscaling_config"].update(min_replicas=1, max_replicas=1)
    for name in ("ASRDeployment", "DiarizationDeployment"):
        deployments[name]["autoscaling_config"].update(min_replicas=2, max_replicas=2, upscale_delay_s=2,
                                                       downscale_delay_s=10)
    return config


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    tmp = private_tmp("rmn")
    storage = tmp / "storage"
    settings = {"STORAGE_BASE_PATH": str(storage), "RATE_LIMIT_PER_MINUTE": "0", "RATE_LIMIT_KEY_PER_MINUTE": "0",
                "ENVIRONMENT": "test", "JOB_RUNNER_CONCURRENCY": "1"}
    env = base_env(tmp, **settings)
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"  # `python` in a job's entrypoint is this venv's
    api_key = create_local_key(settings)
    gcs_port, dash_port = free_port(), free_port()
    nodes: dict[str, RayNode] = {}
    t0 = time.monotonic()
    try:
        nodes["head"] = start_node("head", tmp, env, head=True, gcs_port=gcs_port, dashboard_port=dash_port)
        dashboard = f"http://127.0.0.1:{dash_port}"
        wait_for("the head's dashboard", lambda: dashboard_up(dashboard), 180)
        gcs = f"127.0.0.1:{gcs_port}"
        c = Cluster(tmp, env, dashboard, gcs, "", api_key, nodes, storage)
        # One at a time: two nodes of one IP starting together can each take the other's raylet
        # for its own while they register ("The current node timed out during startup").
        for i, (name, cpus, gpus) in enumerate([("cpu", 4, 0), ("gpu-0", 8, 1), ("gpu-1", 8, 1)]):
            nodes[name] = start_node(name, tmp, env, head=False, address=gcs, num_cpus=cpus, num_gpus=gpus)
            wait_for(f"{i + 2} alive nodes", lambda n=i + 2: len(alive_nodes(c)) == n and nodes[name].alive(), 180, every=2)
        t_nodes = time.monotonic() - t0
        port = free_port()
        config = tmp / "serve_config.gpu.yaml"
        config.write_text(yaml.safe_dump(gpu_profile(port), sort_keys=False))
        c.http = f"http://127.0.0.1:{port}"
        c.cli("serve", "deploy", str(config), "-a", dashboard)

        def running() -> bool:
            status = yaml.safe_load(c.cli("serve", "status", "-a", dashboard).stdout)
            app = (status.get("applications") or {}).get("speech", {})
            assert app.get("status") != "DEPLOY_FAILED", status
            return app.get("status") == "RUNNING"

        wait_for("`serve status` says RUNNING", running, 600, every=3)
        for n in nodes.values():
            n.record()
        figure("multi-node cluster start", f"4 nodes up in {t_nodes:.1f} s; GPU profile RUNNING "
                                           f"{time.monotonic() - t0:.1f} s after the first `ray start`\n"
               + "changes to serve_config.gpu.yaml:\n" + "\n".join(f"  {w}: {c_} ({why})" for w, c_, why in CHANGES))
        yield c
    finally:
        if nodes.get("head") and nodes["head"].alive():
            subprocess.run([str(BIN / "serve"), "shutdown", "-y", "-a", f"http://127.0.0.1:{dash_port}"], cwd=REPO,
                           env=env, capture_output=True, timeout=120)
        leaked = []
        for name in ("gpu-1", "gpu-0", "cpu", "head"):
            if name in nodes:
                leaked += nodes[name].stop()
        remove_tmp(tmp)
        assert not leaked, f"Ray processes survived their nodes: {leaked}"


def alive_nodes(c: Cluster) -> list:
    from ray.util.state import list_nodes

    return [n for n in list_nodes(address=c.dashboard, detail=True) if n.state == "ALIVE"]


def test_replicas_pack_onto_the_gpu_worker_as_their_fractions_say(cluster: Cluster) -> None:
    from ray.util.state import list_actors

    nodes = {n.node_id: n for n in alive_nodes(cluster)}
    gpu_nodes = sorted(nid for nid, n in nodes.items() if n.resources_total.get("GPU"))
    role = {nid: (f"gpu-{gpu_nodes.index(nid)}" if nid in gpu_nodes else "head" if n.is_head_node else "cpu")
            for nid, n in nodes.items()}
    assert sorted(role.values()) == ["cpu", "gpu-0", "gpu-1", "head"], role
    actors = list_actors(address=cluster.dashboard, filters=[("state", "=", "ALIVE")], detail=True, limit=1000)
    rows, placed = [], Counter()
    for a in actors:
        gpus = float((a.required_resources or {}).get("GPU", 0))
        cpus = float((a.required_resources or {}).get("CPU", 0))
        rows.append((a.class_name, role.get(a.node_id, "?"), cpus, gpus))
        placed[(a.class_name, role.get(a.node_id, "?"))] += 1
    table = "\n".join(f"{cls:<48} {where:<5} {cpus:>4g} CPU {gpus:>5g} GPU"
                      for cls, where, cpus, gpus in sorted(rows))
    figure("placement (ray.util.state.list_actors, ALIVE)", table)

    asr = [r for r in rows if r[0].endswith("ASRDeployment")]
    diar = [r for r in rows if r[0].endswith("DiarizationDeployment")]
    assert len(asr) >= 2 and len(diar) >= 2, table
    assert all(r[1].startswith("gpu") and r[3] == 0.5 for r in asr), table
    assert all(r[1].startswith("gpu") and r[3] == 0.25 for r in diar), table
    with_gpus = [r for r in rows if r[3] > 0]
    assert all(r[1].startswith("gpu") for r in with_gpus), f"an actor with num_gpus off the GPU workers:\n{table}"
    for nid in gpu_nodes:
        assert nodes[nid].resources_total["GPU"] == 1
        on_it = [r for r in with_gpus if r[1] == role[nid]]
        assert sum(r[3] for r in on_it) <= 1.0, table  # the shares of one GPU add up to at most 1
    assert sum(r[3] for r in with_gpus) == 2 * 0.5 + 2 * 0.25 or len(asr) + len(diar) > 4, table
    on_head = [r for r in rows if r[1] == "head" and r[2] > 0]
    assert not on_head, f"the head (num-cpus 0) runs work:\n{table}"


def test_dashboard_serve_api_reports_our_deployments_and_replica_states(cluster: Cluster) -> None:
    from ray.util.state import list_nodes

    r = httpx.get(cluster.dashboard + "/api/serve/applications/", timeout=30)
    assert r.status_code == 200, r.text
    app = r.json()["applications"]["speech"]
    assert app["status"] == "RUNNING"
    deployments = app["deployments"]
    assert set(deployments) == {"Ingress", "ASRDeployment", "DiarizationDeployment", "JobRunnerDeployment"}
    node_ids = {n.node_id for n in list_nodes(address=cluster.dashboard)}
    lines = []
    for name, d in sorted(deployments.items()):
        states = Counter(rep["state"] for rep in d["replicas"])
        lines.append(f"{name:<24} {d['status']:<10} " + ", ".join(f"{k} {v}" for k, v in sorted(states.items())))
        assert d["status"] == "HEALTHY", d
        assert states.get("RUNNING", 0) >= (2 if name in ("ASRDeployment", "DiarizationDeployment") else 1), d
        assert all(rep["node_id"] in node_ids for rep in d["replicas"]), d
    figure("dashboard /api/serve/applications/ (replica states)", "\n".join(lines))


def test_transcription_and_diarization_through_the_heads_proxy(cluster: Cluster) -> None:
    headers = {"Authorization": f"Bearer {cluster.api_key}"}
    assert httpx.get(cluster.http + "/ready", timeout=60).status_code == 200
    with open(JFK, "rb") as f:
        r = httpx.post(cluster.http + "/v1/audio/transcriptions", data={"model": "whisper-1"},
                       files={"file": ("jfk.flac", f)}, headers=headers, timeout=600)
    assert r.status_code == 200, r.text
    assert word_error_rate([reference(JFK)], [r.json()["text"]]) <= 0.10, r.text
    conv = REPO / "tests" / "data" / "conv2spk_75s.flac"
    with open(conv, "rb") as f:
        r = httpx.post(cluster.http + "/v1/audio/transcriptions",
                       data={"model": "whisper-1", "response_format": "diarized_json", "num_speakers": "2"},
                       files={"file": ("conv.flac", f)}, headers=headers, timeout=900)
    assert r.status_code == 200, r.text
    body = r.json()
    speakers = {s.get("speaker") for s in body["segments"]}
    assert len(speakers - {None, "UNKNOWN"}) == 2, body["segments"][:5]


# ------------------------------------------------------------------------------------ ray job
def _batch_input(tmp: Path) -> Path:
    folder = tmp / "batch-in"
    if not folder.exists():
        folder.mkdir()
        for name, clip in CLIPS.items():
            shutil.copyfile(REPO / "tests" / "data" / clip, folder / name)
    return folder


def _submit_args(cluster: Cluster, folder: Path, out: Path) -> list[str]:
    """README.md's command, word for word, with this cluster's address and files."""
    return ["ray", "job", "submit", "--address", cluster.dashboard, "--working-dir", ".",
            "--runtime-env-json", JOB_EXCLUDES, "--",
            "python", "-m", "pipelines.batch_transcribe", "--input", str(folder), "--output", str(out),
            "--actors", "1", "--threads-per-actor", "1"]


def _job_id(text: str) -> str:
    found = re.search(r"raysubmit_[A-Za-z0-9]+", text)
    assert found, text
    return found.group(0)


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines() if line.strip()] if out.exists() else []


def test_ray_job_submit_status_logs_as_the_readme_says(cluster: Cluster) -> None:
    folder = _batch_input(cluster.tmp)
    out = cluster.tmp / "job-out" / "results.jsonl"
    out.parent.mkdir(exist_ok=True)
    t0 = time.monotonic()
    submitted = cluster.cli(*_submit_args(cluster, folder, out), timeout=900)
    took = time.monotonic() - t0
    job = _job_id(submitted.stdout + submitted.stderr)
    status = cluster.cli("ray", "job", "status", "--address", cluster.dashboard, job).stdout
    assert f"Job '{job}' succeeded" in status, status
    logs = cluster.cli("ray", "job", "logs", "--address", cluster.dashboard, job).stdout
    assert "batch summary" in logs, logs[-2000:]

    records = {Path(r["path"]).name: r for r in _records(out)}
    assert set(records) == set(CLIPS), sorted(records)
    refs, hyps = [], []
    for name, rec in sorted(records.items()):
        assert rec["status"] == "succeeded", rec
        assert rec["duration"] > 0 and rec["segments"], rec
        ref = REPO / "tests" / "data" / Path(CLIPS[name]).with_suffix(".txt")
        if ref.exists():  # clips with a reference transcript beside them
            refs.append(ref.read_text())
            hyps.append(rec["text"])
    assert len(refs) >= 3 and word_error_rate(refs, hyps) <= 0.15, list(zip(refs, hyps))
    assert "ask not what your country can do for you" in records["jfk.flac"]["text"].lower()
    figure("ray job submit (README command)", f"{len(records)} files, {sum(r['duration'] for r in records.values()):.0f} s "
                                              f"of audio: submit -> SUCCEEDED in {took:.1f} s (job {job})")


STOP_CLIPS = {**CLIPS, **{f"conv{n}spk-{i}.wav": f"conv{n}spk_{75 if n == 2 else 64}s.flac"
                            for n in (2, 3) for i in (1, 2)}}
"""Four more minutes of audio than CLIPS, so that a stop lands part-way: the two conversations
again, each copy at a slightly lower level (other content, so not skipped as already done)."""


def _quieter_copy(src: Path, dst: Path, gain: float) -> None:
    import wave

    import numpy as np

    from speech.audio import decode_audio

    audio = decode_audio(src)
    samples = np.asarray(getattr(audio, "samples", audio), dtype=np.float32)
    pcm = (np.clip(samples * gain, -1, 1) * 32767).astype("<i2")
    with wave.open(str(dst), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm.tobytes())


def test_ray_job_stop_leaves_a_state_the_next_submission_completes(cluster: Cluster) -> None:
    folder = cluster.tmp / "stop-in"
    folder.mkdir()
    for name, clip in STOP_CLIPS.items():
        if name.startswith("conv") and name.endswith(".wav"):
            _quieter_copy(REPO / "tests" / "data" / clip, folder / name, gain=1 - 0.05 * int(name[-5]))
        else:
            shutil.copyfile(REPO / "tests" / "data" / clip, folder / name)
    out = cluster.tmp / "stop-out" / "results.jsonl"
    out.parent.mkdir(exist_ok=True)
    t0 = time.monotonic()
    # one window per model call: files finish one by one, not all with the last batch
    args = [*_submit_args(cluster, folder, out), "--batch-windows", "1"]
    submitted = cluster.cli(*args[:3], "--no-wait", *args[3:], timeout=300)
    job = _job_id(submitted.stdout + submitted.stderr)
    wait_for("the first file written by the job", lambda: len(_records(out)) >= 1, 600)
    t_first = time.monotonic() - t0
    cluster.cli("ray", "job", "stop", "--address", cluster.dashboard, job, timeout=300)
    def stopped() -> bool:
        done = cluster.cli("ray", "job", "status", "--address", cluster.dashboard, job)
        return f"Job '{job}' was stopped" in done.stdout + done.stderr  # a warning: on stderr

    wait_for("the job stopped", stopped, 120)
    before = {Path(r["path"]).name for r in _records(out) if r["status"] == "succeeded"}
    assert 1 <= len(before) < len(STOP_CLIPS), f"the job was not stopped part-way: {sorted(before)}"

    t1 = time.monotonic()
    again = cluster.cli(*args, timeout=900)
    took = time.monotonic() - t1
    logs = cluster.cli("ray", "job", "logs", "--address", cluster.dashboard, _job_id(again.stdout + again.stderr)).stdout
    skipped = re.search(r"skipped \(done before\)\s+(\d+)", logs)
    assert skipped and int(skipped.group(1)) >= len(before), logs[-2000:]
    records = _records(out)
    by_name = Counter(Path(r["path"]).name for r in records)
    assert set(by_name) == set(STOP_CLIPS) and set(by_name.values()) == {1}, by_name
    assert all(r["status"] == "succeeded" for r in records), records
    figure("ray job stop / resume", f"first record after {t_first:.1f} s; stopped with {len(before)}/{len(STOP_CLIPS)} "
                                    f"files done; the resubmission skipped {skipped.group(1)} and finished the rest "
                                    f"in {took:.1f} s; every file once in the output")
