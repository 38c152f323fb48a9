"""The cluster autoscaler adds a GPU worker for ASR replicas and removes it when they are gone.

A head started as `AutoscalingCluster` starts one, but by its own handle (tests/cluster/support.py):
`RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config <yaml> --block`. `AutoscalingCluster`
itself is not used: its start and shutdown run `ray stop --force`, which stops every Ray on the
machine (and in Ray 2.60 its `fake_multi_node/example.yaml` is not in the wheel).

The autoscaling config (AUTOSCALER_CONFIG) uses Ray's `fake_multinode` provider: the head's
autoscaler (`monitor.py`, a process of the head) starts a worker node in its own process tree
(`ray._private.node.Node`: a raylet and its agents, on this machine) when pending demand needs
one, and kills it when it has been idle for `idle_timeout_minutes`. One worker type, `gpu`:
4 CPUs and a logical GPU, min_workers 0, max_workers 1 (the RayService's gpu group, smaller).
The head has 1 CPU and no GPU (the Ingress's CPU).

The worker's address: the provider gives `Node` no IP, so it takes `get_node_ip_address()` of
the autoscaler's process, which is 127.0.0.1 because every process here has
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0; its GCS address is the provider's `gcs_address` (else the
provider would assume port 6379). The test asserts the worker advertises 127.0.0.1.

The application: serve_config.gpu.yaml changed as CHANGES lists. ASR at min_replicas 0 needs no
GPU node until requests come: load on it (synchronous transcriptions through the head's proxy)
makes Serve start ASR replicas (2 CPUs, 0.5 GPU each), which the head cannot hold, so Ray
reports their demand, the autoscaler launches the GPU worker, the replicas are placed on it.
When the load stops, Serve scales ASR back to 0, the worker is idle, and the autoscaler removes
it. The timeline (from the autoscaler's status in the GCS, the state API and the dashboard's
Serve API, polled every second) is printed as a figure; every step is asserted to have happened,
in order; no step's duration is asserted. Afterwards no process the test started survives.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from tests.cluster.support import (BIN, REPO, HttpLoad, RayNode, badly_answered, base_env, dashboard_up, figure,
                                   private_tmp, reap, remove_tmp, start_node, wait_for)
from tests.serve.support import JFK, create_local_key, free_port

pytestmark = pytest.mark.cluster

GPU_TYPE = "gpu"
IDLE_TIMEOUT_MINUTES = 0.25
"""15 s (production: the RayService's default, 1 minute; Ray's own default 5 minutes)."""
ASR_MAX = 2
"""Two ASR replicas (2 x 0.5 GPU, 2 x 2 CPUs) fill the one GPU worker."""

CHANGES = [
    ("import_path", "serve.app:app -> serve.app:build_app, args diarization: false, jobs: false",
     "the ASR deployment alone behind the Ingress (diarization and the job runner would hold "
     "replicas on the GPU worker or the head)"),
    ("http_options.host / port", "0.0.0.0:8000 -> 127.0.0.1, a free port", "a shared machine"),
    ("proxy_location", "EveryNode -> HeadOnly", "requests go through the head's proxy"),
    ("Ingress autoscaling", "min 2, max 8 -> min 1, max 1", "the head's 1 CPU"),
    ("ASRDeployment autoscaling", "min 1, max 6 -> min 0, max 2", "no GPU worker until there is load; "
                                                                   "two replicas fill the one GPU worker"),
    ("ASRDeployment target_ongoing_requests", "24 -> 1", "three clients make it scale out"),
    ("upscale / downscale delays", "30 / 300 -> 2 / 10 s (to zero 10 s, look-back 10 s)",
     "shortened for the test"),
    ("device", "AI_DEVICE=cpu in the nodes' environment (not in the config)", "no real GPU here"),
]


def autoscaler_config(gcs: str) -> dict:
    """Ray's fake_multi_node/example.yaml, with our node types and timings."""
    return {
        "cluster_name": "fake-gpu",
        "max_workers": 1,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            GPU_TYPE: {"resources": {"CPU": 4, "GPU": 1, "object_store_memory": 300_000_000},
                       "node_config": {}, "min_workers": 0, "max_workers": 1},
        },
        "head_node_type": "ray.head.default",
        "upscaling_speed": 10.0,
        "idle_timeout_minutes": IDLE_TIMEOUT_MINUTES,
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


def serve_config(port: int) -> dict:
    config = yaml.safe_load((REPO / "serve_config.gpu.yaml").read_text())
    config["http_options"].update(host="127.0.0.1", port=port)
    config["proxy_location"] = "HeadOnly"
    app = config["applications"][0]
    app["import_path"] = "serve.app:build_app"
    app["args"] = {"diarization": False, "jobs": False}
    deployments = {d["name"]: d for d in app["deployments"]}
    app["deployments"] = [deployments["Ingress"], deployments["ASRDeployment"]]
    deployments["Ingress"]["autoscaling_config"].update(min_replicas=1, max_replicas=1)
    deployments["ASRDeployment"]["autoscaling_config"].update(
        min_replicas=0, max_replicas=ASR_MAX, target_ongoing_requests=1, upscale_delay_s=2,
        downscale_delay_s=10, downscale_to_zero_delay_s=10, look_back_period_s=10)
    return config


@dataclass
class Timeline:
    """Seconds since the load started at which each step was first seen."""

    t0: float = 0.0
    steps: dict[str, float] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def mark(self, step: str, note: str = "") -> None:
        with self.lock:
            if step not in self.steps:
                self.steps[step] = time.monotonic() - self.t0
                self.notes[step] = note

    def seen(self, step: str) -> bool:
        with self.lock:
            return step in self.steps

    def text(self) -> str:
        with self.lock:
            return "\n".join(f"{t:>7.1f} s  {step}{'  (' + self.notes[step] + ')' if self.notes[step] else ''}"
                             for step, t in sorted(self.steps.items(), key=lambda kv: kv[1]))


STEPS = ["load started", "demand seen (GPU bundle pending)", "autoscaler launches a gpu worker",
         "node up (GPU worker ALIVE)", "first ASR replica RUNNING on it", f"{ASR_MAX} ASR replicas RUNNING on it",
         "load stopped", "ASR scaled down to 0 replicas", "node removed (DEAD)"]
"""The steps, in the order they must happen."""


class Watch:
    """Polls the cluster every second from a thread of the test: the autoscaler's status (the
    GCS key `ray status` reads), the nodes (state API) and the ASR replicas (the dashboard's
    Serve API); marks the timeline; remembers the processes of the GPU worker (the autoscaler
    process's descendants), so that their end can be checked."""

    def __init__(self, head: RayNode, gcs: str, dashboard: str, timeline: Timeline) -> None:
        from ray._raylet import GcsClient

        self.head, self.dashboard, self.timeline = head, dashboard, timeline
        self.gcs = GcsClient(address=gcs)
        self.gpu_nodes: dict[str, str] = {}
        """node id -> node IP of every GPU worker seen."""
        self.worker_pids: set[int] = set()
        self.max_running = 0
        self.status_at_peak = ""
        self.errors: list[str] = []
        self.load_stopped = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception as exc:  # noqa: BLE001 - shown in the failure message if a step is missing
                self.errors.append(f"{time.monotonic() - self.timeline.t0:.1f} s: {type(exc).__name__}: {exc}")
            self._stop.wait(1.0)

    def autoscaler_status(self) -> dict:
        raw = self.gcs.internal_kv_get(b"__autoscaling_status")
        return json.loads(raw) if raw else {}

    def tick(self) -> None:
        from ray.util.state import list_nodes

        mark = self.timeline.mark
        status = self.autoscaler_status()
        demand = (status.get("load_metrics_report") or {}).get("resource_demand") or []
        gpu_demand = [bundle for bundle, _ in demand if bundle.get("GPU")]
        if gpu_demand:
            mark(STEPS[1], f"{gpu_demand[0]}")
        report = status.get("autoscaler_report") or {}
        if (report.get("pending_launches") or {}).get(GPU_TYPE) or any(
                p[2] == GPU_TYPE for p in report.get("pending_nodes") or []):
            mark(STEPS[2])
        for n in list_nodes(address=self.dashboard, detail=True):
            if n.resources_total.get("GPU"):
                self.gpu_nodes[n.node_id] = n.node_ip
                if n.state == "ALIVE":
                    mark(STEPS[3], f"node {n.node_id[:8]}, {n.node_ip}")
                elif n.state == "DEAD" and self.timeline.seen(STEPS[7]):
                    mark(STEPS[8], f"node {n.node_id[:8]}: {n.state_message or ''}".strip())
        self._remember_worker_processes()
        replicas = self.asr_replicas()
        running = sum(1 for r in replicas if r["state"] == "RUNNING" and r["node_id"] in self.gpu_nodes)
        if running > self.max_running:
            self.max_running = running
            if running == ASR_MAX:
                self.status_at_peak = self.ray_status()
        if running >= 1:
            mark(STEPS[4])
        if running >= ASR_MAX:
            mark(STEPS[5])
        if self.load_stopped and not replicas and self.timeline.seen(STEPS[4]):
            mark(STEPS[7])

    def asr_replicas(self) -> list[dict]:
        r = httpx.get(self.dashboard + "/api/serve/applications/", timeout=10)
        r.raise_for_status()
        app = (r.json().get("applications") or {}).get("speech") or {}
        return (app.get("deployments") or {}).get("ASRDeployment", {}).get("replicas") or []

    def _remember_worker_processes(self) -> None:
        self.head.record()
        for pid in list(self.head.pids):
            try:
                p = psutil.Process(pid)
                if any("monitor.py" in part for part in p.cmdline()):
                    self.worker_pids.update(c.pid for c in p.children(recursive=True))
            except psutil.NoSuchProcess:
                pass

    def ray_status(self) -> str:
        """What `ray status` prints (autoscaler v1's report, formatted as it formats it)."""
        import datetime

        from ray.autoscaler._private.autoscaler import AutoscalerSummary
        from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
        from ray.autoscaler._private.util import LoadMetricsSummary, format_info_string

        status = self.autoscaler_status()
        if not status.get("load_metrics_report") or not status.get("autoscaler_report"):
            return ""
        report = dict(status["autoscaler_report"])
        availability = NodeAvailabilitySummary.from_fields(**report.pop("node_availability_summary", {}))
        return format_info_string(LoadMetricsSummary(**status["load_metrics_report"]),
                                  AutoscalerSummary(node_availability_summary=availability, **report),
                                  time=datetime.datetime.fromtimestamp(status["time"]))


@dataclass
class FakeCluster:
    tmp: Path
    env: dict[str, str]
    gcs: str
    dashboard: str
    http: str
    api_key: str
    head: RayNode


@pytest.fixture
def fake_cluster() -> Iterator[FakeCluster]:
    tmp = private_tmp("ras")
    storage = tmp / "storage"
    settings = {"STORAGE_BASE_PATH": str(storage), "RATE_LIMIT_PER_MINUTE": "0", "RATE_LIMIT_KEY_PER_MINUTE": "0",
                "ENVIRONMENT": "test"}
    # RAY_FAKE_CLUSTER: the fake provider refuses to run without it (it is what the head's
    # autoscaler process inherits); AUTOSCALER_UPDATE_INTERVAL_S: one autoscaler round a second
    # (5 s by default), as AutoscalingCluster sets it.
    env = base_env(tmp, RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1", **settings)
    api_key = create_local_key(settings)
    gcs_port, dash_port, http_port = free_port(), free_port(), free_port()
    gcs, dashboard = f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dash_port}"
    config = tmp / "autoscaler.yaml"
    config.write_text(yaml.safe_dump(autoscaler_config(gcs), sort_keys=False))
    head = None
    try:
        head = start_node("head", tmp, env, head=True, gcs_port=gcs_port, num_cpus=1, dashboard_port=dash_port,
                          extra=[f"--autoscaling-config={config}"])
        wait_for("the head's dashboard", lambda: dashboard_up(dashboard), 180)
        head.record()
        yield FakeCluster(tmp, env, gcs, dashboard, f"http://127.0.0.1:{http_port}", api_key, head)
    finally:
        leaked: list[str] = []
        if head is not None:
            if head.alive():
                subprocess.run([str(BIN / "serve"), "shutdown", "-y", "-a", dashboard], cwd=REPO, env=env,
                               capture_output=True, timeout=120)
            leaked = head.stop()
        remove_tmp(tmp)
        assert not leaked, f"processes survived the head: {leaked}"


def test_gpu_worker_added_for_asr_load_and_removed_when_idle(fake_cluster: FakeCluster) -> None:
    c = fake_cluster
    t_start = time.monotonic()
    config = c.tmp / "serve_config.yaml"
    config.write_text(yaml.safe_dump(serve_config(int(c.http.rsplit(":", 1)[1])), sort_keys=False))
    done = subprocess.run([str(BIN / "serve"), "deploy", str(config), "-a", c.dashboard], cwd=REPO, env=c.env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr

    def running() -> bool:
        r = httpx.get(c.dashboard + "/api/serve/applications/", timeout=10)
        app = (r.json().get("applications") or {}).get("speech") or {}
        assert app.get("status") != "DEPLOY_FAILED", app
        return app.get("status") == "RUNNING"

    wait_for("the application RUNNING (ASR at 0 replicas)", running, 300, every=2)
    t_deployed = time.monotonic() - t_start
    timeline = Timeline(t0=time.monotonic())
    watch = Watch(c.head, c.gcs, c.dashboard, timeline)
    watch.tick()  # before any load: no GPU worker, no GPU demand, no ASR replica
    assert not watch.gpu_nodes and not timeline.steps, (watch.gpu_nodes, timeline.steps)
    assert not watch.asr_replicas()

    headers = {"Authorization": f"Bearer {c.api_key}"}
    timeline = watch.timeline = Timeline(t0=time.monotonic())
    with watch:
        timeline.mark(STEPS[0], "3 clients, synchronous transcriptions of jfk.flac")
        with HttpLoad(c.http, headers, [JFK], "scale", threads=3) as load:
            wait_for(f"{ASR_MAX} ASR replicas RUNNING on a GPU worker", lambda: timeline.seen(STEPS[5]), 420, every=2)
            placed = time.monotonic()
            wait_for("requests answered by the scaled-out replicas", lambda: load.ok_since(placed) >= 3, 180, every=1)
        answers = load.stop()
        watch.load_stopped = True
        timeline.mark(STEPS[6], f"{len(answers)} requests sent")
        wait_for("ASR scaled down to 0 replicas", lambda: timeline.seen(STEPS[7]), 300, every=2)
        wait_for("the GPU worker removed", lambda: timeline.seen(STEPS[8]), 300, every=2)
        wait_for("the autoscaler to report no gpu worker", lambda: not (
            watch.autoscaler_status().get("autoscaler_report") or {}).get("active_nodes", {}).get(GPU_TYPE), 60)
    # Every process of the removed worker is gone (reap would kill and name a survivor).
    survivors = reap(watch.worker_pids, timeout=60)

    statuses: dict[object, int] = {}
    for a in answers:
        statuses[a.status] = statuses.get(a.status, 0) + 1
    figure("autoscaler timeline (fake multi-node provider, gpu worker min 0 / max 1)",
           f"application RUNNING {t_deployed:.1f} s after `serve deploy`; then, from the start of the load:\n"
           + timeline.text()
           + f"\nrequests: {dict(sorted(statuses.items(), key=str))}; most ASR replicas on the worker: {watch.max_running}"
           + f"\nGPU worker(s): {watch.gpu_nodes}; its processes seen: {len(watch.worker_pids)}, left after removal: "
           + f"{len(survivors)}\nidle_timeout_minutes {IDLE_TIMEOUT_MINUTES}; changes to serve_config.gpu.yaml:\n"
           + "\n".join(f"  {w}: {ch} ({why})" for w, ch, why in CHANGES)
           + ("\nray status with the worker full:\n" + "\n".join("  " + line for line in watch.status_at_peak.splitlines()
                                                                 if line.strip()) if watch.status_at_peak else ""))

    missing = [s for s in STEPS if not timeline.seen(s)]
    assert not missing, f"steps not seen: {missing}; poll errors: {watch.errors[-5:]}"
    order = [timeline.steps[s] for s in STEPS]
    assert order == sorted(order), f"steps out of order:\n{timeline.text()}"
    assert len(watch.gpu_nodes) == 1, f"one GPU worker expected: {watch.gpu_nodes}"
    assert set(watch.gpu_nodes.values()) == {"127.0.0.1"}, f"the GPU worker must advertise 127.0.0.1: {watch.gpu_nodes}"
    assert watch.worker_pids, "the GPU worker's processes were never seen"
    assert not survivors, f"processes of the removed GPU worker survived it: {survivors}"
    bad = badly_answered(answers)
    assert not bad, "badly answered requests:\n" + "\n".join(bad[:20])
    assert statuses.get(200, 0) >= 3, statuses
