"""Soak: concurrency steps to the saturation point, then a long run just under it, watching the
memory of every process of the service. Not part of CI (it runs for many minutes).

Starts the reliability suite's stack (`tests.reliability.support.running_stack`: a PostgreSQL
database of its own, a private Redis, `python -m serve` with its own local Ray cluster, the CPU
profile of serve_config.yaml, a job runner), then with bench/loadgen.py (mixed traffic: real
short clips to the synchronous endpoint, every fifth request a job polled to completion):

1. concurrency steps (default 1, 4, 16, 64, 128): throughput and p95 per step, the saturation
   point (the step after which throughput stops growing by > 10 % while p95 climbs);
2. a soak at a fixed concurrency just under saturation (80 % of it) for `--minutes`, sampling
   the resident memory (VmRSS and RssAnon from /proc/<pid>/status) of every process of the
   service's cluster at the start, every `--sample-s` and at the end: the Ray actors by name
   (replicas, Serve proxy and controller; pids from the Ray state API in a driver attached to
   the cluster), GCS, raylet, the dashboard and agents, and the `python -m serve` driver.

Ends with one line:

    RESULT saturation_clients=<n> peak_rps=<f> p95_at_saturation_s=<f> max_rss_growth_mb=<f>

    RAY_AUTH_MODE=disabled .venv/bin/python bench/soak.py [--minutes 10] [--step-seconds 15]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

os.environ["RAY_AUTH_MODE"] = "disabled"  # explicit, before anything can start Ray

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.data import require  # noqa: E402
from bench.loadgen import SHORT_CLIPS, Level, drive, percentile, saturation, table  # noqa: E402
from tests.reliability.support import (  # noqa: E402
    Ledger,
    ServiceProcess,
    running_stack,
    user_keys,
)

LOAD_USER = "soak@example.com"
LOAD_KEYS = 32
"""Keys the clients take round-robin: the per-key rate limit (600/min) must not decide."""

_ACTOR_PIDS = """
import json
try:
    from ray.util.state import list_actors
    rows = [(a.name or a.class_name, a.class_name, a.pid)
            for a in list_actors(filters=[("state", "=", "ALIVE")], detail=True, limit=10000)]
except Exception:  # the state API needs the dashboard: fall back to the GCS actor table
    from ray._private import state
    table = state.actors(actor_state_name="ALIVE")
    rows = [(a["Name"] or a["ActorClassName"], a["ActorClassName"], a["Pid"])
            for a in table.values()]
print(json.dumps(rows))
"""

_SYSTEM = (("gcs_server", "gcs_server"), ("raylet/raylet", "raylet"),
           ("dashboard/dashboard.py", "dashboard"), ("dashboard/agent.py", "dashboard agent"),
           ("runtime_env/agent", "runtime env agent"), ("log_monitor.py", "log monitor"),
           ("autoscaler/_private/monitor.py", "autoscaler monitor"),
           ("ray::DashboardAgent", "dashboard agent"),
           ("ray::RuntimeEnvAgent", "runtime env agent"),
           ("ray-dashboard-", None), ("multiprocessing.forkserver", "dashboard forkserver"))


def _status(pid: int) -> dict[str, int] | None:
    """VmRSS and RssAnon of `pid` in kB, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon"):
            out[key] = int(value.split()[0])
    return out


def _session_processes(sid: int) -> dict[int, str]:
    """pid -> command line of every process in session `sid` (the service's, with all of Ray)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[3]) != sid:  # state ppid pgrp session ...
                continue
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        out[int(entry.name)] = cmd.strip()
    return out


def _actor_label(name: str, cls: str) -> str:
    """SERVE_REPLICA::speech#ASRDeployment#ab12 -> "replica ASRDeployment#ab12", ..."""
    if name.startswith("SERVE_REPLICA::"):
        return "replica " + name.split("#", 1)[-1]
    if name.startswith("SERVE_PROXY_ACTOR"):
        return "serve proxy"
    if name.startswith("SERVE_CONTROLLER_ACTOR"):
        return "serve controller"
    return f"actor {name}" if name == cls else f"actor {name} ({cls})"


def processes(service: ServiceProcess) -> dict[str, int]:
    """Process label -> pid: the Ray actors by name (from Ray), the rest by command line."""
    assert service.proc is not None
    driver = service.proc.pid
    labels: dict[str, int] = {"python -m serve (driver)": driver}
    actors = json.loads(service.ray(_ACTOR_PIDS).strip().splitlines()[-1])
    actor_pids = set()
    for name, cls, pid in actors:
        if not pid:
            continue
        labels[_actor_label(name, cls)] = pid
        actor_pids.add(pid)
    for pid, cmd in sorted(_session_processes(driver).items()):
        if pid == driver or pid in actor_pids:
            continue
        label = None
        for needle, name in _SYSTEM:
            if needle in cmd:
                label = name or cmd.split(" ")[0]
                break
        if label is None:
            label = "worker " + cmd.split(" ")[0][:40] if cmd.startswith("ray::") else None
        if label is None:
            continue  # e.g. a short-lived helper
        if label in labels:
            label = f"{label} [{pid}]"
        labels[label] = pid
    return labels


@dataclass
class Memory:
    """RSS samples (MB) of each labelled process over the soak."""

    times: list[float] = field(default_factory=list)
    rss: dict[str, list[float | None]] = field(default_factory=dict)
    anon: dict[str, list[float | None]] = field(default_factory=dict)
    pids: dict[str, set[int]] = field(default_factory=dict)

    def sample(self, service: ServiceProcess, t: float) -> None:
        labels = processes(service)
        n = len(self.times)
        self.times.append(t)
        for label, pid in labels.items():
            st = _status(pid)
            self.rss.setdefault(label, [None] * n).append(st["VmRSS"] / 1024 if st else None)
            self.anon.setdefault(label, [None] * n).append(
                st.get("RssAnon", 0) / 1024 if st else None)
            self.pids.setdefault(label, set()).add(pid)
        for label in self.rss:
            if label not in labels:
                self.rss[label].append(None)
                self.anon[label].append(None)

    def growth(self) -> dict[str, float]:
        """Label -> RSS at the end minus at the start (MB), for processes seen at both."""
        out = {}
        for label, xs in self.rss.items():
            if xs and xs[0] is not None and xs[-1] is not None:
                out[label] = xs[-1] - xs[0]
        return out

    def table(self) -> str:
        head = (f"{'process':<40} {'pid':>7} {'start MB':>9} {'end MB':>9} {'growth':>8} "
                f"{'anon start':>10} {'anon end':>9} {'growth':>7}  per sample (RSS MB)")
        lines = [head, "-" * len(head)]

        def fmt(x: float | None) -> str:
            return "-" if x is None else f"{x:.0f}"

        for label in sorted(self.rss, key=lambda k: -(self.rss[k][-1] or 0)):
            rss, anon = self.rss[label], self.anon[label]
            pids = ",".join(str(p) for p in sorted(self.pids[label]))
            g = "" if rss[0] is None or rss[-1] is None else f"{rss[-1] - rss[0]:+.1f}"
            ga = "" if anon[0] is None or anon[-1] is None else f"{anon[-1] - anon[0]:+.1f}"
            lines.append(f"{label[:40]:<40} {pids:>7} {fmt(rss[0]):>9} {fmt(rss[-1]):>9} {g:>8} "
                         f"{fmt(anon[0]):>10} {fmt(anon[-1]):>9} {ga:>7}  "
                         + " ".join(fmt(x) for x in rss))
        return "\n".join(lines)


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.1f} {five:.1f} {fifteen:.1f}"


def _soak_line(minute: int, lv: Level, load: str) -> str:
    outcome = Counter(lv.jobs.values())
    return (f"{minute:>4} {lv.rps:7.2f} {lv.pct(0.5):7.2f} {lv.pct(0.95):7.2f}  "
            f"sync {dict(sorted(lv.statuses.items()))}  jobs {dict(outcome)}  "
            f"job p50 {percentile(lv.job_latencies, 0.5):.1f} s  load {load}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the soak")
    parser.add_argument("--step-seconds", type=float, default=15.0, help="time per step")
    parser.add_argument("--clients", default="1,4,16,64,128", help="concurrency steps")
    parser.add_argument("--soak-clients", type=int, default=0,
                        help="concurrency of the soak (default: 80 %% of the saturation point)")
    parser.add_argument("--sample-s", type=float, default=60.0, help="RSS sampling interval")
    parser.add_argument("--timeout-s", type=float, default=60.0, help="client timeout")
    args = parser.parse_args()
    require(*SHORT_CLIPS)
    steps = [int(x) for x in args.clients.split(",")]

    from config.settings import get_settings

    work = Path(tempfile.mkdtemp(prefix="soak-"))
    ledger = Ledger()
    t_start = time.monotonic()
    try:
        print(f"starting the stack in {work} (load average {_load()})", flush=True)
        with running_stack(work, get_settings().MODEL_CACHE_DIR, ledger) as stack:
            url = stack.service.base_url
            headers = [u.headers for u in user_keys(stack.db_url, LOAD_USER, LOAD_KEYS, "soak")]
            print(f"service up at {url} after {time.monotonic() - t_start:.0f} s", flush=True)
            drive(url, 2, 5, headers=headers, timeout_s=args.timeout_s)  # warm-up

            # 1. steps
            levels = []
            for n in steps:
                lv = drive(url, n, args.step_seconds, headers=headers, job_every=5, max_jobs=8,
                           timeout_s=args.timeout_s, job_timeout_s=300)
                levels.append(lv)
                print(f"step {n:>4} clients: {lv.rps:.2f} req/s  p95 {lv.pct(0.95):.2f} s  "
                      f"load {_load()}", flush=True)
            sat = saturation(levels)
            print(f"\nconcurrency steps ({args.step_seconds:g} s each, client timeout "
                  f"{args.timeout_s:g} s, 1 in 5 requests a job):")
            print(table(levels, sat))
            peak = max(levels, key=lambda lv: lv.rps)
            print(f"saturation point: {sat.clients} clients ({sat.rps:.2f} req/s, p95 "
                  f"{sat.pct(0.95):.2f} s); peak {peak.rps:.2f} req/s at {peak.clients} clients\n",
                  flush=True)

            # 2. soak
            clients = args.soak_clients or max(1, round(0.8 * sat.clients))
            print(f"soak: {clients} clients for {args.minutes:g} min, RSS every "
                  f"{args.sample_s:g} s", flush=True)
            print(f"{'min':>4} {'req/s':>7} {'p50 s':>7} {'p95 s':>7}", flush=True)
            memory = Memory()
            memory.sample(stack.service, 0.0)
            soak_start = time.monotonic()
            soak_end = soak_start + args.minutes * 60
            chunks: list[Level] = []
            with ThreadPoolExecutor(1) as pool:
                pending = None
                while soak_end - time.monotonic() > 1:
                    seconds = min(args.sample_s, soak_end - time.monotonic())
                    lv = drive(url, clients, seconds, headers=headers, job_every=5,
                               timeout_s=args.timeout_s, job_timeout_s=300)
                    if pending is not None:
                        pending.result()
                    chunks.append(lv)
                    # sampled while the next chunk already runs: the load does not pause
                    pending = pool.submit(memory.sample, stack.service,
                                          time.monotonic() - soak_start)
                    print(_soak_line(len(chunks), lv, _load()), flush=True)
                if pending is not None:
                    pending.result()
            for lv in [*levels, *chunks]:
                for status, n in lv.statuses.items():
                    for _ in range(n):
                        ledger.request(None if status == -1 else status)
            soak_ok = sum(lv.ok for lv in chunks)
            soak_s = sum(lv.seconds for lv in chunks)
            lat = [x for lv in chunks for x in lv.latencies]
            jobs = Counter(s for lv in [*levels, *chunks] for s in lv.jobs.values())
            ledger.jobs(sent=sum(jobs.values()), succeeded=jobs["succeeded"],
                        failed=jobs["failed"] + jobs["cancelled"], lost=jobs["lost"],
                        duplicated=0)
            print(f"\nsoak total: {soak_ok} requests in {soak_s:.0f} s = {soak_ok / soak_s:.2f} "
                  f"req/s, p50 {percentile(lat, 0.5):.2f} s, p95 {percentile(lat, 0.95):.2f} s; "
                  f"jobs {dict(jobs)}")
            print("\nresident memory of the service's processes (MB; anon = RssAnon, the "
                  "process's own heap, not shared pages):")
            print(memory.table())
            print("\n" + ledger.table())
            growth = memory.growth()
            worst = max(growth, key=lambda k: growth[k]) if growth else "-"
            print(f"\nlargest growth: {worst} {growth.get(worst, 0):+.1f} MB; "
                  f"load average now {_load()}; total {time.monotonic() - t_start:.0f} s")
            print(f"RESULT saturation_clients={sat.clients} peak_rps={peak.rps:.2f} "
                  f"p95_at_saturation_s={sat.pct(0.95):.2f} "
                  f"max_rss_growth_mb={max(growth.values(), default=0.0):.1f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
