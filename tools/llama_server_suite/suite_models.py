"""The models of llama-server's test suite, mapped onto the models this project has offline.

llama-server's suite (vendor/llama.cpp/tools/server/tests) names its models by Hugging Face
repository and file (``--hf-repo ggml-org/models --hf-file tinyllamas/stories260K.gguf``) and
downloads them.  No hub is reachable here, so each name maps onto a local stand-in:

=======================================================  =============================================
the suite's model                                        stand-in
=======================================================  =============================================
stories260K (tinyllama2 preset), stories15M (split,       SmolLM2-135M-Instruct Q4_1 (llama architecture,
MoE, draft), the infill model                             a chat template, FIM tokens)
tinygemma3 (tinygemma3 preset)                           Gemma 3 270M Q4_K_M (text only: no projector)
bert-bge-small (embeddings)                              a tiny random BERT (tests/tiny_bert.py), CLS pooling
jina-reranker-v1-tiny-en (rerank)                        a tiny random BERT reranker (rank pooling)
=======================================================  =============================================

The real models come from pyllama's model cache (``python scripts/fetch_models.py smollm2
gemma3``); the tiny BERTs are generated on first use into ``<pyllama cache>/llama_server_suite``.
Tests that check what a specific model writes ("(going|bed)+" from stories260K) fail on both
servers under this mapping; the suite's runner compares the two servers, not the absolute count.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[2]

#: (repo without ":QUANT", file or None) -> stand-in name.  A repo alone (file None) matches
#: any file of it.
HF_MODELS = {
    ("ggml-org/models", "tinyllamas/stories260K.gguf"): "smollm2",
    ("ggml-org/test-model-stories260K", None): "smollm2",
    ("ggml-org/models", "tinyllamas/split/stories15M-q8_0-00001-of-00003.gguf"): "smollm2",
    ("ggml-org/stories15M_MOE", "stories15M_MOE-F16.gguf"): "smollm2",
    ("ggml-org/test-model-stories260K-infill", None): "smollm2",
    ("ggml-org/tinygemma3-GGUF", None): "gemma3",
    ("ggml-org/models", "bert-bge-small/ggml-model-f16.gguf"): "tiny-bert",
    ("ggml-org/models", "jina-reranker-v1-tiny-en/ggml-model-f16.gguf"): "tiny-reranker",
}

#: Files the tests download themselves (utils.download_file) -> stand-in name.
URL_MODELS = {
    "https://huggingface.co/ggml-org/tiny-llamas/resolve/main/stories15M-q4_0.gguf": "smollm2",
}


class UnknownModel(LookupError):
    """A model of the suite that has no local stand-in (a real 7B model of the slow tests ...)."""


def suite_cache() -> Path:
    """Where the generated stand-ins live: <pyllama cache>/llama_server_suite."""
    env = os.environ.get("PYLLAMA_CACHE")
    if env:
        base = Path(env).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "pyllama"
    return base / "llama_server_suite"


def stand_in_for(repo: str, hf_file: Optional[str]) -> str:
    """The stand-in name of a suite model given as ``--hf-repo REPO[:QUANT] [--hf-file FILE]``."""
    bare = repo.split(":", 1)[0]
    for key in ((bare, hf_file), (bare, None)):
        if key in HF_MODELS:
            return HF_MODELS[key]
    raise UnknownModel(f"no local stand-in for --hf-repo {repo}" + (f" --hf-file {hf_file}" if hf_file else ""))


def stand_in_path(name: str) -> Path:
    """The file of a stand-in: a cached real model (fetched if missing, as scripts/fetch_models.py
    does), or a tiny BERT generated once."""
    if name in ("smollm2", "gemma3"):
        from pyllama import models

        path = models.model_path(name)
        if not path.exists():
            path = Path(models.fetch_model(name, progress=False))
        return path
    cache = suite_cache()
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{name}.gguf"
    if not path.exists():
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_bert import make_tiny_bert, make_tiny_reranker

        if name == "tiny-bert":
            make_tiny_bert(path)
        elif name == "tiny-reranker":
            make_tiny_reranker(path)
        else:
            raise UnknownModel(f"unknown stand-in {name!r}")
    return path
