"""kdbench/scheduler_timers.py: one pending re-evaluation timer per Snakemake scheduler."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from kdbench import scheduler_timers


class Scheduler:
    """The part of Snakemake's JobScheduler the patch touches, with the upstream method."""

    def __init__(self) -> None:
        self._open_jobs = threading.Semaphore(0)

    def _schedule_reevalutation(self, delay: float) -> None:  # Snakemake 9's body: a new timer per call
        threading.Timer(delay, lambda: self._open_jobs.release()).start()


def wakeups(scheduler: Scheduler, within: float) -> int:
    n, end = 0, time.monotonic() + within
    while scheduler._open_jobs.acquire(timeout=max(0.0, end - time.monotonic())):
        n += 1
    return n


def test_the_upstream_method_starts_a_timer_per_call():
    # the behaviour the patch exists for: ten events, ten wake-ups (ten chains once the loop re-arms each)
    s = Scheduler()
    for _ in range(10):
        s._schedule_reevalutation(0.05)
    assert wakeups(s, 0.5) == 10


def test_patched_calls_while_a_timer_is_pending_start_none_and_the_next_one_rearms():
    class Patched(Scheduler):
        pass

    assert scheduler_timers.one_timer_at_a_time(Patched)
    assert not scheduler_timers.one_timer_at_a_time(Patched)  # once only
    s = Patched()
    for _ in range(10):
        s._schedule_reevalutation(0.05)
    assert wakeups(s, 0.5) == 1
    s._schedule_reevalutation(0.05)  # the pending one has fired: the loop's next pass arms a new one
    assert wakeups(s, 0.5) == 1
    other = Patched()  # each scheduler has its own timer
    s._schedule_reevalutation(0.05)
    other._schedule_reevalutation(0.05)
    assert wakeups(s, 0.5) == 1 and wakeups(other, 0.1) == 1


def test_a_class_without_the_method_is_left_alone():
    class Other:
        pass

    assert not scheduler_timers.one_timer_at_a_time(Other)
    assert not hasattr(Other, "_schedule_reevalutation")


def test_the_installed_snakemake_has_the_method_and_the_snakefile_patches_it():
    # fails when a Snakemake upgrade renames or removes the method: then revisit kdbench/scheduler_timers.py
    from snakemake.scheduling.job_scheduler import JobScheduler

    scheduler_timers.apply()
    assert getattr(JobScheduler._schedule_reevalutation, scheduler_timers.PATCHED, False)
    snakefile = (Path(__file__).parents[1] / "Snakefile").read_text()
    assert "scheduler_timers.apply()" in snakefile
