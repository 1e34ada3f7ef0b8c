"""How many CPU threads to train with when other processes share the cores.

torch runs one OpenMP thread per core, and OpenMP threads spin at every barrier waiting
for each other. When another process holds one of those cores, every barrier waits for
the thread that the scheduler left out: on 2 cores beside one busy process, two threads
trained the VAE 3.6x slower than alone, one thread 1.75x (BENCHMARKS.md, threads). So the
trainer uses as many threads as there are cores that other processes leave idle, read
from ``/proc/stat`` (all processes) less ``/proc/self/stat`` (this one) and checked again
every few seconds, so it follows a load that comes and goes.
"""

import os
import time

import torch

__all__ = ["ThreadPolicy", "others_busy_cores"]


def _busy_ticks() -> tuple[int, int] | None:
    """(busy clock ticks of all cores, of this process) since boot, or None off Linux."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, idle, iowait, irq, softirq, steal = map(
                int, f.readline().split()[1:9])
        with open("/proc/self/stat") as f:
            # The command name (field 2) may hold spaces; fields after its ')' are plain.
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, ValueError):
        return None
    own = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
    return user + nice + system + irq + softirq + steal, own


def others_busy_cores(interval: float = 0.1) -> float | None:
    """How many cores other processes kept busy over the next ``interval`` seconds."""
    a = _busy_ticks()
    t0 = time.monotonic()
    time.sleep(interval)
    b = _busy_ticks()
    if a is None or b is None:
        return None
    return _others(a, b, time.monotonic() - t0)


def _others(a: tuple[int, int], b: tuple[int, int], seconds: float) -> float:
    hz = os.sysconf("SC_CLK_TCK")
    return max(0.0, ((b[0] - a[0]) - (b[1] - a[1])) / hz / seconds)


class ThreadPolicy:
    """Set torch's intra-op threads for training and keep them right while it runs.

    Arguments:
        threads: a fixed number, 0 for automatic (as many as other processes leave cores
            idle, at most the number torch started with), or -1 to leave them alone
            (training on a GPU).
        interval: seconds between checks of the load.
    """

    def __init__(self, threads: int, interval: float = 2.0):
        self.before = self.most = torch.get_num_threads()
        self.interval = interval
        if threads > 0:
            torch.set_num_threads(threads)
        # With one thread to start from there is nothing to choose.
        self.last = _busy_ticks() if threads == 0 and self.most > 1 else None
        self.checked = time.monotonic()
        if self.last is not None:
            # A first look before the first step: a short epoch on a busy machine would
            # otherwise run its first seconds many times slower.
            busy = others_busy_cores()
            if busy is not None:
                self._set(busy)
            self.last, self.checked = _busy_ticks(), time.monotonic()

    def _set(self, others_busy: float) -> None:
        idle = (os.cpu_count() or 1) - others_busy
        # A core counts as ours when at least three quarters of it is idle.
        threads = max(1, min(self.most, int(idle + 0.25)))
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)

    def update(self) -> None:
        """Look at the load again if ``interval`` seconds have passed (cheap otherwise)."""
        if self.last is None or time.monotonic() - self.checked < self.interval:
            return
        now, t = _busy_ticks(), time.monotonic()
        if now is None:
            return
        self._set(_others(self.last, now, t - self.checked))
        self.last, self.checked = now, t

    def restore(self) -> None:
        torch.set_num_threads(self.before)
