"""What a worker and a front end compare to know they share a host, and how much of it.

The same kernel boot id means the same machine (or containers on it): one
CLOCK_MONOTONIC, so trace stamps compare as they are, and a listener on loopback or
the host's address. The same /dev/shm mount means the same shared-memory files:
containers on one host share a kernel but usually not their /dev/shm.
"""

from __future__ import annotations

import os
from pathlib import Path

SHM = Path("/dev/shm")


def clock_id() -> str:
    """This kernel's boot id ("" off Linux: never assume a shared clock)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def shm_namespace() -> str:
    """Which /dev/shm this process sees, as its device and inode ("" without one)."""
    try:
        st = os.stat(SHM)
    except OSError:
        return ""
    return f"{clock_id()}:{st.st_dev}:{st.st_ino}"
