"""The kernels' thread count (llorch.runtime, spec 00 "Threads"):

- the ceiling: the affinity mask, capped by a cgroup v2 or v1 CPU quota on the process's cgroup or an ancestor;
- the automatic choice from CPU samples: a core given up to other work that lasts, taken back, no flapping;
- a fixed count is honoured on whichever thread runs the pass;
- auto really gives a core up to a busy process (a real busy loop pinned to one of our CPUs), and the logits
  stay bitwise those of a fixed count.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import llorch
from llorch import _kernels as K
from llorch.runtime import (CpuSample, affinity_cpus, cgroup_cpu_limit, choose_threads, cpu_busy_seconds, cpu_ceiling,
                            kernel_threads, others_busy, thread_setting)
from llorch.testing import make_checkpoint

PROMPT = [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]


@pytest.fixture
def restore_threads():
    saved = thread_setting()
    yield
    llorch.set_num_threads(saved)


def write(path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# ---- the ceiling ----

def test_cgroup_v2_quota_smallest_along_the_path(tmp_path):
    proc = tmp_path / "proc-cgroup"
    write(proc, "0::/machine/app\n")
    write(tmp_path / "fs" / "machine" / "app" / "cpu.max", "max 100000\n")        # no quota of its own
    write(tmp_path / "fs" / "machine" / "cpu.max", "150000 100000\n")            # the parent's: 1.5 CPUs
    write(tmp_path / "fs" / "cpu.max", "400000 100000\n")
    assert cgroup_cpu_limit(str(tmp_path / "fs"), str(proc)) == 1.5
    write(tmp_path / "fs" / "machine" / "app" / "cpu.max", "50000 100000\n")
    assert cgroup_cpu_limit(str(tmp_path / "fs"), str(proc)) == 0.5
    assert cpu_ceiling(str(tmp_path / "fs"), str(proc)) == 1          # rounded up, at least 1


def test_cgroup_v1_quota(tmp_path):
    proc = tmp_path / "proc-cgroup"
    write(proc, "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n")
    fs = tmp_path / "fs" / "cpu,cpuacct"
    write(fs / "docker" / "abc" / "cpu.cfs_quota_us", "-1\n")                   # none here
    write(fs / "docker" / "abc" / "cpu.cfs_period_us", "100000\n")
    write(fs / "docker" / "cpu.cfs_quota_us", "250000\n")
    write(fs / "docker" / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_limit(str(tmp_path / "fs"), str(proc)) == 2.5
    assert cpu_ceiling(str(tmp_path / "fs"), str(proc)) == min(3, len(affinity_cpus()))


def test_no_quota_and_unreadable_files_leave_the_affinity_mask(tmp_path):
    proc = tmp_path / "proc-cgroup"
    write(proc, "0::/\n")
    assert cgroup_cpu_limit(str(tmp_path / "fs"), str(proc)) is None                # no cpu.max at all
    write(tmp_path / "fs" / "cpu.max", "garbage\n")
    assert cgroup_cpu_limit(str(tmp_path / "fs"), str(proc)) is None
    assert cgroup_cpu_limit(str(tmp_path / "fs"), str(tmp_path / "absent")) is None
    assert cpu_ceiling(str(tmp_path / "fs"), str(proc)) == len(affinity_cpus())


def test_busy_seconds_of_the_cpus_asked_for(tmp_path):
    stat = tmp_path / "stat"
    #        user nice system idle iowait irq softirq steal guest guest_nice
    write(stat, "cpu  300 0 30 900 9 0 0 3 0 0\n"
                "cpu0 100 0 10 500 5 0 0 1 0 0\n"
                "cpu1 200 0 20 400 4 1 1 2 0 0\n"
                "intr 12345\n")
    ticks = llorch.runtime.CLOCK_TICKS
    assert cpu_busy_seconds({1}, str(stat)) == pytest.approx(224 / ticks)       # idle and iowait left out
    assert cpu_busy_seconds({0, 1}, str(stat)) == pytest.approx(335 / ticks)
    assert cpu_busy_seconds(affinity_cpus()) > 0                                 # the real file parses


# ---- the choice ----

def samples(*others: float, own: float = 0.0, seconds: float = 0.25) -> list[CpuSample]:
    """Samples one window apart, in each of which other work kept others[i] cores busy (this process: own)."""
    out = [CpuSample(100.0, 50.0, 10.0)]
    for cores in others:
        last = out[-1]
        out.append(CpuSample(last.wall + seconds, last.busy + (cores + own) * seconds, last.own + own * seconds))
    return out


def test_the_load_of_other_work_is_the_busy_time_minus_our_own():
    before, after = samples(0.5, own=1.5)
    assert others_busy(before, after) == pytest.approx(0.5)


def test_choice_gives_a_core_up_and_takes_it_back_with_hysteresis():
    assert choose_threads(2, 2, 2, samples(0.0, 0.0, own=2.0)) == 2   # quiet: every core (our own use is ours)
    assert choose_threads(2, 2, 2, samples(0.3, 0.3, own=1.7)) == 2   # a little other work: keep the core
    assert choose_threads(2, 2, 2, samples(0.5, 0.5, own=1.5)) == 1   # a busy loop sharing a core: give it up
    assert choose_threads(2, 2, 2, samples(0.0, 0.5, own=1.5)) == 2   # ...but not for one window's burst
    assert choose_threads(2, 2, 2, samples(0.5)) == 2                 # nor on the first window alone
    assert choose_threads(1, 2, 2, samples(0.5, 1.0, own=1.0)) == 1   # it then has the core to itself: stay
    assert choose_threads(1, 2, 2, samples(0.25, 0.25)) == 1          # between the thresholds: no flapping
    assert choose_threads(2, 2, 2, samples(0.25, 0.25)) == 2
    assert choose_threads(1, 2, 2, samples(1.0, 0.1)) == 2            # the other work is gone: take the core back
    assert choose_threads(1, 2, 2, samples(0.1)) == 2                 # at once
    assert choose_threads(1, 2, 2, samples(3.0, 3.0)) == 1            # never fewer than one
    assert choose_threads(2, 2, 2, samples(0.0, 0.0, seconds=5.0)) == 2


def test_choice_stays_within_the_ceiling():
    # a quota of 2 CPUs on a 16-CPU machine: 2 threads while the machine has 2 to spare, fewer below
    assert choose_threads(2, 2, 16, samples(10.0, 10.0)) == 2
    assert choose_threads(2, 2, 16, samples(15.0, 15.0)) == 1
    assert choose_threads(8, 8, 8, samples(2.7, 3.0)) == 5             # floor(8 - 2.7 + 0.35): the lesser load
    assert choose_threads(5, 8, 8, samples(0.0, 0.0)) == 8


# ---- applying it ----

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return llorch.load(make_checkpoint(tmp_path_factory.mktemp("tiny"), "tiny", seed=0))


def logits(model: llorch.GPT2) -> np.ndarray:
    return model.forward(PROMPT, model.new_cache())


def on_another_thread(fn):
    out = []
    worker = threading.Thread(target=lambda: out.append(fn()))
    worker.start()
    worker.join()
    return out[0]


def test_a_fixed_count_holds_on_whichever_thread_runs_the_pass(tiny, restore_threads):
    for n in (1, 2):
        llorch.set_num_threads(n)
        info = llorch.build_info()
        assert (info["threads"], info["threads_mode"], info["threads_source"]) == (n, "fixed", "set_num_threads")
        # a new thread starts with OpenMP's default count: the pass applies the fixed one there
        assert on_another_thread(lambda: (logits(tiny), K.parallel_team_size())[1]) == n
    with pytest.raises(ValueError, match='threads must be a positive integer or "auto", got 0'):
        llorch.set_num_threads(0)


@pytest.mark.skipif(len(affinity_cpus()) < 2 or cpu_ceiling() < 2 or not shutil.which("taskset"),
                    reason="needs 2 CPUs to give one up, and taskset")
def test_auto_gives_a_core_up_to_a_busy_process_with_the_same_logits(tiny, restore_threads):
    llorch.set_num_threads(1)
    want = logits(tiny)
    llorch.set_num_threads("auto")
    assert (thread_setting(), kernel_threads(), K.max_threads()) == (None, cpu_ceiling(), cpu_ceiling())
    loop = subprocess.Popen(["taskset", "-c", str(max(affinity_cpus())), sys.executable, "-c", "while True: pass"])
    try:
        deadline = time.monotonic() + 5.0
        while kernel_threads() == cpu_ceiling() and time.monotonic() < deadline:
            time.sleep(0.05)
            got = logits(tiny)
        team = K.parallel_team_size()
    finally:
        loop.kill()
        loop.wait()
    assert kernel_threads() < cpu_ceiling(), "auto kept every core while one was busy"
    assert team == kernel_threads() and llorch.build_info()["threads_mode"] == "auto"
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
