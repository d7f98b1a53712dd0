"""The cores this process may run on: its CPU affinity (a container's cpuset, `taskset`), not
the host's count, which `os.cpu_count()` reports. Thread pools sized to the host oversubscribe
a pinned process."""

from __future__ import annotations

import os


def cores() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
