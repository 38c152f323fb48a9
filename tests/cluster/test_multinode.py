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
`logs` / `stop` exactly as the README shows it. Last, a GPU worker is lost under load and comes
back (it runs last: it changes which replicas live where).
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
from tests.cluster.support import (BIN, REPO, HttpLoad, RayNode, badly_answered, base_env, dashboard_up, figure,
                                   private_tmp, reap, remove_tmp, start_node, wait_for)
from tests.reliability.support import Ledger
from tests.serve.support import JFK, LIBRI, create_local_key, free_port, reference

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


# ------------------------------------------------------------------------------ node loss
LOSS_JOBS_BEFORE = ["conv2spk.flac", "conv3spk.flac", "jfk.flac", "leopard.wav"]
"""Jobs queued before the node is lost (the long ones first: one is running at the loss)."""
LOSS_JOBS_DURING = ["cards-001.wav", "LJ002-0035.wav"]
"""Jobs submitted while the node is gone."""
LOSS_REQUEST_TIMEOUT_S = 300.0
"""A synchronous request not answered within this is a request without an answer."""
WANT_REPLICAS = {"Ingress": 1, "ASRDeployment": 2, "DiarizationDeployment": 2, "JobRunnerDeployment": 1}


def _handles_to_node_ids(cluster: Cluster) -> tuple[dict[str, str], list]:
    """Each node handle's Ray node id (through the PIDs of the actors on it), and the live actors."""
    from ray.util.state import list_actors

    for node in cluster.nodes.values():
        node.record()
    actors = list_actors(address=cluster.dashboard, filters=[("state", "=", "ALIVE")], detail=True, limit=1000)
    ids = {}
    for a in actors:
        for name, node in cluster.nodes.items():
            if a.pid in node.pids:
                ids[name] = a.node_id
    return ids, actors


def _submit_job(cluster: Cluster, client: httpx.Client, audio: Path, key: str, ledger: Ledger,
                deadline_s: float = 300) -> str:
    """POST /v1/jobs until accepted: sent again after each 503's Retry-After with the same
    Idempotency-Key (so a retry never makes a second job), as a client would; returns the job id."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            r = client.post(cluster.http + "/v1/jobs", files={"file": (audio.name, audio.read_bytes())},
                            headers={"Authorization": f"Bearer {cluster.api_key}", "Idempotency-Key": key},
                            timeout=LOSS_REQUEST_TIMEOUT_S)
        except httpx.HTTPError as exc:
            ledger.request(None)
            raise AssertionError(f"job {key}: no answer: {exc!r}") from exc
        ledger.request(r.status_code)
        if r.status_code in (200, 202):
            return r.json()["id"]
        assert r.status_code == 503 and r.headers.get("retry-after"), f"job {key} refused: {r.status_code} {r.text}"
        assert time.monotonic() < deadline, f"job {key} not accepted within {deadline_s:g} s: {r.text}"
        time.sleep(min(float(r.headers["retry-after"]), 3.0))


class JobsDb:
    """The tests' own view of the service's database (the embedded SQLite file in storage)."""

    def __init__(self, storage: Path) -> None:
        from sqlalchemy import create_engine

        self.engine = create_engine(f"sqlite:///{storage / 'service.db'}")

    def rows(self, sql: str, **params: object) -> list:
        from sqlalchemy import text

        with self.engine.connect() as conn:
            return list(conn.execute(text(sql), params))

    def jobs(self, key_prefix: str) -> list:
        return self.rows("SELECT id, status, attempts, error, idempotency_key FROM jobs "
                         "WHERE idempotency_key LIKE :p", p=f"{key_prefix}-%")

    def one_transcript(self, job_id: str) -> bool:
        """Exactly one transcript: indices 0..n-1 once each, times never going back (as the
        reliability suite checks: a second copy appended would restart at 0 or repeat an index)."""
        segs = self.rows('SELECT idx, start FROM segments WHERE job_id = :j ORDER BY idx, id', j=job_id)
        return bool(segs) and [s.idx for s in segs] == list(range(len(segs))) and all(
            b.start >= a.start for a, b in zip(segs, segs[1:]))

    def sync_records(self, prefix: str) -> Counter:
        return Counter(r.filename for r in self.rows(
            "SELECT filename FROM jobs WHERE source = 'sync' AND filename LIKE :p", p=f"{prefix}-%"))


def _serve_back(cluster: Cluster) -> dict | None:
    """The application RUNNING with every deployment HEALTHY, exactly its replicas RUNNING, all on
    live nodes; None until then."""
    r = httpx.get(cluster.dashboard + "/api/serve/applications/", timeout=30)
    app = (r.json().get("applications") or {}).get("speech") or {}
    if app.get("status") != "RUNNING":
        return None
    alive = {n.node_id for n in alive_nodes(cluster)}
    for name, want in WANT_REPLICAS.items():
        d = app["deployments"][name]
        states = Counter(rep["state"] for rep in d["replicas"])
        if (d["status"] != "HEALTHY" or states != Counter({"RUNNING": want})
                or any(rep["node_id"] not in alive for rep in d["replicas"])):
            return None
    return app


def _logged(cluster: Cluster, msg: str) -> int:
    """How many times the replicas logged `msg` (their stderr: worker-*.err of the cluster's one
    session folder, which every node on this machine shares)."""
    return sum(path.read_text(errors="replace").count(msg)
               for path in cluster.tmp.glob("ray/session_*/logs/worker-*.err"))


def test_gpu_worker_lost_under_load_comes_back_and_every_job_finishes_once(cluster: Cluster) -> None:
    """A GPU worker lost as a machine is lost: every process of the node SIGKILLed at once
    (RayNode.lose), not SIGTERM. SIGTERM to `ray start --block` is `ray stop`: the raylet
    unregisters and the GCS knows at once, a planned drain. A lost machine says nothing: the GCS
    finds out by its failed health checks, calls to its replicas fail mid-flight, a job's runner
    on it never hands the job back. Then the node is started again with the same arguments (a new
    raylet, as a replaced machine).

    The node lost is gpu-1 unless the Ingress replica happens to live there (Serve spreads
    replicas over the nodes); then it is gpu-0. A lost Ingress takes the requests inside it with
    it (Serve's proxy answers them 500 itself; tests/reliability/test_faults.py covers that case);
    this test is about the model replicas and the job runner on a GPU worker.

    Under load (two threads of synchronous transcriptions; jobs POSTed before and during the
    outage) every synchronous answer is 200 or 503 with Retry-After (none unanswered within its
    timeout, no other status); every job succeeds exactly once (one row per Idempotency-Key, one
    transcript each, as the reliability suite checks them); every 200 is recorded once; the
    application is RUNNING again with all its replicas on live nodes."""
    ledger = Ledger()
    ids, actors = _handles_to_node_ids(cluster)
    ingress_node = next(a.node_id for a in actors if a.class_name.endswith("Ingress"))
    victim = "gpu-1" if ids.get("gpu-1") != ingress_node else "gpu-0"
    victim_id = ids[victim]
    on_victim = Counter(a.class_name.split(":")[-1] for a in actors if a.node_id == victim_id)
    db = JobsDb(cluster.storage)
    tag = f"loss-{int(time.time())}"
    files = {name: REPO / "tests" / "data" / clip for name, clip in CLIPS.items()}
    headers = {"Authorization": f"Bearer {cluster.api_key}"}
    client = httpx.Client()
    marks: dict[str, float] = {}
    try:
        ids_jobs = [_submit_job(cluster, client, files[n], f"{tag}-{i}", ledger) for i, n in enumerate(LOSS_JOBS_BEFORE)]
        with HttpLoad(cluster.http, headers, [JFK, LIBRI], tag, threads=2, timeout_s=LOSS_REQUEST_TIMEOUT_S) as load:
            wait_for("a job running", lambda: any(j.status == "running" for j in db.jobs(tag)), 300, every=0.5)
            wait_for("a synchronous answer", lambda: load.ok_since(0) >= 1, 300)
            wait_for("a synchronous request in flight", lambda: load.in_flight() > 0, 60, every=0.1)
            t0 = time.monotonic()
            at_loss = Counter(j.status for j in db.jobs(tag))
            killed = cluster.nodes[victim].lose()
            ledger.fault(f"{victim} lost (every process SIGKILLed)")
            t_loss = time.monotonic()
            marks["killed"] = t_loss - t0
            survivors = reap(set(killed), timeout=30)
            assert not survivors, f"processes of the lost node survived SIGKILL: {survivors}"

            def declared_dead() -> bool:
                from ray.util.state import list_nodes

                return any(n.node_id == victim_id and n.state == "DEAD" for n in list_nodes(address=cluster.dashboard))

            wait_for("the GCS to declare the node dead", declared_dead, 180)
            marks["declared DEAD by the GCS"] = time.monotonic() - t0
            ids_jobs += [_submit_job(cluster, client, files[n], f"{tag}-{len(LOSS_JOBS_BEFORE) + i}", ledger)
                         for i, n in enumerate(LOSS_JOBS_DURING)]
            dead_at = time.monotonic()
            wait_for("synchronous requests answered 200 without the node", lambda: load.ok_since(dead_at) >= 2, 300)
            marks["2 requests answered 200 without it"] = time.monotonic() - t0

            cluster.nodes[victim] = start_node(victim, cluster.tmp, cluster.env, head=False, address=cluster.gcs,
                                               num_cpus=8, num_gpus=1)
            marks["started again (`ray start`)"] = time.monotonic() - t0
            wait_for("4 alive nodes again", lambda: len(alive_nodes(cluster)) == 4 and cluster.nodes[victim].alive(),
                     180, every=2)
            marks["ALIVE again"] = time.monotonic() - t0
            at_return = Counter(j.status for j in db.jobs(tag))
            app = wait_for("the application RUNNING with all its replicas", lambda: _serve_back(cluster), 600, every=3)
            marks["application RUNNING, every replica RUNNING"] = time.monotonic() - t0
            back = time.monotonic()
            wait_for("synchronous requests answered 200 after the recovery", lambda: load.ok_since(back) >= 2, 300)
        answers = load.stop()
        in_flight_at_loss = Counter(a.status for a in load.spanning(t_loss))
        during = Counter(a.status for a in answers if t_loss <= a.started < back)

        def settled() -> bool:
            return all(j.status in ("succeeded", "failed", "cancelled") for j in db.jobs(tag))

        try:
            wait_for("every job finished", settled, 600, every=1)
        except AssertionError:
            pass  # counted as lost below
        marks["every job finished"] = time.monotonic() - t0
        jobs = {j.id: j for j in db.jobs(tag)}
    finally:
        client.close()
    for a in answers:
        ledger.request(a.status)
    lost = [i for i in ids_jobs if i not in jobs or jobs[i].status not in ("succeeded", "failed", "cancelled")]
    succeeded = [i for i in ids_jobs if i in jobs and jobs[i].status == "succeeded"]
    failed = [i for i in ids_jobs if i in jobs and jobs[i].status == "failed"]
    duplicated = [i for i in succeeded if not db.one_transcript(i)]
    per_key = Counter(j.idempotency_key for j in jobs.values())
    extra = sum(n - 1 for n in per_key.values() if n > 1) + max(0, len(jobs) - len(ids_jobs))
    ledger.jobs(sent=len(ids_jobs), succeeded=len(succeeded), failed=len(failed), lost=len(lost),
                duplicated=len(duplicated) + extra)
    records = db.sync_records(tag)
    ok_names = {a.name for a in answers if a.status == 200}
    twice = {n: k for n, k in records.items() if k > 1}
    unrecorded = ok_names - set(records)
    refused_but_recorded = {a.name for a in answers if a.status != 200} & set(records)
    db.engine.dispose()

    resent = _logged(cluster, "replica lost during a call; sending it again")
    ids_after, actors_after = _handles_to_node_ids(cluster)
    role = {nid: name for name, nid in ids_after.items()}
    placed = Counter((a.class_name.split(":")[-1], role.get(a.node_id, "?")) for a in actors_after
                     if a.class_name.split(":")[-1] in ("ASRDeployment", "DiarizationDeployment", "JobRunnerDeployment",
                                                        "Ingress"))
    table = [line for line in ledger.table().splitlines()[2:] if not line.startswith("bad inputs")]
    figure("node loss (a GPU worker SIGKILLed under load, then started again)",
           "\n".join(table)
           + f"\nlost node: {victim} ({victim_id[:8]}), {len(killed)} processes; its actors: {dict(on_victim)}"
           + f"\njobs at the loss: {dict(at_loss)}; when it was back: {dict(at_return)}; attempts per job after: "
           + f"{[jobs[i].attempts if i in jobs else None for i in ids_jobs]}"
           + f"\nsynchronous answers from the loss to the recovery: {dict(during)}; those in flight at the "
           + f"loss: {dict(in_flight_at_loss)}; model calls the ingress and the runner sent again after "
           + f"losing their replica: {resent}"
           + "\nsince the loss:\n" + "\n".join(f"  {t:>7.1f} s  {what}" for what, t in marks.items())
           + "\nreplicas after: " + ", ".join(f"{cls} on {where}: {n}" for (cls, where), n in sorted(placed.items())))

    bad = badly_answered(answers)
    assert not bad, "badly answered synchronous requests:\n" + "\n".join(bad[:20])
    assert not lost, "jobs lost: " + ", ".join(f"{i}={jobs[i].status if i in jobs else 'missing'}" for i in lost)
    assert not duplicated and not extra, f"duplicated: {duplicated}, jobs per key: {per_key}"
    assert not failed, "jobs failed: " + "; ".join(f"{i}: {jobs[i].error}" for i in failed)
    assert not twice and not unrecorded and not refused_but_recorded, (twice, sorted(unrecorded)[:5],
                                                                      sorted(refused_but_recorded)[:5])
    assert app["status"] == "RUNNING", app
