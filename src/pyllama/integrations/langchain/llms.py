"""LlamaCpp (alias PyLlama): a GGUF model through pyllama as a LangChain ``LLM``."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Dict, Iterator, List, Mapping, Optional, Tuple

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models.llms import LLM
from langchain_core.outputs import Generation, GenerationChunk, LLMResult

from pyllama.integrations.langchain._common import _athread_iter, _info, _LlamaCppCommon

__all__ = ["LlamaCpp", "PyLlama"]


class LlamaCpp(_LlamaCppCommon, LLM):
    """A GGUF model through pyllama, as a LangChain LLM.

    Accepts every field of langchain-community's ``LlamaCpp`` (``callback_manager`` too, moved
    into ``callbacks`` with a DeprecationWarning)::

        from pyllama.integrations.langchain import LlamaCpp
        llm = LlamaCpp(model_path="model.gguf", temperature=0.75, max_tokens=256)
        llm.invoke("Tell me a joke")

    ``batch()`` runs all prompts in one batched generation; ``ainvoke``/``astream`` run the
    generation in a worker thread and never block the event loop.
    """

    @property
    def _llm_type(self) -> str:
        return "pyllama"

    # -- sync --------------------------------------------------------------------------------

    def _pieces(self, prompt: str, params: Dict[str, Any], extra: Dict[str, Any],
                info: Dict[str, Any]) -> Iterator[str]:
        """The text of one completion, piece by piece (echo and suffix included); fills `info`."""
        if extra["echo"]:
            yield prompt
        stream = self.client.stream(prompt, **params)
        try:
            for piece in stream:
                yield piece
        finally:
            stream.close()
        if stream.completion is not None:
            info.update(_info(stream.completion))
        if extra["suffix"]:
            yield extra["suffix"]

    def _stream(self, prompt: str, stop: Optional[List[str]] = None,
                run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> Iterator[GenerationChunk]:
        params, extra = self._call_params(stop, kwargs)
        for piece in self._pieces(prompt, params, extra, {}):
            chunk = GenerationChunk(text=piece)
            if run_manager is not None:
                run_manager.on_llm_new_token(piece, chunk=chunk)
            yield chunk

    def _complete(self, prompt: str, stop: Optional[List[str]], run_manager: Optional[CallbackManagerForLLMRun],
                  kwargs: Mapping[str, Any]) -> Tuple[str, Dict[str, Any]]:
        params, extra = self._call_params(stop, kwargs)
        info: Dict[str, Any] = {}
        if self.streaming:
            parts = []
            for piece in self._pieces(prompt, params, extra, info):
                if run_manager is not None:
                    run_manager.on_llm_new_token(piece, chunk=GenerationChunk(text=piece))
                parts.append(piece)
            return "".join(parts), info
        comp = self.client.complete(prompt, **params)
        return _decorate(prompt, comp.text, extra), _info(comp)

    def _call(self, prompt: str, stop: Optional[List[str]] = None,
              run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> str:
        return self._complete(prompt, stop, run_manager, kwargs)[0]

    def _generate(self, prompts: List[str], stop: Optional[List[str]] = None,
                  run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> LLMResult:
        if len(prompts) == 1:
            text, info = self._complete(prompts[0], stop, run_manager, kwargs)
            return LLMResult(generations=[[Generation(text=text, generation_info=info)]],
                             llm_output=self._llm_output([info]))
        params, extra = self._call_params(stop, kwargs)
        comps = self.client.generate(prompts, **params) if prompts else []
        infos = [_info(c) for c in comps]
        gens = [[Generation(text=_decorate(p, c.text, extra), generation_info=i)]
                for p, c, i in zip(prompts, comps, infos)]
        return LLMResult(generations=gens, llm_output=self._llm_output(infos))

    def _llm_output(self, infos: List[Dict[str, Any]]) -> Dict[str, Any]:
        usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        for i in infos:
            for k in usage:
                usage[k] += i.get("usage", {}).get(k, 0)
        return {"token_usage": usage, "model_name": self.model_path}

    # -- async -------------------------------------------------------------------------------

    async def _apieces(self, prompt: str, stop: Optional[List[str]], kwargs: Mapping[str, Any],
                       info: Dict[str, Any]) -> AsyncIterator[str]:
        params, extra = self._call_params(stop, kwargs)
        async for piece in _athread_iter(lambda: self._pieces(prompt, params, extra, info)):
            yield piece

    async def _astream(self, prompt: str, stop: Optional[List[str]] = None,
                       run_manager: Optional[AsyncCallbackManagerForLLMRun] = None,
                       **kwargs: Any) -> AsyncIterator[GenerationChunk]:
        async for piece in self._apieces(prompt, stop, kwargs, {}):
            chunk = GenerationChunk(text=piece)
            if run_manager is not None:
                await run_manager.on_llm_new_token(piece, chunk=chunk)
            yield chunk

    async def _acomplete(self, prompt: str, stop: Optional[List[str]],
                         run_manager: Optional[AsyncCallbackManagerForLLMRun],
                         kwargs: Mapping[str, Any]) -> Tuple[str, Dict[str, Any]]:
        info: Dict[str, Any] = {}
        parts = []
        async for piece in self._apieces(prompt, stop, kwargs, info):
            if self.streaming and run_manager is not None:
                await run_manager.on_llm_new_token(piece, chunk=GenerationChunk(text=piece))
            parts.append(piece)
        return "".join(parts), info

    async def _acall(self, prompt: str, stop: Optional[List[str]] = None,
                     run_manager: Optional[AsyncCallbackManagerForLLMRun] = None, **kwargs: Any) -> str:
        return (await self._acomplete(prompt, stop, run_manager, kwargs))[0]

    async def _agenerate(self, prompts: List[str], stop: Optional[List[str]] = None,
                         run_manager: Optional[AsyncCallbackManagerForLLMRun] = None, **kwargs: Any) -> LLMResult:
        if len(prompts) == 1:
            text, info = await self._acomplete(prompts[0], stop, run_manager, kwargs)
            return LLMResult(generations=[[Generation(text=text, generation_info=info)]],
                             llm_output=self._llm_output([info]))
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, lambda: self._generate(prompts, stop, None, **kwargs))


def _decorate(prompt: str, text: str, extra: Mapping[str, Any]) -> str:
    if extra.get("echo"):
        text = prompt + text
    if extra.get("suffix"):
        text = text + extra["suffix"]
    return text


#: The same class under pyllama's own name.
PyLlama = LlamaCpp
