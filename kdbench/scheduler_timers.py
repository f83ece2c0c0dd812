"""One re-evaluation timer at a time in Snakemake's job scheduler (the Snakefile applies it).

Snakemake 9's scheduler loop ends each pass, when a job rate limit is set (always: `--max-jobs-per-timespan`
defaults to 100/1s), by starting a `threading.Timer` that wakes the loop again one timespan later. Every other
wake-up (a job that finishes, an error) also ends with such a timer, so each event starts one more chain of
timers that never stops: after n finished jobs, n timers fire every second, and each firing makes a full
scheduler pass over the DAG. Measured on a 120-job workflow, the Snakemake process grew by one thread per
finished job; on the zoo's ~600-job DAG this costs minutes of CPU that the training jobs of a 2-core machine
need. One pending timer per scheduler wakes the loop exactly as often as the rate limit asks for.

A Snakemake without the private method patched here is left alone (`tests/test_scheduler_timers.py` fails then,
so that an upgrade that renames it is noticed).
"""

from __future__ import annotations

import threading

PATCHED = "_kdbench_one_timer"


def one_timer_at_a_time(scheduler_class: type) -> bool:
    """Make `scheduler_class._schedule_reevalutation` start a timer only when none is pending.

    Returns whether the class was patched (False: the method does not exist, or it is patched already).
    """
    original = getattr(scheduler_class, "_schedule_reevalutation", None)
    if original is None or getattr(original, PATCHED, False):
        return False

    def schedule_reevaluation(self, delay: float) -> None:
        lock = self.__dict__.setdefault("_kdbench_timer_lock", threading.Lock())
        with lock:
            if self.__dict__.get("_kdbench_timer_pending"):
                return
            self._kdbench_timer_pending = True

        def wake() -> None:
            with lock:
                self._kdbench_timer_pending = False
            self._open_jobs.release()

        timer = threading.Timer(delay, wake)
        timer.daemon = True
        timer.start()

    setattr(schedule_reevaluation, PATCHED, True)
    scheduler_class._schedule_reevalutation = schedule_reevaluation
    return True


def apply() -> bool:
    """Patch the scheduler of the Snakemake that imports this (called from the Snakefile)."""
    try:
        from snakemake.scheduling.job_scheduler import JobScheduler
    except ImportError:  # another Snakemake layout: nothing to patch
        return False
    return one_timer_at_a_time(JobScheduler)
