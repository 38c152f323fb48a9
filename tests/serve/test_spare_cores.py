"""The replica borrows threads only when the rest of the machine was idle during its last batch."""

from __future__ import annotations

import subprocess
import sys
import time

from serve.spare_cores import SpareCores, machine_busy_s


def test_machine_cpu_time_is_read_and_only_grows() -> None:
    first = machine_busy_s()
    assert first is not None and first > 0
    sum(i * i for i in range(2_000_000))
    assert machine_busy_s() >= first


def test_work_in_another_process_marks_the_machine_busy() -> None:
    spare = SpareCores()
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # started and spinning
        spare.start()
        time.sleep(1.5)
        spare.stop()
    finally:
        spinner.kill()
        spinner.wait()
    assert spare.others_cores is not None and spare.others_cores >= 0.7, spare.others_cores
    assert not spare.idle


def test_this_process_own_work_is_not_counted_as_others() -> None:
    spare = SpareCores()
    spare.start()
    end = time.process_time() + 1.0
    while time.process_time() < end:
        pass
    spare.stop()
    assert spare.others_cores is not None and spare.others_cores < 0.5, spare.others_cores
    assert spare.idle


def test_nothing_measured_lends_nothing() -> None:
    spare = SpareCores()
    assert spare.others_cores is None and not spare.idle
    spare.stop()  # without start: still nothing
    assert not spare.idle
