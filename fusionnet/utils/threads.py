"""How many CPU threads torch uses: as many as there are idle cores when a command starts; and how work in a
thread of its own is stopped (:func:`check_cancelled`).

torch's CPU kernels split each operation over its threads and wait for all of them at the end. When another
process keeps a core busy, one of those threads waits for the OS to give it that core again, and every one of the
thousands of small operations of a fit pays that wait: ``fusionnet demo`` took 11x its time alone beside one busy
process with 2 threads on 2 cores, 1.2x when it used the one idle core (experiments/README.md, section 14). So a command counts the
idle cores first (:func:`idle_cpus`, from ``/proc/stat`` over a fifth of a second) and uses that many threads,
unless ``OMP_NUM_THREADS`` says otherwise.
"""

from __future__ import annotations

import os
import threading
import time


def _cpu_times() -> tuple[int, int] | None:
    """(idle, total) jiffies of all CPUs since boot, or None where /proc/stat is not there."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return fields[3] + (fields[4] if len(fields) > 4 else 0), sum(fields[:8])


def idle_cpus(sample_s: float = 0.2) -> float | None:
    """How many of this machine's CPUs were idle over ``sample_s`` seconds (None: unknown). This process sleeps
    meanwhile, so what is busy is other work."""
    first = _cpu_times()
    time.sleep(sample_s)
    second = _cpu_times()
    if first is None or second is None or second[1] <= first[1]:
        return None
    return (os.cpu_count() or 1) * (second[0] - first[0]) / (second[1] - first[1])


def threads_for_idle_cores(log=None) -> int | None:
    """Set torch's thread count to the idle cores (at least 1) when other work keeps some busy; returns the count
    set, or None where nothing changed (``OMP_NUM_THREADS`` given, every core idle, or unknown)."""
    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        return None
    idle = idle_cpus()
    now = torch.get_num_threads()
    if idle is None or idle >= now - 0.5:
        return None
    n = max(1, int(round(idle)))
    torch.set_num_threads(n)
    if log is not None:
        log(f"other work keeps {now - idle:.1f} of {now} cores busy: torch uses {n} thread(s) (OMP_NUM_THREADS to "
            f"choose)")
    return n


# ---- stopping work in another thread ------------------------------------------------------------------------------
_local = threading.local()


class Cancelled(BaseException):
    """Raised in a thread whose work was cancelled (not an Exception: nothing that handles errors swallows it)."""


def cancel_with(event: threading.Event | None) -> None:
    """Make ``event`` this thread's cancel signal: once it is set, :func:`check_cancelled` raises here."""
    _local.cancel = event


def check_cancelled() -> None:
    """Raise :class:`Cancelled` if this thread's cancel signal is set; long loops call it at each step (a fit in
    a thread of its own stops within one step when the command around it fails or is interrupted, instead of
    being cut off mid-operation by the interpreter's exit)."""
    event = getattr(_local, "cancel", None)
    if event is not None and event.is_set():
        raise Cancelled("cancelled")
