"""What a media file declares in its header: format and image size (sniff_media).

A leaf module (it imports nothing of pyllama but errors) so that the extension's
``Multimodal.load`` can check a file before mtmd decodes it without importing the layers
above the extension.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Tuple

from pyllama.errors import MediaError

__all__ = ["MediaInfo", "sniff_media"]


@dataclass(frozen=True)
class MediaInfo:
    """What a file's header says: ``kind`` ("image" or "audio"), ``format`` ("png",
    "jpeg", "gif", "bmp", "wav", "mp3", "flac") and, for images, the size in pixels."""

    kind: str
    format: str
    width: int = 0
    height: int = 0


def sniff_media(data: bytes) -> MediaInfo:
    """The format and (images) the size a file declares; MediaError for data that is none
    of the formats llama.cpp's mtmd decodes here (PNG, JPEG, GIF, BMP images; WAV, MP3, FLAC
    audio), for a file cut short (stb_image would decode what is there and fill the rest
    with grey), and for a 0-pixel image.  Only the header and the end are read."""
    head = bytes(data[:1 << 16])
    n = len(data)
    if n == 0:
        raise MediaError("the image/audio data is empty")
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        if len(head) < 24 or head[12:16] != b"IHDR":
            raise MediaError("truncated PNG: no image header")
        w, h = struct.unpack(">II", head[16:24])
        info = _image("png", w, h)
        if b"IEND" not in bytes(data[-64:]):
            raise MediaError("truncated PNG: the file ends before its IEND chunk")
        return info
    if head.startswith(b"\xff\xd8"):
        info = _image("jpeg", *_jpeg_size(head))
        # Entropy-coded data never holds FF D9 (an FF there is stuffed as FF 00): a file
        # without an end-of-image marker was cut short.
        if bytes(data).rfind(b"\xff\xd9") < 4:
            raise MediaError("truncated JPEG: the file ends before its end-of-image marker")
        return info
    if head[:6] in (b"GIF87a", b"GIF89a"):
        if len(head) < 10:
            raise MediaError("truncated GIF: no screen descriptor")
        w, h = struct.unpack("<HH", head[6:10])
        info = _image("gif", w, h)
        if b";" not in bytes(data[-16:]):
            raise MediaError("truncated GIF: the file ends before its trailer")
        return info
    if head.startswith(b"BM"):
        if len(head) < 26:
            raise MediaError("truncated BMP: no image header")
        file_size = struct.unpack("<I", head[2:6])[0]
        header_size = struct.unpack("<I", head[14:18])[0]
        if header_size == 12:      # OS/2 BITMAPCOREHEADER: 16-bit sizes
            w, h = struct.unpack("<HH", head[18:22])
        else:
            w, h = struct.unpack("<ii", head[18:26])
        info = _image("bmp", abs(w), abs(h))
        if file_size and n < file_size:
            raise MediaError(f"truncated BMP: {n} of the {file_size} bytes its header declares")
        return info
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return MediaInfo("audio", "wav")
    if head[:4] == b"fLaC":
        return MediaInfo("audio", "flac")
    if head[:3] == b"ID3" or (len(head) >= 2 and head[0] == 0xFF and (head[1] & 0xE0) == 0xE0):
        return MediaInfo("audio", "mp3")
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        raise MediaError("WebP images are not supported (llama.cpp decodes them through ffmpeg, which "
                         "pyllama leaves out): convert the image to PNG or JPEG")
    raise MediaError(f"not an image or audio format pyllama can decode (starts with {head[:8]!r}); "
                     "use PNG, JPEG, GIF or BMP images, WAV, MP3 or FLAC audio")


def _image(fmt: str, width: int, height: int) -> MediaInfo:
    if width <= 0 or height <= 0:
        raise MediaError(f"the {fmt} image declares a size of {width}x{height} pixels")
    return MediaInfo("image", fmt, width, height)


def _jpeg_size(head: bytes) -> Tuple[int, int]:
    """Walk the JPEG's marker segments to the first start-of-frame (SOF0..SOF15 except
    DHT, JPG and DAC), which holds the size."""
    i = 2
    n = len(head)
    while i + 4 <= n:
        if head[i] != 0xFF:
            raise MediaError("corrupt JPEG: a marker segment does not start with 0xFF")
        marker = head[i + 1]
        if marker == 0xFF:          # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:   # no length
            i += 2
            continue
        if marker == 0xD9:
            break
        length = struct.unpack(">H", head[i + 2:i + 4])[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 9 > n:
                break
            h, w = struct.unpack(">HH", head[i + 5:i + 9])
            return w, h
        if length < 2:
            raise MediaError("corrupt JPEG: a segment length below 2")
        i += 2 + length
    raise MediaError("truncated or corrupt JPEG: no frame header with the image size")
