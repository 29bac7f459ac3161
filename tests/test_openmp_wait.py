"""How libgomp's threads wait at llama.cpp's barriers (pyllama._cpu.configure_openmp_wait).

On a busy machine libgomp's default spin (300,000 rounds per barrier) made a token take seconds
instead of milliseconds (benchmarks/omp_spin_bench.py); `import pyllama` sets a shorter
GOMP_SPINCOUNT before the extension loads libgomp, unless the user chose one.  What libgomp
itself read is checked through its own report (OMP_DISPLAY_ENV=verbose), in fresh processes:
libgomp reads its environment once, when it loads."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pyllama import _cpu, build_info


def _libgomp_sees(env_extra: dict, code: str = "import pyllama") -> tuple:
    env = {k: v for k, v in os.environ.items()
           if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "PYLLAMA_GOMP_SPINCOUNT")}
    env.update(env_extra, OMP_DISPLAY_ENV="verbose")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    spin = [line.split("=", 1)[1].strip().strip("'") for line in r.stderr.splitlines()
            if line.strip().startswith("GOMP_SPINCOUNT =")]
    return (spin[0] if spin else None), r.stdout


def _openmp_build() -> bool:
    import pyllama

    return "OPENMP = 1" in pyllama.system_info()


@pytest.mark.skipif(sys.platform != "linux", reason="libgomp (GCC's OpenMP) on Linux")
def test_import_sets_a_short_spin_that_libgomp_reads():
    assert _openmp_build(), f"this build has no OpenMP: {build_info()}"
    small = _cpu.usable_cpus() <= _cpu.SHORT_SPIN_MAX_CPUS
    spin, out = _libgomp_sees({} if small else {"PYLLAMA_GOMP_SPINCOUNT": str(_cpu.GOMP_SPINCOUNT_DEFAULT)},
                              "import pyllama, os; print(os.environ.get('GOMP_SPINCOUNT'))")
    assert spin == str(_cpu.GOMP_SPINCOUNT_DEFAULT)
    assert int(spin) < 300000                       # (libgomp's own default)
    # ...and it is not left in the environment of the programs pyllama's process starts.
    assert out.strip() == "None"


@pytest.mark.parametrize("env, expected", [
    ({"GOMP_SPINCOUNT": "1234"}, "1234"),            # the user's value is kept
    ({"PYLLAMA_GOMP_SPINCOUNT": "off"}, "300000"),   # libgomp's default
    ({"PYLLAMA_GOMP_SPINCOUNT": "500"}, "500"),
])
@pytest.mark.skipif(sys.platform != "linux", reason="libgomp (GCC's OpenMP) on Linux")
def test_the_users_choice_wins(env, expected):
    spin, _ = _libgomp_sees(env)
    assert spin == expected


def test_the_decision_without_a_process():
    env: dict = {}
    assert _cpu.configure_openmp_wait(env, cpus=2)["source"] == "pyllama"
    assert env == {"GOMP_SPINCOUNT": str(_cpu.GOMP_SPINCOUNT_DEFAULT)}
    env = {}                                          # a larger machine: libgomp's default (unmeasured)
    assert "libgomp default (16 CPUs" in _cpu.configure_openmp_wait(env, cpus=16)["source"] and env == {}
    env = {"PYLLAMA_GOMP_SPINCOUNT": "2000"}          # ...unless asked for
    assert _cpu.configure_openmp_wait(env, cpus=16)["spincount"] == "2000" == env["GOMP_SPINCOUNT"]
    env = {"OMP_WAIT_POLICY": "active"}
    assert _cpu.configure_openmp_wait(env, cpus=2) == {"spincount": None, "wait_policy": "active", "source": "user"}
    assert "GOMP_SPINCOUNT" not in env                # an OpenMP wait policy is the user's choice too
    env = {"PYLLAMA_GOMP_SPINCOUNT": "off"}
    assert _cpu.configure_openmp_wait(env, cpus=2)["spincount"] is None and "GOMP_SPINCOUNT" not in env
    for bad in ("-1", "lots", "1e3"):
        with pytest.raises(ValueError, match="PYLLAMA_GOMP_SPINCOUNT"):
            _cpu.configure_openmp_wait({"PYLLAMA_GOMP_SPINCOUNT": bad}, cpus=2)


def test_usable_cpus_follow_affinity_and_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cpu.max").write_text("200000 100000\n")
    me = tmp_path / "self"
    me.write_text("0::/\n")
    assert _cpu.usable_cpus(root, me) == 2
    (root / "cpu.max").write_text("max 100000\n")
    assert _cpu.usable_cpus(root, me) == 6


def test_info_reports_it():
    from pyllama.info import build_summary

    wait = build_summary()["openmp_wait"]
    assert wait["source"] in ("pyllama", "user") or wait["source"].startswith("libgomp default")
    r = subprocess.run([sys.executable, "-m", "pyllama", "info"], capture_output=True, text=True, timeout=120,
                       env={k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")})
    if _cpu.usable_cpus() <= _cpu.SHORT_SPIN_MAX_CPUS:
        assert f"openmp wait:    spincount={_cpu.GOMP_SPINCOUNT_DEFAULT} (pyllama)" in r.stdout, r.stdout
    else:
        assert "openmp wait:    libgomp defaults (libgomp default (" in r.stdout, r.stdout
