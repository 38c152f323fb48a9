"""The pieces of the reliability stack, each started and stopped by its own handle.

- `FaultProxy`: a TCP proxy in front of PostgreSQL. `cut()` drops every connection and refuses
  new ones, `restore()` accepts again: to the service that is exactly a database restart (or a
  network partition), without restarting the machine's PostgreSQL under the other test suites.
- `RedisServer`: a private `redis-server` on a free port that a test may stop and start again.
- `ServiceProcess`: `python -m serve` (the README's start command, its own local Ray cluster) in
  its own session, so that stopping it takes Ray's processes with it even when it hangs.
- `Ledger`: what the suite sent and how it ended, printed as the table at the end of the run.
- `running_stack()`: all of it together (database, proxy, Redis, service, users), as the suite's
  `stack` fixture and bench/soak.py run it.
"""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

from tests.conftest import SPEECH_DATA_DIR
from tests.db.support import PG_ADMIN, Caller, pg_admin

ROOT = Path(__file__).resolve().parents[2]
DATA = SPEECH_DATA_DIR
JFK = DATA / "jfk" / "jfk.flac"
SHORT_CLIP = DATA / "pocketsphinx" / "librivox" / "sense_and_sensibility_01_austen_64kb-0870.wav"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str,
             interval_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


# --------------------------------------------------------------------------- fault proxy
class FaultProxy:
    """Forwards 127.0.0.1:`port` to `target`; `cut()` / `restore()` take the target away."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._stopped = threading.Event()
        self.cuts = 0

    def start(self) -> FaultProxy:
        self._listen()
        return self

    def _listen(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by cut() or stop()
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                readable, _, _ = select.select([a, b], [], [], 1.0)
                if self._stopped.is_set():
                    return
                for src in readable:
                    data = src.recv(65536)
                    if not data:
                        return
                    (b if src is a else a).sendall(data)
        except OSError:
            return
        finally:
            self._close(a, b)

    def _close(self, *socks: socket.socket) -> None:
        with self._lock:
            for s in socks:
                self._conns.discard(s)
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def cut(self) -> None:
        """Refuse new connections and reset every open one, as a stopped server would."""
        self.cuts += 1
        if self._listener is not None:
            try:  # wakes the thread blocked in accept(); close() alone lets it take one more
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
            self._listener = None
        with self._lock:
            conns = list(self._conns)
        self._close(*conns)

    def restore(self) -> None:
        if self._listener is None:
            self._listen()

    def stop(self) -> None:
        self._stopped.set()
        self.cut()


# --------------------------------------------------------------------------- redis
class RedisServer:
    """A private redis-server (nothing on disk) that tests may stop and start again."""

    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.log = log_dir / "redis.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--logfile", str(self.log)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self.answers, 20, "redis-server to answer")
        return self

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


# --------------------------------------------------------------------------- the service
@dataclass
class ServiceProcess:
    """`python -m serve` with `env` on a free port, its output in `log`."""

    config: Path
    env: dict[str, str]
    log: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    ray_address: str = ""
    log_offset: int = 0
    """Where this start's output begins in `log` (start() may be called again after stop())."""

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def start(self, timeout_s: float = 300) -> ServiceProcess:
        env = {**os.environ, **self.env, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
        self.log_offset = self.log.stat().st_size if self.log.exists() else 0
        self.ray_address = ""
        with self.log.open("ab") as out:  # the child keeps its own copy
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "serve", "--config", str(self.config), "--port",
                 str(self.port), "--num-cpus", "2", "--ray-auth-mode", "disabled"],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: self._banner() or self._died(), timeout_s, "the service to start")
        if self.proc.poll() is not None:
            raise AssertionError(f"the service exited with {self.proc.returncode}:\n"
                                 + self.log.read_text()[-4000:])
        wait_for(self.ready, timeout_s, "the service to be ready")
        return self

    def _died(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def _banner(self) -> bool:
        with self.log.open("rb") as f:  # this start's output only, not an earlier run's
            f.seek(self.log_offset)
            text = f.read().decode(errors="replace")
        found = re.findall(r"ray cluster: (\S+)", text)
        if found:
            self.ray_address = found[-1]
        return "speech service listening" in text.split("ray cluster:")[-1]

    def ready(self) -> bool:
        try:
            return httpx.get(self.url("/ready"), timeout=10).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        """SIGTERM (the service shuts Serve and Ray down), then the whole session if it hangs."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def ray(self, code: str, timeout_s: float = 120) -> str:
        """Run `code` in a driver attached to the service's Ray cluster (`ray`, `serve` imported);
        returns its standard output."""
        script = ("import os, ray\nfrom ray import serve\n"
                  f"ray.init(address={self.ray_address!r}, namespace='serve', log_to_driver=False)\n"
                  + code)
        env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
        done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, text=True,
                              capture_output=True, timeout=timeout_s)
        if done.returncode != 0:
            raise AssertionError(f"ray driver failed ({done.returncode}):\n{done.stderr[-4000:]}")
        return done.stdout

    def replica_actors(self, deployment: str) -> list[str]:
        """Names of the live replica actors of `deployment`."""
        out = self.ray(
            "for a in ray.util.list_named_actors(all_namespaces=True):\n"
            f"    if a['name'].startswith('SERVE_REPLICA::') and '#{deployment}#' in a['name']:\n"
            "        print(a['name'])\n")
        return [line for line in out.splitlines() if line.strip()]

    def kill_replica(self, deployment: str) -> str:
        """Kill one replica of `deployment` (no restart by Ray: Serve's controller replaces it)."""
        names = self.replica_actors(deployment)
        assert names, f"no live replica of {deployment}"
        self.ray(f"ray.kill(ray.get_actor({names[0]!r}, namespace='serve'), no_restart=True)\n")
        return names[0]


# --------------------------------------------------------------------------- ledger
@dataclass
class Ledger:
    """Everything the suite sent and how it ended, for the table printed at the end."""

    counts: Counter = field(default_factory=Counter)
    bad_inputs: list[tuple[str, int, int]] = field(default_factory=list)
    """(case, expected status, got status)."""
    problems: list[str] = field(default_factory=list)

    def fault(self, name: str) -> None:
        self.counts["faults injected"] += 1
        self.counts[f"fault: {name}"] += 1

    def request(self, status: int | None) -> None:
        """One synchronous request; None: no answer (hung past its timeout or connection lost)."""
        self.counts["requests sent"] += 1
        if status is not None and 200 <= status < 300:  # 202: a job accepted
            self.counts["requests succeeded"] += 1
        elif status is None:
            self.counts["requests without an answer"] += 1
        elif status >= 500 and status != 503:
            self.counts["5xx other than 503"] += 1
        else:
            self.counts["requests failed with a reason"] += 1

    def request_lost_with_ingress(self) -> None:
        """One synchronous request that was inside the Ingress replica when that replica was
        killed: Ray Serve's HTTP proxy answers it a plain-text 500 itself (no product code is left
        to answer it). Counted as sent, in a row of its own, apart from the product's 5xx."""
        self.counts["requests sent"] += 1
        self.counts["requests lost with killed ingress"] += 1

    def jobs(self, *, sent: int, succeeded: int, failed: int, lost: int, duplicated: int) -> None:
        self.counts["jobs sent"] += sent
        self.counts["jobs succeeded"] += succeeded
        self.counts["jobs failed with a reason"] += failed
        self.counts["jobs lost"] += lost
        self.counts["jobs duplicated"] += duplicated

    def bad_input(self, case: str, expected: int, got: int) -> None:
        self.bad_inputs.append((case, expected, got))

    def table(self) -> str:
        rows = ["faults injected", "requests sent", "requests succeeded",
                "requests failed with a reason", "requests without an answer",
                "5xx other than 503", "jobs sent", "jobs succeeded", "jobs failed with a reason",
                "jobs lost", "jobs duplicated"]
        rejected = sum(1 for _, want, got in self.bad_inputs if want == got)
        lines = ["reliability suite", "-" * 44]
        if self.counts["requests lost with killed ingress"]:
            rows.insert(rows.index("5xx other than 503") + 1, "requests lost with killed ingress")
        lines += [f"{name:<34}{self.counts[name]:>10}" for name in rows]
        lines += [f"{'bad inputs tried':<34}{len(self.bad_inputs):>10}",
                  f"{'bad inputs rejected correctly':<34}{rejected:>10}"]
        faults = sorted(k for k in self.counts if k.startswith("fault: "))
        lines += [f"  {k[7:]:<32}{self.counts[k]:>10}" for k in faults]
        wrong = [f"  {case}: expected {want}, got {got}" for case, want, got in self.bad_inputs
                 if want != got]
        if wrong:
            lines += ["bad inputs answered wrongly:", *wrong]
        return "\n".join(lines)


# --------------------------------------------------------------------------- the whole stack
MAX_UPLOAD_BYTES = 4 * 1024 * 1024
MAX_DURATION_S = 2 * 3600.0
KEY_LIMIT_PER_MINUTE = 600
STORAGE_QUOTA_BYTES = 1024 ** 3
"""Far above what the suite stores; test_storage_quota pushes storage past it with a sparse file."""
UPLOAD_STALL_TIMEOUT_S = 10.0
TRUSTED_PROXY = "127.0.0.2"
"""The stack's TRUSTED_PROXIES: a test connecting from this loopback address is a reverse proxy
(every other test connects from 127.0.0.1, which the service does not trust)."""
IP_LIMIT_PER_MINUTE = 1_000_000
"""On, so each client address has its counter in Redis (which the proxy tests read), and far
above what the suite sends from one address."""


@dataclass
class Stack:
    service: ServiceProcess
    db_proxy: FaultProxy
    redis: RedisServer
    db_url: str
    """Direct to PostgreSQL (not through the proxy): the tests' own view of the database."""
    storage: Path
    admin: Caller
    alice: Caller
    bob: Caller
    ledger: Ledger

    def url(self, path: str) -> str:
        return self.service.url(path)

    def stored_files(self) -> list[Path]:
        """Audio and temporary uploads in storage (everything but the log files)."""
        return [p for p in self.storage.rglob("*") if p.is_file() and p.suffix != ".log"]


def make_users(db_url: str) -> tuple[Caller, Caller, Caller]:
    """admin@example.com (admin), alice@ and bob@example.com, one key each."""
    from db import repository as repo
    from db.session import session_scope
    from serve.auth import create_key_for

    users = []
    with session_scope(db_url) as session:
        for email, admin in (("admin@example.com", True), ("alice@example.com", False),
                             ("bob@example.com", False)):
            user = repo.create_user(session=session, email=email, is_admin=admin)
            session.flush()
            key_id, key = create_key_for(session=session, user=user, name="reliability")
            users.append(Caller(email, key_id, key))
    return users[0], users[1], users[2]


def user_keys(db_url: str, email: str, n: int, name: str = "reliability") -> list[Caller]:
    """`n` new keys of the ordinary user `email` (created when missing), one `Caller` per key: to
    spread many clients over several keys so that the per-key rate limit does not decide."""
    from db import repository as repo
    from db.session import session_scope
    from serve.auth import create_key_for

    out = []
    with session_scope(db_url) as session:
        user = repo.get_user_by_email(session=session, email=email)
        if user is None:
            user = repo.create_user(session=session, email=email)
            session.flush()
        for _ in range(n):
            key_id, key = create_key_for(session=session, user=user, name=name)
            out.append(Caller(email, key_id, key))
    return out


def service_config(path: Path, env: dict[str, str]) -> Path:
    """serve_config.yaml with `env` added to the application's runtime env, written to `path`."""
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    app = config["applications"][0]
    app.setdefault("runtime_env", {}).setdefault("env_vars", {}).update(env)
    path.write_text(yaml.safe_dump(config))
    return path


@contextmanager
def running_stack(work: Path, model_cache_dir: Path, ledger: Ledger) -> Iterator[Stack]:
    """The reliability stack in `work` (an empty folder), stopped by its handles on exit.

    In order: a fresh PostgreSQL database of its own (migrated, with an admin, two ordinary
    users and their keys), a `FaultProxy` in front of it, a private `redis-server`, and
    `python -m serve` with its own local Ray cluster, the CPU profile of `serve_config.yaml` and
    a job runner. The database is dropped at the end.
    """
    from db.migrate import upgrade_head
    from db.session import dispose_all

    storage = work / "storage"
    storage.mkdir()
    db_name = f"reliability_{uuid.uuid4().hex[:10]}"
    pg_admin(f'CREATE DATABASE "{db_name}"')
    proxy = FaultProxy((PG_ADMIN["host"], PG_ADMIN["port"])).start()
    redis = RedisServer(work)
    service: ServiceProcess | None = None
    try:
        db_url = f"postgresql+psycopg2://postgres@127.0.0.1:5432/{db_name}"
        upgrade_head(db_url)
        admin, alice, bob = make_users(db_url)
        redis.start()
        env = {
            "ENVIRONMENT": "test",
            "DB_URL": f"postgresql+psycopg2://postgres@127.0.0.1:{proxy.port}/{db_name}",
            "REDIS_URL": redis.url,
            "STORAGE_BASE_PATH": str(storage),
            "MODEL_CACHE_DIR": str(model_cache_dir),
            "AUDIO_MAX_FILE_SIZE": str(MAX_UPLOAD_BYTES),
            "AUDIO_MAX_DURATION_S": str(MAX_DURATION_S),
            "RATE_LIMIT_PER_MINUTE": str(IP_LIMIT_PER_MINUTE),
            "TRUSTED_PROXIES": f"{TRUSTED_PROXY}/32",
            "RATE_LIMIT_KEY_PER_MINUTE": str(KEY_LIMIT_PER_MINUTE),
            "JOB_RUNNER_CONCURRENCY": "2",
            "JOB_LEASE_S": "10",
            "JOB_HEARTBEAT_S": "2",
            "JOB_POLL_S": "0.5",
            "WEBHOOK_ALLOW_INTERNAL": "false",
            "STORAGE_QUOTA_BYTES": str(STORAGE_QUOTA_BYTES),
            "UPLOAD_STALL_TIMEOUT_S": str(UPLOAD_STALL_TIMEOUT_S),
            "LOG_FILE": str(storage / "service.log"),
        }
        service = ServiceProcess(config=service_config(work / "serve_config.yaml", env),
                                 env=env, log=work / "service.out.log")
        service.start()
        yield Stack(service=service, db_proxy=proxy, redis=redis, db_url=db_url,
                    storage=storage, admin=admin, alice=alice, bob=bob, ledger=ledger)
    finally:
        try:
            if service is not None:
                service.stop()
        finally:
            redis.stop()
            proxy.stop()
            dispose_all()
            pg_admin(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
