"""GGUF models from the Hugging Face Hub, picked the way llama.cpp's ``-hf user/repo[:QUANT]``
picks them (vendor/llama.cpp/common/download.cpp: find_best_model, find_best_sibling,
get_split_files).

:func:`pull_from_hub` (``pyllama run/serve/pull -hf user/repo[:QUANT]``, llama.cpp's choice of
file) and :func:`fetch_from_hub` (``LLM.from_pretrained``, a glob as llama-cpp-python takes)
download with ``huggingface_hub`` (the optional ``hf`` extra, imported only when a download
function is called) into its own cache, so a model pulled here is shared with transformers,
llama-cpp-python and ``hf download``.  The environment is read at call time: HF_ENDPOINT,
HF_HOME / HF_HUB_CACHE, HF_TOKEN, HF_HUB_OFFLINE.

Every name here is also importable from :mod:`pyllama.models`, where it lived first.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from pyllama.models import ModelFetchError, PathLike, _stderr_is_tty

__all__ = [
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
    cache_dir: PathLike | None = None,
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
    cache_dir: PathLike | None = None,
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


def pretrained_files(repo_id: str, filename: str | None, additional_files: Iterable[str] | None, *,
                     mmproj: bool, revision: str | None, cache_dir: PathLike | None, local_dir: PathLike | None,
                     token: str | bool | None, progress: bool | None) -> tuple[Path, Path | None]:
    """LLM.from_pretrained's downloads: ``(model path, projector path or None)``.  `filename`
    None picks the file as ``pyllama run -hf`` does; `mmproj` fetches the repository's
    projector too."""
    hub_args: dict = {"revision": revision, "cache_dir": cache_dir, "local_dir": local_dir, "token": token,
                      "progress": progress}
    if filename is None:
        pulled = pull_from_hub(repo_id, mmproj=mmproj, **hub_args)
        if additional_files:
            fetch_from_hub(pulled.repo_id, pulled.filename, additional_files=list(additional_files), **hub_args)
        return pulled.path, pulled.mmproj_path
    path = fetch_from_hub(repo_id, filename, additional_files=list(additional_files or ()), **hub_args)
    projector = None
    if mmproj:
        files = list_hub_files(repo_id, revision=revision, cache_dir=cache_dir, token=token)
        chosen = select_hf_mmproj(files, select_hf_glob(files, filename))
        if chosen is not None:
            projector = download_hub_files(repo_id, [chosen], **hub_args)[0]
    return path, projector
