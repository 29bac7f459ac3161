"""Images and audio in prompts: the Python side of llama.cpp's mtmd support.

The projector, the decoded media and the tokenized prompt live in ``pyllama._core``
(:class:`~pyllama._core.Multimodal`, :class:`~pyllama._core.Bitmap`,
:class:`~pyllama._core.MediaPrompt`).  This module is what sits between them and users:

* :func:`sniff_media` reads a file's header before anything decodes it: the format, and an
  image's size, so a truncated file, an unknown format or a 100000 x 100000 "decompression
  bomb" is a :class:`~pyllama.errors.MediaError` instead of a crash or a 30 GB allocation;
* :func:`media_bytes` turns what an OpenAI content part carries (a ``data:`` URL, a
  ``file://`` URL or a local path) into bytes, and refuses remote ``http(s)`` URLs: the library
  makes no network requests of its own;
* :func:`split_media` takes the image and audio parts out of a conversation, leaving the
  media marker where each was, so the model's chat template renders the text around it;
* :func:`chat_media_prompt` renders and tokenizes such a conversation for ``LLM.chat``.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import secrets
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple

from pyllama._media import MediaInfo, sniff_media
from pyllama.errors import MediaError

__all__ = ["MediaInfo", "sniff_media", "media_bytes", "split_media", "chat_media_prompt", "has_media"]

# Content-part types that carry media (OpenAI's, plus the plain forms other clients send).
IMAGE_PART_TYPES = ("image_url", "image")
AUDIO_PART_TYPES = ("input_audio", "audio")


def media_bytes(ref: Any, *, allow_files: bool = True, what: str = "image") -> bytes:
    """The bytes behind what a content part carries: ``bytes`` as they are, a
    ``data:<mime>;base64,...`` URL, a ``file://`` URL or a local path (when `allow_files`:
    the server turns this off for its clients).  Remote ``http(s)://`` URLs are refused:
    pyllama makes no network requests; fetch the file yourself and pass its bytes."""
    if isinstance(ref, (bytes, bytearray, memoryview)):
        return bytes(ref)
    path_like = isinstance(ref, os.PathLike)
    if path_like:
        ref = os.fspath(ref)
    if not isinstance(ref, str):
        raise TypeError(f"an {what} must be given as bytes, a data: URL, a file path or a file:// URL, "
                        f"not {type(ref).__name__}")
    # URL schemes are case-insensitive (RFC 3986): DATA:, Data: and data: are one scheme.
    scheme = None if path_like else _url_scheme(ref)
    if scheme == "data":
        header, sep, payload = ref.partition(",")
        if not sep:
            raise MediaError(f"malformed data URL for the {what}: no ',' after the media type")
        if not header.lower().endswith(";base64"):
            raise MediaError(f"the {what}'s data URL must be base64-encoded (data:<type>;base64,...)")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise MediaError(f"the {what}'s data URL is not valid base64: {e}") from None
    if scheme in ("http", "https"):
        raise MediaError(f"remote {what} URLs are not fetched ({ref[:60]}...): pyllama makes no network "
                         "requests; download the file and pass its bytes, a data: URL or a local path")
    if scheme is not None and scheme != "file":
        # Anything URL-like is a URL, never a file name: "ftp://...", "s3:..." and the like.
        raise MediaError(f"unsupported URL scheme {scheme!r} for the {what} ({ref[:60]}): pass bytes, a "
                         "data: URL, a file:// URL or a local path (a file name with a colon: './name:x')")
    if not allow_files:
        raise MediaError(f"the {what} must be a data: URL (base64); file paths and file:// URLs are not "
                         "accepted here")
    path = ref
    if scheme == "file":
        from urllib.parse import unquote, urlparse

        parsed = urlparse(ref)
        if parsed.netloc not in ("", "localhost"):
            raise MediaError(f"file:// URL on another host: {ref[:60]}")
        path = unquote(parsed.path)
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(2, f"{what} file not found", path) from None
    except IsADirectoryError:
        raise MediaError(f"{path} is a directory, not an {what} file") from None


_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*):")


def _url_scheme(ref: str) -> Optional[str]:
    """The lower-cased URL scheme `ref` starts with (RFC 3986: a letter, then letters, digits,
    '+', '-', '.', then ':'), or None for a plain path.  A single letter is a Windows drive
    ("C:\\images\\cat.png"), not a scheme."""
    m = _SCHEME_RE.match(ref)
    if m is None or len(m.group(1)) == 1:
        return None
    return m.group(1).lower()


def _part_media(part: Mapping[str, Any], where: str) -> Tuple[str, Any]:
    """(kind, reference) of a media content part."""
    ptype = part["type"]
    if ptype == "image_url":
        value = part.get("image_url")
        url = value.get("url") if isinstance(value, Mapping) else value
        if url is None:
            raise ValueError(f"{where} is an image_url part without a url")
        return "image", url
    if ptype == "image":
        value = part.get("image", part.get("data", part.get("url")))
        if value is None:
            raise ValueError(f"{where} is an image part without 'image' (bytes, a path or a data URL)")
        return "image", value
    value = part.get("input_audio", part.get("audio"))
    if isinstance(value, Mapping):
        data = value.get("data")
        if not isinstance(data, str):
            raise ValueError(f"{where}: input_audio needs 'data' (base64) and 'format' ('wav' or 'mp3')")
        fmt = str(value.get("format", "wav"))
        return "audio", f"data:audio/{fmt};base64,{data}"
    if value is None:
        raise ValueError(f"{where} is an audio part without 'input_audio'")
    return "audio", value


def has_media(messages: Sequence[Mapping[str, Any]]) -> bool:
    """Whether any message has an image or audio content part."""
    for m in messages:
        content = m.get("content") if isinstance(m, Mapping) else None
        if isinstance(content, (list, tuple)):
            for part in content:
                if isinstance(part, Mapping) and part.get("type") in IMAGE_PART_TYPES + AUDIO_PART_TYPES:
                    return True
    return False


def split_media(messages: Sequence[Mapping[str, Any]], marker: str, load: Callable[[str, Any], Any]) -> Tuple[list, list]:
    """(messages, media): each image/audio part replaced by a text part holding `marker`,
    and ``load(kind, reference)`` of each, in order (the order the template renders them,
    since templates render messages in order)."""
    out: List[dict] = []
    media: List[Any] = []
    for i, m in enumerate(messages):
        content = m.get("content")
        if not isinstance(content, (list, tuple)):
            out.append(dict(m))
            continue
        parts = []
        for j, part in enumerate(content):
            if isinstance(part, Mapping) and part.get("type") in IMAGE_PART_TYPES + AUDIO_PART_TYPES:
                kind, ref = _part_media(part, f"messages[{i}]['content'][{j}]")
                media.append(load(kind, ref))
                parts.append({"type": "text", "text": marker})
            else:
                parts.append(part)
        new = dict(m)
        new["content"] = parts
        out.append(new)
    return out, media


def chat_media_prompt(formatter: Any, vocab: Any, multimodal: Any, messages: Sequence[Mapping[str, Any]], *,
                      allow_files: bool = True, add_generation_prompt: bool = True,
                      allow_special_in_messages: bool = False, tools: Optional[list] = None,
                      **kwargs: Any) -> Any:
    """A conversation with image/audio parts, rendered with the chat template and tokenized
    by mtmd: a :class:`~pyllama._core.MediaPrompt`.  Text from the messages that spells a
    control token stays text (as ``render_tokens`` does it), the template's markup is special."""
    # Our own marker, unique per call: text in the messages cannot collide with it (mtmd's
    # default marker is only for Multimodal.tokenize; tokenize_parts takes the media directly).
    marker = f"<__pyllama_media_{secrets.token_hex(8)}__>"

    def load(kind: str, ref: Any) -> Any:
        if type(ref).__name__ == "Bitmap":
            return ref
        data = media_bytes(ref, allow_files=allow_files, what=kind)
        return multimodal.load(data)

    plain, media = split_media(messages, marker, load)
    parts, add_special = formatter.render_parts(plain, vocab, add_generation_prompt=add_generation_prompt,
                                                tools=tools, allow_special_in_messages=allow_special_in_messages,
                                                **kwargs)
    pieces: List[Any] = []
    used = 0
    for text, special in parts:
        segments = text.split(marker)
        for k, seg in enumerate(segments):
            if seg:
                pieces.append((seg, special))
            if k < len(segments) - 1:
                if used >= len(media):
                    raise MediaError("the chat template rendered an image/audio clip more than once")
                pieces.append(media[used])
                used += 1
    if used != len(media):
        raise MediaError(f"the chat template rendered {used} of the {len(media)} images/audio clips in the "
                         "messages (it drops some content parts): use a template that renders every part")
    return multimodal.tokenize_parts(pieces, add_special=add_special)
