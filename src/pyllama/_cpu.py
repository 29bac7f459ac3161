"""How many threads to compute on: physical cores, CPU affinity and cgroup CPU quotas.

Pure Python with no pyllama imports (a leaf below the extension, which asks it for its
default thread count), so it is tested without a build.
"""

from __future__ import annotations

import os

# Where the cgroup file system is mounted; module-level names so tests can point them at a fake tree.
CGROUP_ROOT = "/sys/fs/cgroup"
SELF_CGROUP = "/proc/self/cgroup"


def physical_cores() -> int:
    """Physical cores: hyper-threads slow llama.cpp's matmuls down rather than up."""
    try:
        cores = set()
        phys = core = None
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("physical id"):
                    phys = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":")[1].strip()
                elif not line.strip():
                    if core is not None:
                        cores.add((phys, core))
                    phys = core = None
        if core is not None:
            cores.add((phys, core))
        if cores:
            return len(cores)
    except OSError:
        pass
    return max(1, os.cpu_count() or 1)


def _cgroup_dirs(root, self_cgroup, controller):
    """The directories of this process's cgroup for `controller` ("" = cgroup v2), innermost
    first, then each parent up to the mount point: a quota anywhere on the path applies."""
    rel = ""
    try:
        with open(self_cgroup) as f:
            for line in f:
                parts = line.rstrip("\n").split(":", 2)
                if len(parts) == 3 and (parts[1] == controller if not controller
                                        else controller in parts[1].split(",")):
                    rel = parts[2].strip("/")
                    break
    except OSError:
        pass
    dirs = []
    while True:
        d = os.path.join(root, rel) if rel else root
        if os.path.isdir(d):
            dirs.append(d)
        if not rel:
            return dirs
        rel = os.path.dirname(rel)


def _read_fields(path):
    with open(path) as f:
        return f.read().split()


def cgroup_cpu_limit(root=None, self_cgroup=None):
    """CPUs this process may use under cgroup CPU quotas (ceil(quota / period), the smallest
    along its cgroup path), or None when no quota applies or none can be read.  Reads cgroup v2
    (cpu.max: "max 100000" or "200000 100000") and v1 (cpu.cfs_quota_us / cpu.cfs_period_us,
    -1 = no quota)."""
    root = CGROUP_ROOT if root is None else os.fspath(root)
    self_cgroup = SELF_CGROUP if self_cgroup is None else os.fspath(self_cgroup)
    limits = []
    for d in _cgroup_dirs(root, self_cgroup, ""):
        try:
            fields = _read_fields(os.path.join(d, "cpu.max"))
            if fields and fields[0] != "max":
                quota, period = int(fields[0]), int(fields[1]) if len(fields) > 1 else 100000
                if quota > 0 and period > 0:
                    limits.append(-(-quota // period))
        except (OSError, ValueError):
            pass
    for mount in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        v1_root = os.path.join(root, mount)
        if not os.path.isdir(v1_root):
            continue
        for d in _cgroup_dirs(v1_root, self_cgroup, "cpu"):
            try:
                quota = int(_read_fields(os.path.join(d, "cpu.cfs_quota_us"))[0])
                period = int(_read_fields(os.path.join(d, "cpu.cfs_period_us"))[0])
                if quota > 0 and period > 0:
                    limits.append(-(-quota // period))
            except (OSError, ValueError, IndexError):
                pass
        break
    return max(1, min(limits)) if limits else None


def default_threads(cgroup_root=None, self_cgroup=None) -> int:
    """Threads to compute on: the physical cores, but no more CPUs than this process may run
    on (sched_getaffinity: taskset, cpusets) nor than its cgroup CPU quota allows (a container
    on a 64-core host limited to 2 CPUs must not start 64 threads that take turns)."""
    n = physical_cores()
    try:
        n = min(n, len(os.sched_getaffinity(0)) or n)
    except (AttributeError, OSError):
        pass
    quota = cgroup_cpu_limit(cgroup_root, self_cgroup)
    if quota is not None:
        n = min(n, quota)
    return max(1, n)
