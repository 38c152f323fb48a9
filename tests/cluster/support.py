"""Ray nodes started with `ray start --block` on this machine, each stopped through its own handle.

Every node advertises 127.0.0.1, has its own ports (free ones, picked here) and shares the
cluster's private temp dir (RAY_TMPDIR), so no other `ray.init()` on the machine finds it.

127.0.0.1 needs two things on Linux: Ray 2.60 rewrites a loopback `--node-ip-address`/`--address`
to the machine's outward IP (`services.resolve_ip_for_localhost`) unless
`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` (which every process of these clusters gets: drivers, job
entrypoints, workers); and with that set, `ray start` refuses to start a *worker* node ("multi-node
clusters are not supported on Windows and OSX"). So a worker's `ray start` runs through
`WORKER_START` below: the same CLI with that one check passed and the loopback address kept as
given. What Ray binds itself (the GCS and raylet gRPC ports listen on every interface; there is
no setting for it in 2.60) is Ray's; every address we choose (node IPs, dashboard, Serve's HTTP
proxy) is 127.0.0.1.
`RAY_AUTH_MODE=disabled` is set explicitly in every environment (Ray 2.60 turns token auth on by
default). A node is stopped with SIGTERM to its `ray start --block` process (which stops the
node's processes), then every process of the node recorded while it ran is checked gone; one that
survived is killed by its PID and reported, so a leak fails the test that caused it. A node
*lost* (`RayNode.lose`, the node-loss test) has every process SIGKILLed at once instead, as a
machine that vanishes. `HttpLoad` is the synchronous-transcription load those tests put on the
service while they do it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from tests.serve.support import free_port

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

FIGURES: list[tuple[str, str]] = []
"""(title, text) of the figures the cluster tests print at the end of the run (conftest.py)."""


def figure(title: str, text: str) -> None:
    FIGURES.append((title, text))
    print(f"\n{title}\n{text}")


def base_env(tmp: Path, **extra: str) -> dict[str, str]:
    """The environment of every process of a test cluster."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(RAY_AUTH_MODE="disabled", RAY_TMPDIR=str(tmp), PYTHONPATH=str(REPO), AI_DEVICE="cpu",
               RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    env.update(extra)
    return env


def wait_for(what: str, check: Callable[[], object], timeout: float, every: float = 1.0) -> object:
    """Poll `check` until it returns something truthy; fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            last = check()
            if last:
                return last
        except Exception as exc:  # noqa: BLE001 - shown if it never succeeds
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s (last: {last!r})")
        time.sleep(every)


@dataclass
class RayNode:
    """One `ray start --block` process and the Ray processes under it."""

    name: str
    proc: subprocess.Popen
    log: Path
    pids: set[int] = field(default_factory=set)

    def record(self) -> None:
        """Remember the node's processes (the raylet, GCS, workers ...) to check they die with it."""
        try:
            self.pids.update(p.pid for p in psutil.Process(self.proc.pid).children(recursive=True))
        except psutil.NoSuchProcess:
            pass

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> list[str]:
        """Stop the node by its handle; returns the processes that had to be killed afterwards."""
        self.record()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return reap(self.pids, timeout=30)

    def lose(self) -> list[int]:
        """The node lost as a machine is lost (power cut, kernel panic, a VM preempted without
        notice): every process of it stopped (SIGSTOP), then all SIGKILLed, so none of them sees
        another die and tells the GCS anything. Returns the PIDs killed; `reap` confirms them gone."""
        stopped: dict[int, psutil.Process] = {}
        for _ in range(3):  # again: a process forked while the others were being stopped
            self.record()
            for pid in [self.proc.pid, *self.pids]:
                if pid not in stopped:
                    try:
                        p = psutil.Process(pid)
                        p.suspend()
                        stopped[pid] = p
                    except psutil.NoSuchProcess:
                        pass
        for p in stopped.values():
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait()
        return sorted(stopped)


def reap(pids: set[int], timeout: float = 30) -> list[str]:
    """Wait for the given processes to end; kill (by PID) and name those still alive after `timeout`."""
    deadline = time.monotonic() + timeout
    survivors: list[psutil.Process] = []
    while True:
        survivors = []
        for pid in pids:
            try:
                p = psutil.Process(pid)
                if p.status() != psutil.STATUS_ZOMBIE:
                    survivors.append(p)
            except psutil.NoSuchProcess:
                pass
        if not survivors or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    named = []
    for p in survivors:
        try:
            named.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
            p.kill()
        except psutil.NoSuchProcess:
            pass
    return named


def start_node(name: str, tmp: Path, env: dict[str, str], *, head: bool, gcs_port: int | None = None,
               address: str | None = None, num_cpus: float = 0, num_gpus: float = 0,
               resources: str | None = None, dashboard_port: int | None = None,
               extra: list[str] | None = None) -> RayNode:
    """`ray start --block` as a head (`gcs_port`, optional dashboard) or a worker (`address`)."""
    log = tmp / f"{name}.log"
    ray = [str(BIN / "ray")] if head else [sys.executable, "-c", WORKER_START]
    cmd = [*ray, "start", "--block", "--node-ip-address=127.0.0.1",
           f"--num-cpus={num_cpus:g}", f"--num-gpus={num_gpus:g}",
           f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
           f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
           f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
           "--object-store-memory=300000000"]
    if head:
        cmd += ["--head", f"--port={gcs_port}", f"--ray-client-server-port={free_port()}"]
        if dashboard_port:
            cmd += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}"]
        else:
            cmd += ["--include-dashboard=false"]
    else:
        cmd += [f"--address={address}"]
    if resources:
        cmd += [f"--resources={resources}"]
    cmd += extra or []
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    return RayNode(name, proc, log)


WORKER_START = (
    "import sys\n"
    "import ray._private.ray_constants as constants\n"
    "import ray._private.services as services\n"
    "constants.ENABLE_RAY_CLUSTER = True  # only this process: a worker node may join\n"
    "services.resolve_ip_for_localhost = lambda host: host  # keep 127.0.0.1 as given\n"
    "from ray.scripts.scripts import main\n"
    "sys.argv[0] = 'ray'\n"
    "sys.exit(main())\n"
)


def dashboard_up(url: str) -> bool:
    return httpx.get(url + "/api/version", timeout=5).status_code == 200


def private_tmp(prefix: str) -> Path:
    """A short private temp dir (Ray's unix socket paths must stay under 107 characters)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def remove_tmp(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class Answer:
    """One synchronous request and how it ended (status None: no answer within its timeout)."""

    name: str
    started: float
    ended: float
    status: int | None
    retry_after: str | None = None
    error: str | None = None
    body: Any = None

    def __str__(self) -> str:
        return (f"{self.name}: {self.status} retry_after={self.retry_after} "
                f"after {self.ended - self.started:.1f} s {self.error or ''}{'' if self.status == 200 else self.body}")


class HttpLoad:
    """Threads sending synchronous transcriptions (POST /v1/audio/transcriptions) back to back
    until stopped; after a 503 a thread waits its Retry-After (at most 2 s), as a polite client.
    Every request has a client timeout (`timeout_s`); one not answered within it is an Answer
    with status None."""

    def __init__(self, url: str, headers: dict[str, str], files: list[Path], tag: str,
                 threads: int = 2, timeout_s: float = 300.0) -> None:
        self.url, self.headers, self.files, self.tag, self.timeout_s = url, headers, files, tag, timeout_s
        self.answers: list[Answer] = []
        self._in_flight: dict[int, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._count = 0
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def __enter__(self) -> HttpLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self, index: int) -> None:
        with httpx.Client() as client:
            while not self._stop.is_set():
                with self._lock:
                    n = self._count
                    self._count += 1
                    self._in_flight[index] = time.monotonic()
                audio = self.files[n % len(self.files)]
                name = f"{self.tag}-{n:04d}{audio.suffix}"
                started = time.monotonic()
                try:
                    r = client.post(self.url + "/v1/audio/transcriptions", headers=self.headers,
                                    data={"model": "whisper-1", "response_format": "json"},
                                    files={"file": (name, audio.read_bytes())}, timeout=self.timeout_s)
                    try:
                        body = r.json()
                    except ValueError:
                        body = r.text[:300]
                    out = Answer(name, started, time.monotonic(), r.status_code, r.headers.get("retry-after"),
                                 body=body)
                except httpx.HTTPError as exc:
                    out = Answer(name, started, time.monotonic(), None, error=f"{type(exc).__name__}: {exc}")
                with self._lock:
                    self._in_flight.pop(index, None)
                    self.answers.append(out)
                if out.status == 503:
                    self._stop.wait(min(float(out.retry_after or 1), 2.0))

    def in_flight(self) -> int:
        with self._lock:
            return len(self._in_flight)

    def ok_since(self, t: float) -> int:
        """Requests sent at or after monotonic time `t` and answered 200."""
        with self._lock:
            return sum(1 for a in self.answers if a.status == 200 and a.started >= t)

    def spanning(self, t: float) -> list[Answer]:
        """Requests that were in flight at monotonic time `t`."""
        with self._lock:
            return [a for a in self.answers if a.started < t < a.ended]

    def stop(self) -> list[Answer]:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout_s + 30)
        return self.answers


def badly_answered(answers: list[Answer]) -> list[str]:
    """Answers other than 200 and 503-with-Retry-After: no answer, another 5xx, a 4xx, a 503
    without Retry-After."""
    return [str(a) for a in answers
            if not (a.status == 200 or (a.status == 503 and a.retry_after))]
