"""Whether a process still runs: what the data-dir lock and the bulk loader ask of a recorded pid."""

from __future__ import annotations

import os
from pathlib import Path


def pid_alive(pid) -> bool:
    """Whether `pid` names a process that has not exited (a zombie has); False for no pid."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        try:  # no /proc (macOS): signal 0 says whether it exists
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return state not in ("Z", "X")
