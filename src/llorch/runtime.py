"""Threads and SIMD path for the kernels, and the facts of this build (`llorch.build_info()`).

Threads. A count fixed by set_num_threads(n), LLORCH_NUM_THREADS or OMP_NUM_THREADS is used as given.
Otherwise the count is "auto": at most the CPUs this process may use (its affinity mask, capped by a cgroup
CPU quota), minus the cores that other work keeps busy, measured from /proc/stat at most every
SAMPLE_PERIOD_S, just before a model pass. Why giving a core up pays: every op splits its outputs among
the threads in fixed shares, so each parallel region waits for its slowest thread, and a thread that shares
its core with another process gets a time slice now and then; meanwhile the other threads spin at the
region's barrier, part of them on that same core. With one of 2 cores busy, 2 threads decode at about half
the speed of 1.

OpenMP keeps the thread count per calling thread, so the count is applied before every pass on the thread
that runs it (llorch.model calls threads_for_pass()).
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from collections import deque
from typing import NamedTuple, Sequence

from . import _kernels
from .version import __version__

SAMPLE_PERIOD_S = 0.25   # reading /proc/stat costs tens of microseconds: a few times a second is free
SLACK = 0.35             # a core stays in use while other work takes at most this much of it...
HYSTERESIS = 0.2         # ...and is taken back once other work leaves all but SLACK - HYSTERESIS of it
DROP_WINDOWS = 2         # a core is given up only when other work took it in this many windows in a row:
                         # a quiet machine's bursts (another process for 0.1 s) cost a core for a window or more
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100   # /proc/stat's unit: 1/ticks s


def warn(message: str, prog: str = "llorch") -> None:
    """One line on stderr, `prog: warning: message`: something the user should know, not a reason to stop."""
    sys.stderr.write(f"{prog}: warning: {message}\n")


def affinity_cpus() -> set[int]:
    """The CPUs this process may run on (all of them where the OS cannot say)."""
    if hasattr(os, "sched_getaffinity"):
        return os.sched_getaffinity(0)
    return set(range(os.cpu_count() or 1))


def threads_beyond_cpus(n: int) -> str | None:
    """Why n threads are too many here, if they are: more than the CPUs this process may run on
    only makes OpenMP's threads wait for each other."""
    available = len(affinity_cpus())
    if n > available:
        return f"exceeds the {available} CPUs available to this process: the threads would wait for each other"
    return None


def _cgroup_quota(directory: str, v2: bool) -> float | None:
    """CPUs' worth of time per period that this cgroup directory's quota allows; None without one."""
    try:
        if v2:   # cpu.max: "QUOTA PERIOD", QUOTA "max" for none
            with open(os.path.join(directory, "cpu.max")) as f:
                quota, period = f.read().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        with open(os.path.join(directory, "cpu.cfs_quota_us")) as f:   # -1 for none
            quota = int(f.read())
        with open(os.path.join(directory, "cpu.cfs_period_us")) as f:
            period = int(f.read())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def cgroup_cpu_limit(root: str = "/sys/fs/cgroup", proc_cgroup: str = "/proc/self/cgroup") -> float | None:
    """The smallest CPU quota (in CPUs, maybe fractional) set on this process's cgroup or an ancestor, v2
    (cpu.max) or v1 (cpu.cfs_quota_us / cpu.cfs_period_us); None without one. proc_cgroup lists the
    process's cgroups ("ID:CONTROLLERS:PATH", CONTROLLERS empty for v2), found under root."""
    try:
        with open(proc_cgroup) as f:
            entries = [line.rstrip("\n").split(":", 2) for line in f if line.count(":") >= 2]
    except OSError:
        return None
    quotas = []
    for _, controllers, path in entries:
        v2 = controllers == ""
        if v2:
            base = root
        elif "cpu" in controllers.split(","):
            base = os.path.join(root, controllers)
            base = base if os.path.isdir(base) else os.path.join(root, "cpu")
        else:
            continue
        parts = [p for p in path.split("/") if p not in ("", ".", "..")]
        for depth in range(len(parts), -1, -1):   # the cgroup, then each ancestor up to the root
            quota = _cgroup_quota(os.path.join(base, *parts[:depth]), v2)
            if quota is not None:
                quotas.append(quota)
    return min(quotas, default=None)


def cpu_ceiling(root: str = "/sys/fs/cgroup", proc_cgroup: str = "/proc/self/cgroup") -> int:
    """The most threads worth running: the CPUs this process may use, capped by a cgroup quota rounded up."""
    cpus = len(affinity_cpus())
    quota = cgroup_cpu_limit(root, proc_cgroup)
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


class CpuSample(NamedTuple):
    wall: float   # time.monotonic(), seconds
    busy: float   # non-idle seconds of this process's CPUs since boot (/proc/stat)
    own: float    # this process's CPU seconds


def cpu_busy_seconds(cpus: set[int], stat: str = "/proc/stat") -> float:
    """Non-idle time of these CPUs since boot, in seconds: user (with guest), nice, system, irq, softirq
    and steal (the hypervisor ran someone else on it); idle and iowait are idle. OSError where there is
    no /proc/stat."""
    busy = 0
    with open(stat) as f:
        for line in f:
            if not line.startswith("cpu"):
                break   # the per-CPU lines come first
            name, *fields = line.split()
            if name != "cpu" and int(name[3:]) in cpus:
                user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
                busy += user + nice + system + irq + softirq + steal
    return busy / CLOCK_TICKS


def others_busy(before: CpuSample, after: CpuSample) -> float:
    """Cores that other work kept busy between two samples: the busy time of the CPUs minus this
    process's own CPU time, over the wall time."""
    return ((after.busy - before.busy) - (after.own - before.own)) / (after.wall - before.wall)


def choose_threads(current: int, ceiling: int, cpus: int, samples: Sequence[CpuSample]) -> int:
    """The thread count for the next passes, from the current one and the latest samples (in time order)
    of this process's cpus CPUs: the cores other work keeps busy are not free. A core is given up once
    others take more than SLACK of it in each of the last DROP_WINDOWS windows between samples, and taken
    back once they take less than SLACK - HYSTERESIS in the latest, so that neither a burst nor a load near
    the threshold makes the count flap."""
    windows = [others_busy(a, b) for a, b in zip(samples, samples[1:])][-DROP_WINDOWS:]
    wanted = math.floor(cpus - min(windows) + SLACK) if len(windows) == DROP_WINDOWS else current
    if wanted >= current:
        wanted = max(current, math.floor(cpus - windows[-1] + SLACK - HYSTERESIS))
    return min(max(wanted, 1), ceiling)


class _Threads:
    """The process's thread policy: a fixed count, or auto with its latest samples and choice."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.cpus = affinity_cpus()
        self.ceiling = cpu_ceiling()
        self.fixed: int | None = None
        self.source = "auto"
        self.current = self.ceiling
        self.samples: deque[CpuSample] = deque(maxlen=DROP_WINDOWS + 1)

    def sample(self) -> CpuSample | None:
        try:
            busy = cpu_busy_seconds(self.cpus)
        except (OSError, ValueError):   # not Linux: auto keeps the ceiling
            return None
        return CpuSample(time.monotonic(), busy, time.process_time())

    def fix(self, n: int, source: str) -> None:
        with self.lock:
            self.fixed, self.source = n, source
        _kernels.set_num_threads(n)

    def auto(self) -> None:
        with self.lock:
            self.fixed, self.source, self.current = None, "auto", self.ceiling
            self.samples.clear()
            if (first := self.sample()) is not None:
                self.samples.append(first)
        _kernels.set_num_threads(self.current)

    def for_pass(self) -> int:
        if self.fixed is None and self.samples and time.monotonic() - self.samples[-1].wall >= SAMPLE_PERIOD_S:
            with self.lock:
                now = self.sample()
                if self.fixed is None and now is not None and now.wall - self.samples[-1].wall >= SAMPLE_PERIOD_S:
                    self.samples.append(now)
                    self.current = choose_threads(self.current, self.ceiling, len(self.cpus), list(self.samples))
        n = self.fixed or self.current
        _kernels.set_num_threads(n)
        return n


_threads = _Threads()


def set_num_threads(n: int | str | None) -> None:
    """Threads for every kernel from now on (OpenMP): n fixes the count; None or "auto" lets llorch choose
    it before each pass from the CPUs other work leaves free (the default). Results do not depend on it,
    only speed."""
    if n is None or n == "auto":
        _threads.auto()
        return
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f'threads must be a positive integer or "auto", got {n!r}')
    _threads.fix(n, "set_num_threads")


def threads_for_pass() -> int:
    """Apply, on the calling thread, the thread count the next model pass runs with, and return it."""
    return _threads.for_pass()


def thread_setting() -> int | None:
    """The fixed count, or None for auto: what set_num_threads takes to restore the setting."""
    return _threads.fixed


def kernel_threads() -> int:
    """The thread count of the latest choice: the fixed count, or auto's current one."""
    return _threads.fixed or _threads.current


def select_simd(name: str) -> None:
    """Kernel SIMD path: "auto" (the best this CPU runs), "baseline", "avx2" or "avx512"."""
    _kernels.select_simd(name)


def configure_from_env() -> None:
    """Apply LLORCH_NUM_THREADS (a count, or "auto"; over OMP_NUM_THREADS, which OpenMP reads itself) and
    LLORCH_SIMD; with none of the thread variables, threads are auto.

    Runs at import, so a bad value is a one-line warning on stderr naming the variable, not an exception;
    `--threads` on the command line is applied later and wins."""
    threads = os.environ.get("LLORCH_NUM_THREADS")
    if threads == "auto":
        _threads.auto()
    elif threads and threads.isdigit() and int(threads) >= 1:
        _threads.fix(int(threads), "LLORCH_NUM_THREADS")
    else:
        if threads:
            warn(f'LLORCH_NUM_THREADS={threads!r} ignored: expected a positive integer or "auto"')
        if os.environ.get("OMP_NUM_THREADS"):
            _threads.fix(_kernels.max_threads(), "OMP_NUM_THREADS")
        else:
            _threads.auto()
    simd = os.environ.get("LLORCH_SIMD")
    if simd:
        try:
            select_simd(simd)
        except ValueError as e:
            warn(f"LLORCH_SIMD={simd!r} ignored: {e}")


def build_info() -> dict:
    """Compiler, OpenMP, threads and SIMD paths of the compiled kernels.

    threads: the count of the latest choice; threads_mode "auto" or "fixed"; threads_source where a fixed
    count came from (set_num_threads, LLORCH_NUM_THREADS, OMP_NUM_THREADS); threads_ceiling auto's most;
    max_threads: OpenMP's count on the calling thread."""
    openmp = _kernels.openmp_version()
    return {
        "version": __version__,
        "compiler": _kernels.compiler(),
        "openmp": bool(openmp),
        "openmp_version": openmp,
        "max_threads": _kernels.max_threads(),
        "threads": kernel_threads(),
        "threads_mode": "fixed" if _threads.fixed else "auto",
        "threads_source": _threads.source,
        "threads_ceiling": _threads.ceiling,
        "simd_compiled": _kernels.simd_compiled().split(),
        "simd_supported": _kernels.simd_supported().split(),
        "simd_selected": _kernels.simd_selected(),
    }
