"""What nvidia-smi says about the GPU: its name, and whether a stopped server has given its memory back."""

from __future__ import annotations

import shutil
import subprocess
import time

QUERY_TIMEOUT_S = 30


def _query(fields: str) -> list[str] | None:
    """One line per GPU of nvidia-smi's CSV answer, or None where nvidia-smi is missing or fails."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        done = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=QUERY_TIMEOUT_S, check=True)
    except (subprocess.SubprocessError, OSError):
        return None
    return [line.strip() for line in done.stdout.splitlines() if line.strip()]


def device_names() -> list[str]:
    """Name, memory and driver of each GPU, e.g. 'NVIDIA H100 80GB HBM3, 81559 MiB, driver 580.95'."""
    lines = _query("name,memory.total,driver_version")
    if lines is None:
        return []
    described = []
    for line in lines:
        name, memory, driver = (part.strip() for part in line.split(","))
        described.append(f"{name}, {memory} MiB, driver {driver}")
    return described


def memory_used_mib() -> int | None:
    """Memory in use on GPU 0 in MiB, or None without nvidia-smi."""
    lines = _query("memory.used")
    if not lines:
        return None
    return int(float(lines[0]))


def wait_until_memory_at_most(limit_mib: int, timeout_s: float, poll_s: float = 2.0) -> int | None:
    """Poll until GPU 0 uses at most ``limit_mib``; returns the last reading (None without nvidia-smi).

    Raises TimeoutError if the memory is still taken after ``timeout_s``: a next server would not fit.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        used = memory_used_mib()
        if used is None or used <= limit_mib:
            return used
        if time.monotonic() >= deadline:
            raise TimeoutError(f"GPU memory still {used} MiB in use (want <= {limit_mib}) after {timeout_s:.0f} s")
        time.sleep(poll_s)
