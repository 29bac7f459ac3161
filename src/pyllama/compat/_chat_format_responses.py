"""Text completion -> chat completion, in llama-cpp-python's shapes: the chat completion dict,
its stream of chunks, the chat ``logprobs`` block, and a completion constrained to one tool's
arguments as a tool call (whole or streamed).  Used by the chat completion handlers
(``_chat_format_handlers.py``).

Re-exported by :mod:`pyllama.compat.llama_chat_format`, their public home.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, Mapping, Optional


def _convert_text_completion_logprobs_to_chat(logprobs: Optional[Mapping[str, Any]]) -> Optional[Dict[str, Any]]:
    if logprobs is None:
        return None
    return {
        "content": [
            {
                "token": token,
                "bytes": None,
                "logprob": logprob,
                "top_logprobs": [
                    {"token": top_token, "logprob": top_logprob, "bytes": None}
                    for top_token, top_logprob in (top_logprobs or {}).items()
                ],
            }
            for token, logprob, top_logprobs in zip(
                logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"]
            )
        ],
        "refusal": None,
    }


def _convert_text_completion_to_chat(completion: Mapping[str, Any]) -> Dict[str, Any]:
    choice = completion["choices"][0]
    return {
        "id": "chat" + completion["id"],
        "object": "chat.completion",
        "created": completion["created"],
        "model": completion["model"],
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": choice["text"]},
                "logprobs": _convert_text_completion_logprobs_to_chat(choice["logprobs"]),
                "finish_reason": choice["finish_reason"],
            }
        ],
        "usage": completion["usage"],
    }


def _convert_text_completion_chunks_to_chat(chunks: Iterator[Mapping[str, Any]]) -> Iterator[Dict[str, Any]]:
    for i, chunk in enumerate(chunks):
        choice = chunk["choices"][0]
        if i == 0:
            yield {
                "id": "chat" + chunk["id"],
                "model": chunk["model"],
                "created": chunk["created"],
                "object": "chat.completion.chunk",
                "choices": [
                    {"index": 0, "delta": {"role": "assistant"}, "logprobs": None, "finish_reason": None}
                ],
            }
        yield {
            "id": "chat" + chunk["id"],
            "model": chunk["model"],
            "created": chunk["created"],
            "object": "chat.completion.chunk",
            "choices": [
                {
                    "index": 0,
                    "delta": {"content": choice["text"]} if choice["finish_reason"] is None else {},
                    "logprobs": _convert_text_completion_logprobs_to_chat(choice["logprobs"]),
                    "finish_reason": choice["finish_reason"],
                }
            ],
        }


def _convert_completion_to_chat(completion_or_chunks: Any, stream: bool = False) -> Any:
    if stream:
        return _convert_text_completion_chunks_to_chat(completion_or_chunks)
    return _convert_text_completion_to_chat(completion_or_chunks)


def _tool_call_delta(tool_name: str, tool_id: str, arguments: str) -> Dict[str, Any]:
    return {
        "role": None,
        "content": None,
        "function_call": {"name": tool_name, "arguments": arguments},
        "tool_calls": [
            {"index": 0, "id": tool_id, "type": "function", "function": {"name": tool_name, "arguments": arguments}}
        ],
    }


def _convert_completion_to_chat_function(tool_name: str, completion_or_chunks: Any, stream: bool) -> Any:
    """A completion constrained to one tool's arguments, as llama-cpp-python's tool-call shapes."""
    if not stream:
        completion = completion_or_chunks
        tool_id = "call_" + "_0_" + tool_name + "_" + completion["id"]
        arguments = completion["choices"][0]["text"]
        return {
            "id": "chat" + completion["id"],
            "object": "chat.completion",
            "created": completion["created"],
            "model": completion["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": None,
                        "function_call": {"name": tool_name, "arguments": arguments},
                        "tool_calls": [
                            {"id": tool_id, "type": "function", "function": {"name": tool_name, "arguments": arguments}}
                        ],
                    },
                    "logprobs": _convert_text_completion_logprobs_to_chat(completion["choices"][0]["logprobs"]),
                    "finish_reason": "tool_calls",
                }
            ],
            "usage": completion["usage"],
        }

    def stream_tool_call(chunks: Iterator[Mapping[str, Any]]) -> Iterator[Dict[str, Any]]:
        first: Optional[Mapping[str, Any]] = None
        tool_id = ""
        for chunk in chunks:
            choice = chunk["choices"][0]
            if first is None:
                first = chunk
                tool_id = "call_" + "_0_" + tool_name + "_" + chunk["id"]
                yield {
                    "id": "chat" + chunk["id"],
                    "object": "chat.completion.chunk",
                    "created": chunk["created"],
                    "model": chunk["model"],
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": None,
                            "logprobs": None,
                            "delta": {"role": "assistant", "content": None, "function_call": None, "tool_calls": None},
                        }
                    ],
                }
            yield {
                "id": "chat" + chunk["id"],
                "object": "chat.completion.chunk",
                "created": chunk["created"],
                "model": chunk["model"],
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": None,
                        "logprobs": _convert_text_completion_logprobs_to_chat(choice["logprobs"]),
                        "delta": _tool_call_delta(tool_name, tool_id, choice["text"]),
                    }
                ],
            }
        if first is not None:
            yield {
                "id": "chat" + first["id"],
                "object": "chat.completion.chunk",
                "created": first["created"],
                "model": first["model"],
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "tool_calls",
                        "logprobs": None,
                        "delta": {"role": None, "content": None, "function_call": None, "tool_calls": None},
                    }
                ],
            }

    return stream_tool_call(completion_or_chunks)
