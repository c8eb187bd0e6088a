"""How many CPU threads a computation may use, given what else runs on the machine.

The policy ("auto", the default):

- On a quiet machine every computation uses torch's thread count (``torch.get_num_threads()``,
  which follows ``OMP_NUM_THREADS`` and ``torch.set_num_threads``): nothing changes there.
- When other processes keep cores busy, a computation uses only the cores they leave free
  (at least one). OpenMP threads wait for each other at the end of every parallel region;
  a thread that shares its core with another process is descheduled for a whole time slice,
  and the others spin or sleep until it comes back. On 2 cores with one of them busy this
  made everything-mode 5-40x slower than on one thread (``benchmarks/bench_busy.py``).

The load of other processes is read from ``/proc/stat`` (all processes' CPU time) minus
``/proc/self/stat`` (this process's), sampled by a daemon thread every
:data:`SAMPLE_SECONDS` and averaged over the last two samples. Processes with a positive nice
value are not counted: the kernel gives them a small share when a normal-priority process wants
the core, so they do not stall our threads. The check costs a few microseconds per
computation, and the thread count is chosen again at each one (each click, each image
embedding, each batch of everything-mode prompts).

Override with the environment variable ``NAPARI_SAM_THREADS``: ``auto`` (default), or a
number of threads to use always (``NAPARI_SAM_THREADS=2`` restores torch's plain behaviour on
a 2-core machine). Where ``/proc`` is missing (macOS, Windows) the policy keeps torch's count.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator

import torch

from ..errors import InvalidInputError

ENV_VAR = "NAPARI_SAM_THREADS"
#: seconds between two samples of the machine's CPU times
SAMPLE_SECONDS = 0.25
#: busy cores of other processes below this count as idle (short bursts, our own sampler)
IDLE_MARGIN = 0.25


def _read_times() -> tuple[float, float, float] | None:
    """(wall seconds, busy CPU seconds of all processes but niced ones, CPU seconds of this
    process), or None where ``/proc`` cannot be read."""
    try:
        with open("/proc/stat", "rb") as f:
            fields = f.readline().split()
        with open("/proc/self/stat", "rb") as f:
            own = f.read()
    except OSError:
        return None
    # cpu  user nice system idle iowait irq softirq steal ...
    ticks = [int(v) for v in fields[1:9]]
    user, _nice, system, _idle, _iowait, irq, softirq, steal = ticks
    # /proc/self/stat: fields after the ")" closing the command name; utime, stime are 14, 15
    rest = own[own.rindex(b")") + 2:].split()
    utime, stime = int(rest[11]), int(rest[12])
    hz = os.sysconf("SC_CLK_TCK")
    return time.monotonic(), (user + system + irq + softirq + steal) / hz, (utime + stime) / hz


class LoadMonitor:
    """Estimates how many cores other processes keep busy, from a background sampler."""

    def __init__(self, period: float = SAMPLE_SECONDS) -> None:
        self.period = period
        self._samples: list[tuple[float, float, float]] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.available = _read_times() is not None

    def _run(self) -> None:
        while True:
            sample = _read_times()
            if sample is None:
                return
            with self._lock:
                self._samples = (self._samples + [sample])[-3:]
            time.sleep(self.period)

    def _start(self) -> None:
        if self._thread is None and self.available:
            self._thread = threading.Thread(target=self._run, name="napari-sam-load", daemon=True)
            self._thread.start()

    def other_busy_cores(self) -> float:
        """Cores kept busy by other (normal-priority) processes over the last ~2 sample periods;
        0.0 until two samples exist."""
        self._start()
        with self._lock:
            samples = list(self._samples)
        if len(samples) < 2:
            return 0.0
        (t0, busy0, own0), (t1, busy1, own1) = samples[0], samples[-1]
        if t1 <= t0:
            return 0.0
        return max(0.0, ((busy1 - busy0) - (own1 - own0)) / (t1 - t0))


_MONITOR = LoadMonitor()


def cpu_count() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def configured_threads() -> int | None:
    """The fixed thread count from ``NAPARI_SAM_THREADS``, or None for the automatic policy."""
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value in ("", "auto"):
        return None
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise InvalidInputError(
            f"{ENV_VAR}={os.environ[ENV_VAR]!r} is not valid; use 'auto' or a thread count >= 1."
        )
    return n


def choose_threads(limit: int | None = None) -> int:
    """Threads for the next computation: the fixed count of ``NAPARI_SAM_THREADS``, else
    ``limit`` (default ``torch.get_num_threads()``) reduced to the cores other processes
    leave free, at least 1."""
    fixed = configured_threads()
    if fixed is not None:
        return fixed
    limit = torch.get_num_threads() if limit is None else int(limit)
    if limit <= 1 or not _MONITOR.available:
        return max(1, limit)
    others = _MONITOR.other_busy_cores()
    if others < IDLE_MARGIN:
        return limit
    free = cpu_count() - others
    return max(1, min(limit, int(free + IDLE_MARGIN)))


@contextlib.contextmanager
def compute_threads() -> Iterator[int]:
    """Run the enclosed torch work on :func:`choose_threads` threads, then restore the calling
    thread's count (OpenMP thread counts belong to the calling thread). Yields the count."""
    before = torch.get_num_threads()
    n = choose_threads(before)
    if n == before:
        yield n
        return
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


def warm_up() -> None:
    """Start the load sampler now, so that the first computation already sees the load."""
    _MONITOR._start()
