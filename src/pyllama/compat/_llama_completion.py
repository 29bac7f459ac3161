"""Text completions of the compat ``Llama``: llama-cpp-python's sampling arguments and seed rule
turned into pyllama request options, the prompt's tokens (BOS/EOS, fill-in-the-middle), and the
request run on the engine, answered as llama-cpp-python's completion dict or its stream of
chunk dicts (with its ``logprobs`` shape).

:class:`_CompletionMixin` is a base class of :class:`pyllama.compat.llama.Llama`; it uses the
state ``Llama.__init__`` sets (``llm``, ``_vocab``, ``_n_ctx``, ``cache``, ``_seed``, ...).
"""

from __future__ import annotations

import random
import time
import uuid
import warnings
from typing import Any, Dict, Iterator, List, Optional, Union

from pyllama.compat._llama_constants import LLAMA_DEFAULT_SEED
from pyllama.compat._llama_hooks import LogitsProcessorList, StoppingCriteriaList, _Criteria
from pyllama.compat.llama_types import (
    CompletionLogprobs,
    CreateCompletionResponse,
    CreateCompletionStreamResponse,
)


def _finish(reason: Optional[str]) -> Optional[str]:
    if reason in ("eog", "stop"):
        return "stop"
    return reason


def _unsupported(grammar: Any) -> str:
    """GBNF text of a LlamaGrammar (its ``_grammar``), or of a plain string."""
    if isinstance(grammar, str):
        return grammar
    text = getattr(grammar, "_grammar", None)
    if not isinstance(text, str):
        raise TypeError(f"grammar must be a LlamaGrammar (or GBNF text), got {type(grammar).__name__}")
    return text


class _CompletionMixin:
    """``create_completion`` / ``__call__`` and the request building under them."""

    # ---- building calls -----------------------------------------------------------------

    def _next_seed(self, seed: Optional[int]) -> int:
        """llama-cpp-python's seed rule: the given one, else one drawn from the last."""
        with self._seed_lock:
            if seed is not None:
                self._seed = seed
            else:
                self._seed = random.Random(self._seed).randint(0, 2**32)
            s = self._seed
        if s == -1 or s == LLAMA_DEFAULT_SEED:
            return -1
        return int(s) & 0xFFFFFFFF

    def _sampling(self, *, temperature: float, top_p: float, top_k: int, min_p: float, typical_p: float,
                  repeat_penalty: float, frequency_penalty: float, presence_penalty: float, mirostat_mode: int,
                  mirostat_tau: float, mirostat_eta: float, seed: Optional[int],
                  logit_bias: Optional[Dict[Any, float]]) -> dict:
        """pyllama sampling overrides equivalent to llama-cpp-python's sampler chain."""
        p: Dict[str, Any] = dict(
            temperature=float(temperature), top_p=float(top_p), top_k=int(top_k), min_p=float(min_p),
            typical_p=float(typical_p), repeat_penalty=float(repeat_penalty),
            frequency_penalty=float(frequency_penalty), presence_penalty=float(presence_penalty),
            mirostat_mode=int(mirostat_mode), mirostat_tau=float(mirostat_tau), mirostat_eta=float(mirostat_eta),
            last_n_tokens_size=self.last_n_tokens_size, seed=self._next_seed(seed),
            # llama-cpp-python's sampler chain only ever accepts the tokens it sampled: its
            # penalties count generated tokens, not the prompt (pyllama's native default does).
            penalize_prompt=False)
        if temperature < 0:
            # llama-cpp-python: a plain draw from the softmax of the logits.
            p.update(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0, mirostat_mode=0)
        elif temperature > 0 and mirostat_mode:
            p["temperature"] = 1.0        # llama-cpp-python's mirostat has no temperature stage
        if p["top_p"] <= 0.0:           # llama.cpp keeps one token (min_keep) at p = 0
            p.update(top_p=1.0, top_k=1)
        if p["typical_p"] <= 0.0:
            p.update(typical_p=1.0, top_k=1)
        if p["top_k"] < 0:
            p["top_k"] = 0
        if logit_bias:
            p["logit_bias"] = {int(k): float(v) for k, v in logit_bias.items()}
        return p

    def _completion_tokens_of(self, prompt: Union[str, List[int]], suffix: Optional[str]) -> tuple:
        """(prompt tokens, suffix text to append) as llama-cpp-python builds them."""
        vocab = self._vocab
        if not isinstance(prompt, str):
            if suffix is None:
                return [int(t) for t in prompt], None
            body = [int(t) for t in prompt]
        else:
            body = self.tokenize(prompt.encode("utf-8"), add_bos=False, special=suffix is None) if prompt else []
        bos = [vocab.bos] if vocab.add_bos and vocab.bos != -1 else []
        eos: List[int] = []
        if vocab.add_eos or vocab.sep != -1:
            eos = [vocab.sep if vocab.sep != -1 else vocab.eos]
        if suffix is None:
            return bos + body + eos, None
        if vocab.fim_pre >= 0 and vocab.fim_suf >= 0 and vocab.fim_mid >= 0:
            suf = self.tokenize(suffix.encode("utf-8"), add_bos=False, special=False) if suffix else []
            pre = [vocab.fim_pre] + body
            mid = [vocab.fim_suf] + suf
            parts = (mid + pre) if self.spm_infill else (pre + mid)
            return bos + parts + [vocab.fim_mid], None
        return bos + body + eos, suffix

    def _hooks(self, logits_processor: Any, stopping_criteria: Any) -> tuple:
        procs = list(logits_processor) if logits_processor is not None else None
        crit = _Criteria(stopping_criteria) if stopping_criteria is not None else None
        return procs or None, crit

    # ---- completions --------------------------------------------------------------------

    def _create_completion(
        self,
        prompt: Union[str, List[int]],
        suffix: Optional[str] = None,
        max_tokens: Optional[int] = 16,
        temperature: float = 0.8,
        top_p: float = 0.95,
        min_p: float = 0.05,
        typical_p: float = 1.0,
        logprobs: Optional[int] = None,
        echo: bool = False,
        stop: Optional[Union[str, List[str]]] = [],
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        repeat_penalty: float = 1.0,
        top_k: int = 40,
        stream: bool = False,
        seed: Optional[int] = None,
        tfs_z: float = 1.0,
        mirostat_mode: int = 0,
        mirostat_tau: float = 5.0,
        mirostat_eta: float = 0.1,
        model: Optional[str] = None,
        stopping_criteria: Optional[Any] = None,
        logits_processor: Optional[Any] = None,
        grammar: Optional[Any] = None,
        logit_bias: Optional[Dict[int, float]] = None,
        *,
        _json_schema: Any = None,
        _media: Any = None,
    ) -> Iterator[Any]:
        """A generator: the completion dict (stream=False) or its chunks (stream=True)."""
        del tfs_z   # llama.cpp has no tail-free sampling any more
        completion_id = f"cmpl-{uuid.uuid4()}"
        created = int(time.time())
        model_name = model if model is not None else self.model_path
        if _media is not None:
            prompt_tokens: Any = _media
            n_prompt = len(_media)
            extra_suffix = None
        else:
            prompt_tokens, extra_suffix = self._completion_tokens_of(prompt, suffix)
            if not prompt_tokens:
                prompt_tokens = [self._vocab.bos] if self._vocab.bos != -1 else []
            n_prompt = len(prompt_tokens)
            if prompt_tokens[:2] == [self._vocab.bos] * 2 and self._vocab.bos != -1:
                warnings.warn(f'Detected duplicate leading "{self._vocab.token_text(self._vocab.bos)}" in prompt, '
                              "this will likely reduce response quality, consider removing it...",
                              RuntimeWarning, stacklevel=3)
        if n_prompt >= self._n_ctx:
            raise ValueError(f"Requested tokens ({n_prompt}) exceed context window of {self._n_ctx}")
        if max_tokens is None or max_tokens <= 0:
            max_tokens = self._n_ctx - n_prompt
        max_tokens = min(max_tokens, self._n_ctx - n_prompt)
        stop = stop if isinstance(stop, list) else [stop] if isinstance(stop, str) else []
        stop = [s for s in stop if s]

        if self.cache is not None and _media is None:
            try:
                item = self.cache[prompt_tokens]
                if (self.longest_token_prefix(item.input_ids[: item.n_tokens].tolist(), prompt_tokens)
                        > self.longest_token_prefix(self._input_ids.tolist(), prompt_tokens)):
                    self.load_state(item)
            except KeyError:
                pass

        overrides = self._sampling(
            temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, typical_p=typical_p,
            repeat_penalty=repeat_penalty, frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
            mirostat_mode=mirostat_mode, mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta, seed=seed,
            logit_bias=logit_bias)
        overrides["max_tokens"] = max_tokens
        overrides["stop"] = stop or None
        if grammar is not None:
            overrides["grammar"] = _unsupported(grammar)
        elif _json_schema is not None:
            overrides["json_schema"] = _json_schema
        procs, crit = self._hooks(logits_processor, stopping_criteria)
        lp = None if logprobs is None else int(logprobs)
        want_lp = lp is not None
        prompt_text = prompt if isinstance(prompt, str) else None

        if stream:
            return self._stream_completion(prompt_tokens, n_prompt, prompt_text, completion_id, created, model_name,
                                           overrides, procs, crit, lp)
        return self._whole_completion(prompt_tokens, n_prompt, prompt_text, echo, extra_suffix, completion_id,
                                      created, model_name, overrides, procs, crit, lp, want_lp)

    def _whole_completion(self, prompt_tokens, n_prompt, prompt_text, echo, extra_suffix, completion_id, created,
                          model_name, overrides, procs, crit, lp, want_lp) -> Iterator[Any]:
        media = not isinstance(prompt_tokens, list)
        echo_lp = bool(echo and want_lp and not media)
        comp = self.llm.complete(prompt_tokens, add_special=False, logprobs=True if want_lp else None,
                                 top_logprobs=min(lp, 20) if want_lp else None, echo=echo_lp,
                                 logits_processors=procs, stopping_criteria=[crit] if crit else None, **overrides)
        tokens = list(comp.tokens)
        fired = crit is not None and crit.fired
        if fired and tokens:
            tokens = tokens[:-1]
        text = comp.text
        if echo_lp:
            text = text[len(self.llm.detokenize(prompt_tokens, remove_special=True)):]
        if not media:
            self._remember(list(prompt_tokens) + tokens)
            if self.cache is not None:
                self.cache[list(prompt_tokens) + tokens] = self.save_state()

        text_out = text
        if echo:
            text_out = self._echo_prefix(prompt_tokens, prompt_text) + text
        if extra_suffix is not None:
            text_out = text_out + extra_suffix

        logprobs_dict = None
        if want_lp:
            logprobs_dict = self._logprobs_dict(comp, prompt_tokens, prompt_text, echo and not media, lp,
                                                fired)
        yield {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": model_name,
            "choices": [{"text": text_out, "index": 0, "logprobs": logprobs_dict,
                         "finish_reason": "stop" if fired else _finish(comp.finish_reason)}],
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": len(tokens),
                      "total_tokens": n_prompt + len(tokens)},
        }

    def _echo_prefix(self, prompt_tokens: Any, prompt_text: Optional[str]) -> str:
        if prompt_text is not None:
            return prompt_text
        if not isinstance(prompt_tokens, list):
            return ""
        return self.detokenize(prompt_tokens).decode("utf-8", errors="ignore")

    def _top_dict(self, entry: Any, lp: int) -> Dict[str, float]:
        top = {self._piece(t.id): t.logprob for t in entry.top_logprobs[:lp]}
        top.update({self._piece(entry.id): entry.logprob})
        return top

    def _logprobs_dict(self, comp: Any, prompt_tokens: list, prompt_text: Optional[str], echo: bool, lp: int,
                       fired: bool) -> CompletionLogprobs:
        gen = list(comp.logprobs or [])
        if fired and gen and len(gen) >= len(comp.tokens):
            gen = gen[: max(len(comp.tokens) - 1, 0)]
        bos = self._vocab.bos
        tokens: List[str] = []
        offsets: List[int] = []
        token_lps: List[Optional[float]] = []
        tops: List[Optional[Dict[str, float]]] = []
        if echo:
            skip = 1 if prompt_tokens and prompt_tokens[0] == bos else 0
            shown = prompt_tokens[skip:]
            plp = list(comp.prompt_logprobs or [])[skip:]
            offset = 0
            for i, tok in enumerate(shown):
                s = self._piece(tok)
                tokens.append(s)
                offsets.append(offset)
                offset += len(s)
                if i == 0 or i - 1 >= len(plp):
                    token_lps.append(None)
                    tops.append(None)
                else:
                    e = plp[i - 1]
                    token_lps.append(e.logprob)
                    tops.append(self._top_dict(e, lp))
        else:
            offset = len(prompt_text) if prompt_text is not None else len(prompt_tokens)
        for e in gen:
            if e.id == bos:
                continue
            s = self._piece(e.id)
            tokens.append(s)
            offsets.append(offset)
            offset += len(s)
            token_lps.append(e.logprob)
            tops.append(self._top_dict(e, lp))
        return {"tokens": tokens, "text_offset": offsets, "token_logprobs": token_lps, "top_logprobs": tops}

    def _stream_completion(self, prompt_tokens, n_prompt, prompt_text, completion_id, created, model_name,
                           overrides, procs, crit, lp) -> Iterator[Any]:
        want_lp = lp is not None
        st = self.llm.stream(prompt_tokens, add_special=False, chunks=True, logprobs=True if want_lp else None,
                             top_logprobs=min(lp, 20) if want_lp else None, logits_processors=procs,
                             stopping_criteria=[crit] if crit else None, **overrides)
        offset = len(prompt_text) if prompt_text is not None else n_prompt
        generated: List[int] = []
        try:
            for ch in st:
                generated.extend(ch.token_ids)
                if not ch.text:
                    continue
                lp_dict = None
                if want_lp and ch.logprobs:
                    toks = [self._piece(e.id) for e in ch.logprobs]
                    offs = []
                    for s in toks:
                        offs.append(offset)
                        offset += len(s)
                    lp_dict = {"tokens": toks, "text_offset": offs,
                               "token_logprobs": [e.logprob for e in ch.logprobs],
                               "top_logprobs": [self._top_dict(e, lp) for e in ch.logprobs]}
                yield {
                    "id": completion_id,
                    "object": "text_completion",
                    "created": created,
                    "model": model_name,
                    "choices": [{"text": ch.text, "index": 0, "logprobs": lp_dict, "finish_reason": None}],
                }
            comp = st.completion
        finally:
            st.close()
        fired = crit is not None and crit.fired
        tokens = list(comp.tokens) if comp is not None else generated
        if fired and tokens:
            tokens = tokens[:-1]
        yield {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": model_name,
            "choices": [{"text": "", "index": 0, "logprobs": None,
                         "finish_reason": "stop" if fired else _finish(comp.finish_reason if comp else "stop")}],
        }
        if isinstance(prompt_tokens, list):
            self._remember(list(prompt_tokens) + tokens)
            if self.cache is not None:
                self.cache[list(prompt_tokens) + tokens] = self.save_state()

    def create_completion(
        self,
        prompt: Union[str, List[int]],
        suffix: Optional[str] = None,
        max_tokens: Optional[int] = 16,
        temperature: float = 0.8,
        top_p: float = 0.95,
        min_p: float = 0.05,
        typical_p: float = 1.0,
        logprobs: Optional[int] = None,
        echo: bool = False,
        stop: Optional[Union[str, List[str]]] = [],
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        repeat_penalty: float = 1.0,
        top_k: int = 40,
        stream: bool = False,
        seed: Optional[int] = None,
        tfs_z: float = 1.0,
        mirostat_mode: int = 0,
        mirostat_tau: float = 5.0,
        mirostat_eta: float = 0.1,
        model: Optional[str] = None,
        stopping_criteria: Optional[StoppingCriteriaList] = None,
        logits_processor: Optional[LogitsProcessorList] = None,
        grammar: Optional[Any] = None,
        logit_bias: Optional[Dict[int, float]] = None,
    ) -> Union[CreateCompletionResponse, Iterator[CreateCompletionStreamResponse]]:
        """Generate text from a prompt (text or token ids): llama-cpp-python's completion dict,
        or with ``stream=True`` an iterator of its chunk dicts.  ``max_tokens`` None or <= 0:
        until the context window is full.  ``logprobs=K``: the K most likely tokens at each
        position.  ``grammar``: a LlamaGrammar.  ``logits_processor``/``stopping_criteria``:
        llama-cpp-python's lists of ``f(input_ids, scores)`` callables (run inside pyllama's
        batch, for this call only)."""
        result = self._create_completion(
            prompt=prompt, suffix=suffix, max_tokens=-1 if max_tokens is None else max_tokens,
            temperature=temperature, top_p=top_p, min_p=min_p, typical_p=typical_p, logprobs=logprobs, echo=echo,
            stop=stop, frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
            repeat_penalty=repeat_penalty, top_k=top_k, stream=stream, seed=seed, tfs_z=tfs_z,
            mirostat_mode=mirostat_mode, mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta, model=model,
            stopping_criteria=stopping_criteria, logits_processor=logits_processor, grammar=grammar,
            logit_bias=logit_bias)
        if stream:
            return result
        return next(result)

    def __call__(
        self,
        prompt: str,
        suffix: Optional[str] = None,
        max_tokens: Optional[int] = 16,
        temperature: float = 0.8,
        top_p: float = 0.95,
        min_p: float = 0.05,
        typical_p: float = 1.0,
        logprobs: Optional[int] = None,
        echo: bool = False,
        stop: Optional[Union[str, List[str]]] = [],
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        repeat_penalty: float = 1.0,
        top_k: int = 40,
        stream: bool = False,
        seed: Optional[int] = None,
        tfs_z: float = 1.0,
        mirostat_mode: int = 0,
        mirostat_tau: float = 5.0,
        mirostat_eta: float = 0.1,
        model: Optional[str] = None,
        stopping_criteria: Optional[StoppingCriteriaList] = None,
        logits_processor: Optional[LogitsProcessorList] = None,
        grammar: Optional[Any] = None,
        logit_bias: Optional[Dict[int, float]] = None,
    ) -> Union[CreateCompletionResponse, Iterator[CreateCompletionStreamResponse]]:
        """create_completion()."""
        return self.create_completion(
            prompt=prompt, suffix=suffix, max_tokens=max_tokens, temperature=temperature, top_p=top_p, min_p=min_p,
            typical_p=typical_p, logprobs=logprobs, echo=echo, stop=stop, frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty, repeat_penalty=repeat_penalty, top_k=top_k, stream=stream, seed=seed,
            tfs_z=tfs_z, mirostat_mode=mirostat_mode, mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta,
            model=model, stopping_criteria=stopping_criteria, logits_processor=logits_processor, grammar=grammar,
            logit_bias=logit_bias)
