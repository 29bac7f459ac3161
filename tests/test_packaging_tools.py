"""Fast tests of the packaging helpers (the slow end-to-end build is tests/test_packaging.py).

* tools/check_wheel.py catches what a bad wheel looks like: SOVERSION copies, a library
  twice, sources, a missing licence, a wheel over the size limit;
* scripts/make_index.py writes a PEP 503 layout pip can read (sha256 fragments,
  data-requires-python, one index per variant);
* tools/test_wheel.py's own GGUF writer makes a model that this pyllama loads and runs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


check_wheel = _load(ROOT / "tools" / "check_wheel.py", "check_wheel")
make_index = _load(ROOT / "scripts" / "make_index.py", "make_index")
test_wheel = _load(ROOT / "tools" / "test_wheel.py", "test_wheel_smoke")

GOOD = {
    "pyllama/__init__.py": b"",
    "pyllama/_core.cpython-311-x86_64-linux-gnu.so": b"\x7fELF" + b"\0" * 100,
    "pyllama/libllama.so": b"\x7fELF",
    "pyllama/libggml-cpu-haswell.so": b"\x7fELF",
    "pyllama/libggml-cpu-x64.so": b"\x7fELF",
    "pyllama.libs/libgomp-f9a9ad78.so.1.0.0": b"\x7fELF",
    "pyllama-0.1.0.dist-info/licenses/LICENSE-llama.cpp": b"MIT",
    "pyllama-0.1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: pyllama\nVersion: 0.1.0\nRequires-Python: >=3.9\n",
}


def _wheel(tmp_path: Path, files: dict, name="pyllama-0.1.0-cp311-cp311-manylinux_2_28_x86_64.whl") -> Path:
    path = tmp_path / name
    with zipfile.ZipFile(path, "w") as zf:
        for n, data in files.items():
            zf.writestr(n, data)
    return path


def test_check_wheel_accepts_a_good_portable_wheel(tmp_path):
    assert check_wheel.check(_wheel(tmp_path, GOOD), 8, True) == []


@pytest.mark.parametrize("extra, expected", [
    ({"pyllama/libllama.so.0": b"x"}, "SOVERSION"),
    ({"pyllama/libllama.so.0.0.1": b"x"}, "SOVERSION"),
    ({"pyllama/libggml-base.so": b"x", "pyllama/libggml-base.so.0": b"x"}, "twice"),
    ({"pyllama/_core.pyx": b"x"}, "sources"),
    ({"pyllama/vendor/llama.cpp/ggml.c": b"x"}, "sources"),
])
def test_check_wheel_rejects(tmp_path, extra, expected):
    problems = check_wheel.check(_wheel(tmp_path, {**GOOD, **extra}), 8, True)
    assert any(expected in p for p in problems), problems


def test_check_wheel_needs_licence_size_and_variants(tmp_path):
    files = {k: v for k, v in GOOD.items() if "licenses" not in k}
    assert any("licence" in p for p in check_wheel.check(_wheel(tmp_path, files), 8, True))
    big = _wheel(tmp_path, {**GOOD, "pyllama/blob.bin": bytes(range(256)) * 8192})  # 2 MiB, stored
    assert any("limit" in p for p in check_wheel.check(big, 0.5, True))
    no_variants = {k: v for k, v in GOOD.items() if "ggml-cpu" not in k}
    assert any("variant" in p for p in check_wheel.check(_wheel(tmp_path, no_variants), 8, True))
    assert any("non-portable" in p for p in check_wheel.check(_wheel(tmp_path, GOOD), 8, False))


def test_library_stem():
    assert check_wheel.library_stem("pyllama/libggml-base.so.0.9.4") == "libggml-base"
    assert check_wheel.library_stem("pyllama/_core.cpython-311-x86_64-linux-gnu.so") == "_core"
    assert check_wheel.library_stem("pyllama/_core.cp311-win_amd64.pyd") == "_core"
    assert check_wheel.library_stem("pyllama/libllama.0.0.1.dylib") == "libllama"


def test_make_index_pep503_layout(tmp_path):
    cpu, cuda = tmp_path / "cpu", tmp_path / "cuda"
    cpu.mkdir()
    cuda.mkdir()
    w = _wheel(cpu, GOOD)
    _wheel(cuda, GOOD, name="pyllama-0.1.0+cu124-cp311-cp311-manylinux_2_28_x86_64.whl")
    out = tmp_path / "index"
    assert make_index.main(["--out", str(out), f"cpu={cpu}", f"cu124={cuda}"]) == 0

    root = (out / "index.html").read_text()
    assert '<a href="pyllama/">pyllama</a>' in root
    page = (out / "pyllama" / "index.html").read_text()
    digest = hashlib.sha256(w.read_bytes()).hexdigest()
    assert f'href="{w.name}#sha256={digest}"' in page
    assert 'data-requires-python="&gt;=3.9"' in page
    assert (out / "pyllama" / w.name).read_bytes() == w.read_bytes()
    cu_page = (out / "cu124" / "pyllama" / "index.html").read_text()
    assert re.search(r'href="pyllama-0\.1\.0%2Bcu124|href="pyllama-0\.1\.0\+cu124', cu_page)
    assert (out / "cu124" / "index.html").exists()
    assert "cu124" in (out / "variants.html").read_text()


def test_make_index_rejects_bad_variant(tmp_path):
    with pytest.raises(SystemExit):
        make_index.main(["--out", str(tmp_path / "i"), "CPU"])


def test_smoke_test_model_runs_here(tmp_path):
    """The GGUF the wheel smoke test writes by hand loads and generates with this pyllama."""
    import pyllama

    path = test_wheel.write_tiny_llama(tmp_path / "tiny.gguf")
    llm = pyllama.LLM(str(path), n_ctx=128, n_threads=2, seed=0)
    try:
        a = llm.invoke("hello world", max_tokens=6, temperature=0.0)
        b = llm.invoke("hello world", max_tokens=6, temperature=0.0)
    finally:
        llm.close()
    assert a and a == b


def test_backends_report_library_and_variant():
    """backends() entries carry "library"; a CPU variant appears only for portable builds."""
    import pyllama

    entries = pyllama.backends()
    assert entries and all("library" in b for b in entries)
    cpu = next(b for b in entries if b["name"] == "CPU")
    info = pyllama.system_info()
    if pyllama.build_info()["portable"]:
        assert cpu["variant"] and f"CPU_VARIANT = {cpu['variant']}" in info
    else:
        assert "variant" not in cpu and "CPU_VARIANT" not in info
