"""Client-side load on the HTTP service, shared by bench/serve_load.py, bench/soak.py and
tests/reliability/test_load.py.

`drive()` runs N concurrent clients (coroutines on one `httpx.AsyncClient`) for a fixed time.
Each client sends real short clips back to back to `POST /v1/audio/transcriptions`; with
`job_every=k` every k-th of its requests is instead a job (`POST /v1/jobs`) that the client then
polls (`GET /v1/jobs/{id}`) until it is final, as a client waiting for its result would. A
client told to back off (503 or 429) waits the Retry-After it was given (at most 5 s) before its
next request. Every request has a total client timeout; one that gets no answer in time (or
loses its connection) is counted under `NO_ANSWER`.

The result of one run is a `Level`: statuses, latencies of the successful synchronous requests,
throughput (transcriptions completed, synchronous and jobs, over the run including the tail of
requests still in flight when the window closed) and the jobs' outcomes.
`saturation()` finds the step after which throughput stops growing while p95 climbs.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.data import DATA, short_clips

JFK = DATA / "jfk" / "jfk.flac"
SHORT_CLIPS = short_clips(DATA)
"""Real speech of 3-12 s with references (LibriVox, LibriSpeech, JFK) in the shared data;
callers that send other clips (the reliability tests: tests/data's) pass them to `drive`."""

NO_ANSWER = -1
"""The status recorded for a request that got no answer (client timeout, connection lost)."""
SHED = (503, 429)
"""Statuses with which the service tells a client to come back later (with Retry-After)."""
FINAL_JOB_STATES = ("succeeded", "failed", "cancelled")
MAX_BACKOFF_S = 5.0


def durations(clips: Sequence[Path] = SHORT_CLIPS) -> dict[Path, float]:
    """Duration in seconds of each clip (decoded as the service decodes it)."""
    from speech.audio import audio_duration_s, decode_audio

    return {p: audio_duration_s(decode_audio(p)) for p in clips}


@dataclass
class Level:
    """What `clients` concurrent clients got in one run."""

    clients: int
    seconds: float = 0.0
    """The time window: requests were started only inside it."""
    tail_s: float = 0.0
    """How long the requests still in flight at the end of the window took to finish."""
    latencies: list[float] = field(default_factory=list)
    """Of the successful synchronous requests."""
    audio_s: float = 0.0
    statuses: Counter = field(default_factory=Counter)
    """Synchronous transcriptions by status (NO_ANSWER: none)."""
    job_submits: Counter = field(default_factory=Counter)
    """Job submissions by status."""
    jobs: dict[str, str] = field(default_factory=dict)
    """Accepted job id -> final status, or "lost" when it was not final in time."""
    job_errors: dict[str, str] = field(default_factory=dict)
    job_latencies: list[float] = field(default_factory=list)
    """Submission to seen final, of the succeeded jobs."""
    poll_statuses: Counter = field(default_factory=Counter)
    """Polls answered with something other than 200."""
    missing_retry_after: int = 0
    """503/429 answers without a Retry-After header."""
    errors: list[str] = field(default_factory=list)
    """The first few unanswered requests / unexpected answers, for the failure message."""

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    @property
    def elapsed(self) -> float:
        return self.seconds + self.tail_s

    @property
    def rps(self) -> float:
        """Transcriptions completed per second (synchronous successes and succeeded jobs), over
        the window and the tail."""
        done = self.ok + sum(1 for s in self.jobs.values() if s == "succeeded")
        return done / self.elapsed if self.elapsed else float("nan")

    @property
    def shed(self) -> int:
        return sum(self.statuses.get(s, 0) + self.job_submits.get(s, 0) for s in SHED)

    @property
    def unanswered(self) -> int:
        return (self.statuses.get(NO_ANSWER, 0) + self.job_submits.get(NO_ANSWER, 0)
                + self.poll_statuses.get(NO_ANSWER, 0))

    def pct(self, q: float) -> float:
        return percentile(self.latencies, q)

    def line(self, name: str) -> str:
        errors = {k: v for k, v in sorted(self.statuses.items()) if k != 200}
        return (f"{name:>14} {self.rps:8.2f} req/s {self.audio_s / self.elapsed:8.2f} "
                f"audio-s/s  p50 {self.pct(0.5):6.2f} s  p95 {self.pct(0.95):6.2f} s  "
                f"p99 {self.pct(0.99):6.2f} s  errors {errors or 0}")

    def record(self, status: int, path: Path | None = None, t0: float = 0.0,
               t1: float = 0.0, dur: dict[Path, float] | None = None) -> None:
        self.statuses[status] += 1
        if status == 200:
            self.latencies.append(t1 - t0)
            if dur is not None and path is not None:
                self.audio_s += dur.get(path, 0.0)


def percentile(xs: Sequence[float], q: float) -> float:
    """Nearest-rank percentile; nan for no data."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def _retry_after(r: httpx.Response, level: Level) -> float:
    value = r.headers.get("Retry-After")
    if value is None:
        level.missing_retry_after += 1
        return 1.0
    try:
        return min(MAX_BACKOFF_S, max(0.0, float(value)))
    except ValueError:
        level.missing_retry_after += 1
        return 1.0


def _note(level: Level, what: str) -> None:
    if len(level.errors) < 10:
        level.errors.append(what)


async def _request(http: httpx.AsyncClient, timeout_s: float, method: str, url: str,
                   **kwargs: object) -> httpx.Response | str:
    """The response, or why there was none (a string)."""
    try:
        return await asyncio.wait_for(http.request(method, url, **kwargs), timeout_s)
    except (asyncio.TimeoutError, httpx.TimeoutException):
        return f"no answer in {timeout_s:g} s"
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"


async def _drive(url: str, clients: int, seconds: float, clips: Sequence[Path],
                 dur: dict[Path, float] | None, headers: Sequence[dict[str, str]],
                 job_every: int, max_jobs: int | None, timeout_s: float, job_timeout_s: float,
                 poll_s: float) -> Level:
    level = Level(clients)
    jobs_left = [max_jobs if max_jobs is not None else -1]
    payloads = {p: p.read_bytes() for p in clips}
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    # Total time per request is enforced by _request; httpx's own timeouts are the same bound.
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as http:
        start = time.monotonic()
        deadline = start + seconds

        async def job(auth: dict[str, str], path: Path) -> float:
            """Submit one job and poll it to a final state; returns the back-off to wait."""
            r = await _request(http, timeout_s, "POST", url + "/v1/jobs", headers=auth,
                               files={"file": (path.name, payloads[path])})
            if isinstance(r, str):
                level.job_submits[NO_ANSWER] += 1
                _note(level, f"POST /v1/jobs: {r}")
                return 0.0
            level.job_submits[r.status_code] += 1
            if r.status_code in SHED:
                return _retry_after(r, level)
            if r.status_code != 202:
                _note(level, f"POST /v1/jobs: {r.status_code} {r.text[:200]}")
                return 0.0
            job_id = r.json()["id"]
            t0 = time.monotonic()
            level.jobs[job_id] = "lost"
            while time.monotonic() - t0 < job_timeout_s:
                await asyncio.sleep(poll_s)
                p = await _request(http, timeout_s, "GET", f"{url}/v1/jobs/{job_id}", headers=auth)
                if isinstance(p, str):
                    level.poll_statuses[NO_ANSWER] += 1
                    _note(level, f"GET /v1/jobs/{job_id}: {p}")
                    continue
                if p.status_code != 200:
                    level.poll_statuses[p.status_code] += 1
                    if p.status_code in SHED:
                        await asyncio.sleep(_retry_after(p, level))
                    else:
                        _note(level, f"GET /v1/jobs/{job_id}: {p.status_code} {p.text[:200]}")
                    continue
                body = p.json()
                if body["status"] in FINAL_JOB_STATES:
                    level.jobs[job_id] = body["status"]
                    if body["status"] == "succeeded":
                        level.job_latencies.append(time.monotonic() - t0)
                    else:
                        level.job_errors[job_id] = str(body.get("error"))
                    break
            return 0.0

        async def client(k: int) -> None:
            auth = headers[k % len(headers)] if headers else {}
            i = k
            n = 0
            while time.monotonic() < deadline:
                path = clips[i % len(clips)]
                i += 1
                n += 1
                if job_every and (n + k) % job_every == 0 and jobs_left[0] != 0:
                    jobs_left[0] -= 1  # (the clients' jobs are spread over their requests)
                    backoff = await job(auth, path)
                else:
                    t0 = time.monotonic()
                    r = await _request(http, timeout_s, "POST", url + "/v1/audio/transcriptions",
                                       headers=auth, data={"model": "whisper-1"},
                                       files={"file": (path.name, payloads[path])})
                    t1 = time.monotonic()
                    backoff = 0.0
                    if isinstance(r, str):
                        level.record(NO_ANSWER)
                        _note(level, f"POST /v1/audio/transcriptions: {r}")
                    else:
                        level.record(r.status_code, path, t0, t1, dur)
                        if r.status_code in SHED:
                            backoff = _retry_after(r, level)
                        elif r.status_code != 200:
                            _note(level, f"POST /v1/audio/transcriptions: {r.status_code} "
                                         f"{r.text[:200]}")
                if backoff:
                    await asyncio.sleep(min(backoff, max(0.0, deadline - time.monotonic())))

        await asyncio.gather(*(client(k) for k in range(clients)))
        level.seconds = seconds
        level.tail_s = max(0.0, time.monotonic() - deadline)
    return level


def drive(url: str, clients: int, seconds: float, clips: Sequence[Path] = SHORT_CLIPS,
          dur: dict[Path, float] | None = None, *,
          headers: Sequence[dict[str, str]] | dict[str, str] = (), job_every: int = 0,
          max_jobs: int | None = None, timeout_s: float = 600.0, job_timeout_s: float = 300.0,
          poll_s: float = 1.0) -> Level:
    """`clients` concurrent clients sending `clips` back to back for `seconds`.

    `headers`: one set of headers (e.g. an API key) for all clients, or a list that clients take
    round-robin (several keys, so that per-key rate limits do not decide the result).
    `job_every=k`: every k-th request of each client is a job, polled every `poll_s` until final
    (at most `job_timeout_s`, else it is "lost"); at most `max_jobs` jobs in the run. Requests
    in flight at the end of the window are waited for (their results count, and their time:
    `tail_s`). `timeout_s`: the client timeout of every request.
    """
    if isinstance(headers, dict):
        headers = [headers]
    return asyncio.run(_drive(url.rstrip("/"), clients, seconds, list(clips), dur, list(headers),
                              job_every, max_jobs, timeout_s, job_timeout_s, poll_s))


def saturation(levels: Sequence[Level], growth: float = 0.10) -> Level:
    """The step after which throughput stops growing by more than `growth` while p95 climbs
    (the last step when that never happens)."""
    for a, b in zip(levels, levels[1:]):
        if b.rps < (1 + growth) * a.rps and b.pct(0.95) > a.pct(0.95):
            return a
    return levels[-1]


def table(levels: Sequence[Level], saturated: Level | None = None) -> str:
    """One row per step: throughput, latency percentiles, statuses, jobs."""
    head = (f"{'clients':>7} {'req/s':>7} {'p50 s':>7} {'p95 s':>7} {'p99 s':>7} {'tail s':>6} "
            f"{'sync statuses':<28} {'jobs (submits; outcome)':<34} {'job p50 s':>9}")
    lines = [head, "-" * len(head)]
    for lv in levels:
        sync = ", ".join(f"{_name(k)}:{v}" for k, v in sorted(lv.statuses.items()))
        outcome = Counter(lv.jobs.values())
        jobs = (", ".join(f"{_name(k)}:{v}" for k, v in sorted(lv.job_submits.items()))
                + "; " + ", ".join(f"{k}:{v}" for k, v in sorted(outcome.items())))
        mark = "  <- saturation" if lv is saturated else ""
        lines.append(f"{lv.clients:>7} {lv.rps:>7.2f} {lv.pct(0.5):>7.2f} {lv.pct(0.95):>7.2f} "
                     f"{lv.pct(0.99):>7.2f} {lv.tail_s:>6.1f} {sync:<28} {jobs:<34} "
                     f"{percentile(lv.job_latencies, 0.5):>9.2f}{mark}")
    return "\n".join(lines)


def _name(status: int) -> str:
    return "none" if status == NO_ANSWER else str(status)
