"""The machine a benchmark ran on, for every benchmark script's report."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def machine_info() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    load = None
    try:
        load = Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": affinity, "mem_gib": mem,
            "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
            "loadavg_at_start": load}


def describe() -> str:
    """One line: CPU, usable cores, load average."""
    m = machine_info()
    load = " ".join(m["loadavg_at_start"] or ["?"])
    return f"{m['cpu']}, {m['usable_cores']} usable cores of {m['cores']}, load average {load}"
