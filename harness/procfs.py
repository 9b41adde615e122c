"""A process's memory and threads as Linux reports them in /proc/<pid>/status."""

from __future__ import annotations

import statistics
import threading
import time


def status_field(name: str, pid: int | str = "self") -> int:
    """The number on `name`'s line of /proc/<pid>/status: kB for VmRSS (resident set) and VmHWM
    (its peak), a count for Threads. OSError once the process is gone, KeyError for no such line."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    raise KeyError(name)


def reset_peak_rss(pid: int | str = "self") -> bool:
    """Resets VmHWM to the current RSS (`echo 5 > /proc/<pid>/clear_refs`, Linux >= 4.0); False
    where that is not allowed, and VmHWM then still holds the peak since the process started."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class RssSampler(threading.Thread):
    """VmRSS of `pid` every `interval` seconds until `stop` is set or the process is gone."""

    def __init__(self, pid: int, interval: float):
        super().__init__(name="rss-sampler", daemon=True)
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, int]] = []  # (time.monotonic(), VmRSS kB)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.samples.append((time.monotonic(), status_field("VmRSS", self.pid)))
            except (OSError, KeyError):
                return
            self.stop.wait(self.interval)

    def finish(self) -> None:
        self.stop.set()
        if self.is_alive():
            self.join()

    def peak_kb(self) -> int:
        return max((kb for _, kb in self.samples), default=0)

    def median_kb_between(self, start: float, end: float) -> float:
        values = [kb for t, kb in self.samples if start <= t <= end]
        return statistics.median(values) if values else float("nan")
