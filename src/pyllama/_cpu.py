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


def usable_cpus(cgroup_root=None, self_cgroup=None) -> int:
    """CPUs this process may run on: its affinity mask, capped by its cgroup CPU quota."""
    try:
        n = len(os.sched_getaffinity(0)) or (os.cpu_count() or 1)
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = cgroup_cpu_limit(cgroup_root, self_cgroup)
    return max(1, min(n, quota) if quota is not None else n)


def default_threads(cgroup_root=None, self_cgroup=None) -> int:
    """Threads to compute on: the physical cores, but no more CPUs than this process may run
    on (sched_getaffinity: taskset, cpusets) nor than its cgroup CPU quota allows (a container
    on a 64-core host limited to 2 CPUs must not start 64 threads that take turns)."""
    return max(1, min(physical_cores(), usable_cpus(cgroup_root, self_cgroup)))


# ---- how libgomp's threads wait at a barrier ---------------------------------------------
# llama.cpp's CPU backend (an OpenMP build) meets at a barrier after each operation of the
# graph: hundreds per token.  libgomp's threads spin up to GOMP_SPINCOUNT times there (300,000 by
# default: milliseconds) before they sleep.  When another process wants the same cores, a
# spinning thread keeps the CPU from the very thread it waits for: on 2 cores beside a parallel
# build and a test run, a SmolLM2 token took 3 s instead of 10 ms (42 ms with a spin of 1,000).
# On a small machine a short spin keeps the quiet speed and loses far less when the cores are
# shared (benchmarks/omp_spin_bench.py, BENCHMARKS.md).  On larger machines, where models are
# larger and threads many, a short spin could make threads sleep inside long operations; that
# is unmeasured, so libgomp's default stays there.  libgomp reads its environment once, when it
# loads (with pyllama._core), so this runs before; a value the user set is kept.

#: GOMP_SPINCOUNT pyllama sets (on machines of at most SHORT_SPIN_MAX_CPUS usable CPUs) when the
#: user has set neither it nor OMP_WAIT_POLICY.
GOMP_SPINCOUNT_DEFAULT = 1000
SHORT_SPIN_MAX_CPUS = 4

_gomp_setting: dict = {}


def _libgomp_loaded() -> bool:
    try:
        with open("/proc/self/maps") as f:
            return any("libgomp" in line for line in f)
    except OSError:
        return False


def configure_openmp_wait(environ=None, cpus=None) -> dict:
    """Set GOMP_SPINCOUNT to GOMP_SPINCOUNT_DEFAULT on a machine of at most SHORT_SPIN_MAX_CPUS
    usable CPUs (PYLLAMA_GOMP_SPINCOUNT: a count to use anywhere, or "off"), unless the user set
    GOMP_SPINCOUNT or OMP_WAIT_POLICY, or libgomp is loaded already (it would not read it).
    Returns what was decided and why."""
    env = os.environ if environ is None else environ
    wanted = env.get("PYLLAMA_GOMP_SPINCOUNT", "").strip().lower()
    value = None
    if wanted and wanted != "off":
        try:
            value = int(wanted)
            if value < 0:
                raise ValueError
        except ValueError:
            raise ValueError(f"PYLLAMA_GOMP_SPINCOUNT must be a count >= 0 or 'off', got {wanted!r}") from None
    if "GOMP_SPINCOUNT" in env or "OMP_WAIT_POLICY" in env:
        result = {"spincount": env.get("GOMP_SPINCOUNT"), "wait_policy": env.get("OMP_WAIT_POLICY"),
                  "source": "user"}
    elif wanted == "off":
        result = {"spincount": None, "wait_policy": None, "source": "libgomp default (PYLLAMA_GOMP_SPINCOUNT=off)"}
    elif value is None and (cpus := usable_cpus() if cpus is None else cpus) > SHORT_SPIN_MAX_CPUS:
        result = {"spincount": None, "wait_policy": None,
                  "source": f"libgomp default ({cpus} CPUs; PYLLAMA_GOMP_SPINCOUNT=N sets one)"}
    elif environ is None and _libgomp_loaded():
        result = {"spincount": None, "wait_policy": None, "source": "libgomp default (libgomp was loaded before pyllama)"}
    else:
        value = GOMP_SPINCOUNT_DEFAULT if value is None else value
        env["GOMP_SPINCOUNT"] = str(value)
        result = {"spincount": str(value), "wait_policy": None, "source": "pyllama"}
    if environ is None:
        _gomp_setting.clear()
        _gomp_setting.update(result)
    return result


def forget_openmp_wait_environ() -> None:
    """Once libgomp has loaded (and read GOMP_SPINCOUNT): take pyllama's own value out of
    os.environ again, so that programs this process starts (llama.cpp's tools, other OpenMP
    code) get their usual defaults; a pyllama process started from here sets it for itself."""
    if _gomp_setting.get("source") == "pyllama" and os.environ.get("GOMP_SPINCOUNT") == _gomp_setting["spincount"]:
        del os.environ["GOMP_SPINCOUNT"]


def openmp_wait_setting() -> dict:
    """What configure_openmp_wait decided when pyllama was imported."""
    return dict(_gomp_setting)
