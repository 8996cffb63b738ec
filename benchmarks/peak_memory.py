"""Peak resident memory of a stretch of work in this process, on Linux: the kernel's high-water mark (VmHWM) is
reset before the work and read after it, so what the process allocated earlier (loading models) does not count."""

from __future__ import annotations

import os


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB -> MiB
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> float:
    """Resets the high-water mark to the current resident size, and returns that size in MiB."""
    with open(f"/proc/{os.getpid()}/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    return _status_mib("VmRSS")


def peak_since_reset() -> float:
    """The highest resident size since `reset_peak`, in MiB."""
    return _status_mib("VmHWM")
