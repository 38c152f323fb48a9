"""How busy the rest of the machine was while the model last computed.

The ASR replica lends the model more torch threads (`threads_when_alone`) only when that would
not take cores from other work: the replica sees its own queue, not the ingress decoding and
planning uploads or the requests it is refusing with 503, and OpenMP threads spinning beside
that work slow both (serve_config.yaml, on `num_cpus`). So each batch measures the CPU time the machine spent outside this process during it (Linux's /proc/stat
against `time.process_time`), and the next batch borrows only if that was under half a core.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

PROC_STAT = Path("/proc/stat")
BUSY_LIMIT_CORES = 0.5
"""Others used less than this many cores on average during the last batch: the machine is idle."""


def machine_busy_s() -> float | None:
    """CPU seconds all processes have used since boot (user, nice, system, irq, softirq);
    None where /proc/stat cannot be read (not Linux): then nothing is lent."""
    try:
        fields = PROC_STAT.read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 8:
        return None
    user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fields[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


class SpareCores:
    """`start` and `stop` around each model call; `idle` says whether the last one had the
    machine to itself."""

    def __init__(self) -> None:
        self._start: tuple[float, float | None, float] | None = None
        self.others_cores: float | None = None
        """Cores the rest of the machine used, on average, during the last measured call."""

    def start(self) -> None:
        self._start = (time.monotonic(), machine_busy_s(), time.process_time())

    def stop(self) -> None:
        if self._start is None:
            return
        (wall0, busy0, own0), self._start = self._start, None
        busy, wall = machine_busy_s(), time.monotonic() - wall0
        if busy is None or busy0 is None or wall <= 0:
            self.others_cores = None
            return
        self.others_cores = max(0.0, (busy - busy0) - (time.process_time() - own0)) / wall

    @property
    def idle(self) -> bool:
        return self.others_cores is not None and self.others_cores < BUSY_LIMIT_CORES
