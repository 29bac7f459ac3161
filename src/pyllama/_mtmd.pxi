# Images and audio in prompts: llama.cpp's mtmd library (tools/mtmd).
#
#   Multimodal   owns an mtmd_context (a projector, "mmproj", loaded for one Model)
#   Bitmap       owns an mtmd_bitmap: decoded RGB pixels or PCM samples, with an id (SHA-256)
#   MediaPrompt  owns mtmd_input_chunks: a prompt tokenized into text and media chunks
#
# A MediaPrompt flattens into one token list, in which every position of a media chunk holds
# a negative key derived from the media's hash.  The Engine batches the text like any other
# prompt and evaluates each media chunk on its own, into the request's sequence, when the
# request reaches it; the keys make the prompt cache (prefix reuse) and preemption work with
# images as with text: the same image at the same place is the same prefix.

from collections import OrderedDict as _OrderedDict
import hashlib as _hashlib

from pyllama.errors import MediaError

if PYLLAMA_HAS_MTMD:
    # mtmd and clip log through their own hook: into the 'pyllama' logger, like llama.cpp.
    mtmd_helper_log_set(_log_callback, NULL)

# Decoded images above this many pixels are refused before decoding (Pillow's default limit
# against decompression bombs: a 100000 x 100000 header would ask for 30 GB).
DEFAULT_MAX_PIXELS = 89_478_485
# ... and above this much decoder memory (the inflated pixel data stb_image works on plus the
# RGB bitmap it returns), estimated from the header: a 255 KB PNG of 89M black pixels is
# within max_pixels but inflates to 256 MiB, and 16-bit RGBA would take 8 bytes a pixel.
DEFAULT_MAX_IMAGE_BYTES = 256 << 20
# The encode cache holds at most this many bytes of embeddings (one large image of a
# high-resolution projector alone can be hundreds of MB).
DEFAULT_CACHE_BYTES = 256 << 20

_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}   # by colour type: grey, RGB, palette, grey+alpha, RGBA


cdef tuple _image_decode_bytes(const unsigned char[::1] data, object info):
    """(bytes, description): what decoding the image needs, from its header only: the pixel
    data the decoder inflates or decodes into, plus the 8-bit RGB bitmap mtmd keeps."""
    cdef long long w = info.width, h = info.height, px = w * h
    cdef int depth = 8, channels = 3, color
    if info.format == "png" and data.shape[0] >= 26:
        depth = data[24]
        color = data[25]
        channels = _PNG_CHANNELS.get(color, 4)
        if depth not in (1, 2, 4, 8, 16) or color not in _PNG_CHANNELS:
            raise MediaError(f"corrupt PNG: bit depth {depth}, colour type {color}")
        # zlib inflates every row (plus its filter byte); stb_image then expands it to at
        # least 8 bits per channel (16-bit stays 16 bits until converted).
        raw = h * (1 + (w * channels * depth + 7) // 8)
        expanded = px * max(channels, 3 if color == 3 else channels) * (2 if depth == 16 else 1)
        return raw + expanded + px * 3, f"{depth}-bit, {channels} channel(s)"
    if info.format == "gif":
        return px * 9 + px * 3, "GIF: RGBA frame, background and history"   # stb's gif buffers
    # JPEG (up to 4 components) and BMP (up to 32 bits a pixel) decode to at most 4 bytes a pixel.
    return px * 4 + px * 3, "up to 4 bytes a pixel"


def mtmd_available() -> bool:
    """Whether this build has llama.cpp's mtmd library (images/audio); -DPYLLAMA_MTMD=OFF leaves it out."""
    return bool(PYLLAMA_HAS_MTMD)


def media_marker() -> str:
    """The text that stands for one image or audio clip in a prompt given to
    Multimodal.tokenize (mtmd's default marker)."""
    return mtmd_default_marker().decode("utf-8")


cdef object _media_key(str media_id):
    """The negative token-list key of a media chunk: 60 bits of its id's hash."""
    digest = _hashlib.sha256(media_id.encode("utf-8")).digest()
    return -1 - (int.from_bytes(digest[:8], "little") >> 4)


cdef class Bitmap:
    """Decoded media for mtmd: an image (RGB pixels) or an audio clip (PCM float samples).

    Build one with :meth:`Multimodal.load` (PNG/JPEG/BMP/GIF bytes or a WAV/MP3/FLAC clip),
    :meth:`Multimodal.load_file`, :meth:`Bitmap.from_rgb` or :meth:`Bitmap.from_audio`.
    ``id`` is the SHA-256 of the decoded data: equal media have equal ids, and the encode cache
    of a :class:`Multimodal` is keyed by it.
    """
    cdef mtmd_bitmap * ptr
    cdef readonly str id

    def __cinit__(self):
        self.ptr = NULL

    def __init__(self):
        raise TypeError("use Multimodal.load(), Multimodal.load_file(), Bitmap.from_rgb() or Bitmap.from_audio()")

    def __dealloc__(self):
        if self.ptr != NULL:
            mtmd_bitmap_free(self.ptr)
            self.ptr = NULL

    @staticmethod
    cdef Bitmap _wrap(mtmd_bitmap * ptr):
        cdef Bitmap b = Bitmap.__new__(Bitmap)
        b.ptr = ptr
        cdef const char * i = mtmd_bitmap_get_id(ptr)
        b.id = i.decode("utf-8", "replace") if i != NULL and i[0] != 0 else None
        if b.id is None:
            # Our own id: the hash of the decoded data and its shape.
            h = _hashlib.sha256(b"audio" if mtmd_bitmap_is_audio(ptr) else b"image")
            h.update(f"{mtmd_bitmap_get_nx(ptr)}x{mtmd_bitmap_get_ny(ptr)}".encode())
            b.id = h.hexdigest()
            mtmd_bitmap_set_id(ptr, b.id.encode("ascii"))
        return b

    @staticmethod
    def from_rgb(pixels, int width, int height, *, max_pixels=DEFAULT_MAX_PIXELS):
        """An image from raw RGB bytes (or any buffer, e.g. a uint8 numpy array of shape
        (height, width, 3)), row by row, 3 bytes per pixel."""
        _require_mtmd()
        if width < 1 or height < 1:
            raise MediaError(f"an image needs a positive size, got {width}x{height}")
        if max_pixels is not None and <long long>width * height > max_pixels:
            raise MediaError(f"the image is {width}x{height} = {<long long>width * height} pixels, more than "
                             f"max_pixels={max_pixels}")
        cdef const unsigned char[::1] view
        try:
            view = memoryview(pixels).cast("B")
        except TypeError:
            raise TypeError(f"pixels must be bytes or a buffer of uint8, not {type(pixels).__name__}") from None
        if view.shape[0] != <Py_ssize_t>width * height * 3:
            raise MediaError(f"an RGB image of {width}x{height} needs {width * height * 3} bytes, got {view.shape[0]}")
        cdef mtmd_bitmap * ptr = mtmd_bitmap_init(width, height, &view[0])
        if ptr == NULL:
            raise MemoryError("mtmd_bitmap_init failed")
        h = _hashlib.sha256(b"rgb")
        h.update(f"{width}x{height}".encode())
        h.update(view)
        mtmd_bitmap_set_id(ptr, h.hexdigest().encode("ascii"))
        return Bitmap._wrap(ptr)

    @staticmethod
    def from_audio(samples):
        """An audio clip from mono PCM samples (a float32 buffer, e.g. a numpy array) at the
        projector's sample rate (Multimodal.audio_sample_rate)."""
        _require_mtmd()
        cdef const float[::1] view
        try:
            view = memoryview(samples).cast("B").cast("f")
        except (TypeError, ValueError):
            raise TypeError("samples must be a contiguous float32 buffer (e.g. numpy.float32 array)") from None
        if view.shape[0] == 0:
            raise MediaError("the audio clip is empty")
        cdef mtmd_bitmap * ptr = mtmd_bitmap_init_from_audio(view.shape[0], &view[0])
        if ptr == NULL:
            raise MemoryError("mtmd_bitmap_init_from_audio failed")
        h = _hashlib.sha256(b"audio")
        h.update(memoryview(view).cast("B"))
        mtmd_bitmap_set_id(ptr, h.hexdigest().encode("ascii"))
        return Bitmap._wrap(ptr)

    @property
    def is_audio(self) -> bool:
        return mtmd_bitmap_is_audio(self.ptr)

    @property
    def kind(self) -> str:
        """"image" or "audio"."""
        return "audio" if mtmd_bitmap_is_audio(self.ptr) else "image"

    @property
    def width(self) -> int:
        """Pixels (images); the number of samples for audio."""
        return mtmd_bitmap_get_nx(self.ptr)

    @property
    def height(self) -> int:
        return mtmd_bitmap_get_ny(self.ptr)

    @property
    def n_bytes(self) -> int:
        return mtmd_bitmap_get_n_bytes(self.ptr)

    def __repr__(self) -> str:
        if self.is_audio:
            return f"Bitmap(audio, {self.width} samples, id={self.id[:12]})"
        return f"Bitmap(image, {self.width}x{self.height}, id={self.id[:12]})"


cdef int _require_mtmd() except -1:
    if not PYLLAMA_HAS_MTMD:
        raise MediaError("this pyllama was built without llama.cpp's mtmd library (-DPYLLAMA_MTMD=OFF): "
                         "reinstall without that option to use images or audio")
    return 0


@cython.no_gc_clear   # __dealloc__ needs self.model (the weights must outlive mtmd_free)
cdef class Multimodal:
    """A multimodal projector ("mmproj" GGUF file) loaded for a text :class:`Model`: it turns
    images (and, for audio projectors, sound) into embeddings the model reads in place of
    tokens.  Keeps its Model alive.

    Encoded media are cached by their id (at most ``cache_size`` entries and ``cache_bytes``
    bytes of embeddings, least recently used out first), so an image repeated in one prompt or
    across requests is encoded once.  Thread-safe: encoding is serialised.

    Images are refused before decoding (MediaError) when their header declares more than
    ``max_pixels`` pixels or a decode that needs more than ``max_image_bytes`` bytes.
    """
    cdef mtmd_context * ptr
    cdef readonly Model model
    cdef readonly str path
    cdef readonly int n_embd
    cdef readonly object max_pixels
    cdef readonly object max_image_bytes
    cdef readonly int cache_size
    cdef readonly long long cache_bytes
    cdef long long _cached_bytes
    cdef readonly long long cache_hits
    cdef readonly long long cache_misses
    cdef object _cache
    cdef object _lock
    cdef bint _holds_model       # counted in model._n_users: Model.close() waits for us

    def __cinit__(self):
        self.ptr = NULL
        self._holds_model = False

    def __init__(self, Model model not None, path, *, bint use_gpu=True, n_threads=None,
                 image_min_tokens=None, image_max_tokens=None, int cache_size=32,
                 max_pixels=DEFAULT_MAX_PIXELS, long long cache_bytes=DEFAULT_CACHE_BYTES,
                 max_image_bytes=DEFAULT_MAX_IMAGE_BYTES):
        if self.ptr != NULL:
            raise RuntimeError("Multimodal is already initialised")
        _require_mtmd()
        path = _os.fsdecode(_os.fspath(path))
        _precheck_model_file(path)
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        if cache_bytes < 0:
            raise ValueError(f"cache_bytes must be >= 0, got {cache_bytes}")
        for name, v in (("max_pixels", max_pixels), ("max_image_bytes", max_image_bytes)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{name} must be a positive int or None (no limit), got {v!r}")
        cdef mtmd_context_params p = mtmd_context_params_default()
        p.use_gpu = use_gpu
        p.print_timings = False
        p.warmup = False
        if n_threads is not None:
            if not 1 <= n_threads <= 1024:
                raise ValueError(f"n_threads must be in 1..1024, got {n_threads}")
            p.n_threads = n_threads
        else:
            p.n_threads = _cpu.default_threads()
        for name, v in (("image_min_tokens", image_min_tokens), ("image_max_tokens", image_max_tokens)):
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if image_min_tokens is not None:
            p.image_min_tokens = image_min_tokens
        if image_max_tokens is not None:
            p.image_max_tokens = image_max_tokens
        cdef bytes cpath = _os.fsencode(path)
        cdef const char * cpath_c = cpath
        cdef llama_model * m = model._get()
        # The projector keeps pointers into the model (its vocabulary, for tokenizing): we are
        # a user of the weights, from before mtmd_init_from_file runs without the GIL until
        # close(), so Model.close() from another thread cannot free them under us.
        self.model = model
        model._add_user()
        self._holds_model = True
        pyllama_clear_last_error()
        with nogil:
            self.ptr = mtmd_init_from_file(cpath_c, m, p)
        if self.ptr == NULL or model._close_pending:
            if self.ptr != NULL:
                mtmd_free(self.ptr)
                self.ptr = NULL
            self._drop_model()
            if model._close_pending:
                raise ValueError("the model was closed while this projector was being loaded")
        _check(self.ptr != NULL, ModelLoadError, "not a projector mtmd can load for this model: ",
               "see the 'pyllama' logger", path)
        self.path = path
        self.n_embd = llama_model_n_embd_inp(m)
        self.max_pixels = max_pixels
        self.max_image_bytes = max_image_bytes
        self.cache_size = cache_size
        self.cache_bytes = cache_bytes
        self._cached_bytes = 0
        self._cache = _OrderedDict()
        self._lock = _threading.RLock()

    def __dealloc__(self):
        if self.ptr != NULL:
            mtmd_free(self.ptr)
            self.ptr = NULL
        self._drop_model()

    cdef void _drop_model(self):
        if self._holds_model:
            self._holds_model = False
            if self.model is not None:
                self.model._release_user()   # frees the weights if Model.close() is waiting

    cdef mtmd_context * _get(self) except NULL:
        if self.ptr == NULL:
            raise ValueError("this Multimodal is closed or was not initialised")
        return self.ptr

    def close(self) -> None:
        """Free the projector now (also done when the object is collected)."""
        if self._lock is None:
            return
        with self._lock:
            if self.ptr != NULL:
                mtmd_free(self.ptr)
                self.ptr = NULL
            self._cache.clear()
            self._cached_bytes = 0
            self._drop_model()

    @property
    def support_vision(self) -> bool:
        return mtmd_support_vision(self._get())

    @property
    def support_audio(self) -> bool:
        return mtmd_support_audio(self._get())

    @property
    def audio_sample_rate(self) -> int:
        """Samples per second the audio encoder expects (-1 without audio support)."""
        return mtmd_get_audio_sample_rate(self._get())

    @property
    def marker(self) -> str:
        """The text that stands for one medium in :meth:`tokenize`'s prompt."""
        return mtmd_default_marker().decode("utf-8")

    # ---- media ------------------------------------------------------------------------

    def load(self, data) -> Bitmap:
        """Decode an image (PNG, JPEG, BMP, GIF) or, with an audio projector, an audio clip
        (WAV, MP3, FLAC) from its file bytes.  The header is checked first: unknown formats,
        truncated files, images over ``max_pixels`` and images whose decode would need more
        than ``max_image_bytes`` (estimated from the header: bit depth, channels, size) raise
        MediaError without decoding."""
        cdef mtmd_context * ctx = self._get()
        cdef const unsigned char[::1] view
        if isinstance(data, str):
            raise TypeError("load() takes the file's bytes; use load_file(path) for a path")
        try:
            view = memoryview(data).cast("B")
        except TypeError:
            raise TypeError(f"media data must be bytes or a bytes-like buffer, not {type(data).__name__}") from None
        info = _media.sniff_media(memoryview(view))
        if info.kind == "image":
            if not mtmd_support_vision(ctx):
                raise MediaError(f"this projector ({_os.path.basename(self.path)}) takes audio, not images")
            if self.max_pixels is not None and info.width * info.height > self.max_pixels:
                raise MediaError(f"the {info.format} image is {info.width}x{info.height} = "
                                 f"{info.width * info.height} pixels, more than max_pixels={self.max_pixels}")
            need, how = _image_decode_bytes(view, info)
            if self.max_image_bytes is not None and need > self.max_image_bytes:
                raise MediaError(f"the {info.format} image ({info.width}x{info.height}, {how}; {view.shape[0]} "
                                 f"bytes of file) needs about {need} bytes ({need / 2**20:.0f} MiB) to decode, more "
                                 f"than max_image_bytes={self.max_image_bytes}")
        elif not mtmd_support_audio(ctx):
            raise MediaError(f"this projector ({_os.path.basename(self.path)}) takes images, not audio "
                             f"(got {info.format})")
        cdef mtmd_helper_bitmap_wrapper w
        cdef const unsigned char * buf = &view[0]
        cdef size_t n = view.shape[0]
        pyllama_clear_last_error()
        with nogil:
            w = mtmd_helper_bitmap_init_from_buf(ctx, buf, n, False, mtmd_helper_init_opt_default())
        _check(w.bitmap != NULL, MediaError, f"cannot decode the {info.format} data ({n} bytes): ",
               "truncated or corrupt")
        return Bitmap._wrap(w.bitmap)

    def load_file(self, path) -> Bitmap:
        """:meth:`load` on a file's contents."""
        path = _os.fspath(path)
        with open(path, "rb") as f:
            data = f.read()
        try:
            return self.load(data)
        except MediaError as e:
            raise MediaError(f"{path}: {e}") from None

    # ---- tokenizing -------------------------------------------------------------------

    def tokenize(self, str text, bitmaps=(), *, bint add_special=True, bint parse_special=True):
        """Tokenize a prompt in which each :attr:`marker` stands for the next of `bitmaps`.
        mtmd adds the model's own begin/end-of-image tokens around each medium."""
        marker = self.marker
        bitmaps = list(bitmaps)
        n_markers = text.count(marker)
        if n_markers != len(bitmaps):
            raise MediaError(f"the prompt has {n_markers} media marker(s) {marker!r} but {len(bitmaps)} "
                             f"image(s)/audio clip(s) were given")
        parts = []
        pieces = text.split(marker)
        for i, piece in enumerate(pieces):
            if piece:
                parts.append((piece, parse_special))
            if i < len(bitmaps):
                parts.append(bitmaps[i])
        return self.tokenize_parts(parts, add_special=add_special)

    def tokenize_parts(self, parts, *, bint add_special=True):
        """Tokenize a sequence of parts: a str (special tokens parsed), a (str, parse_special)
        pair, or a :class:`Bitmap`.  Markers in text parts stay text."""
        cdef mtmd_context * ctx = self._get()
        parts = list(parts)
        if not parts:
            raise ValueError("the prompt is empty: give at least one part")
        cdef Py_ssize_t n = len(parts), i
        cdef mtmd_input_part * cparts = <mtmd_input_part *>calloc(n, sizeof(mtmd_input_part))
        cdef mtmd_input_text * ctexts = <mtmd_input_text *>calloc(n, sizeof(mtmd_input_text))
        cdef const mtmd_input_part ** pptrs = <const mtmd_input_part **>calloc(n, sizeof(mtmd_input_part *))
        cdef mtmd_input_chunks * chunks = NULL
        cdef int32_t rc
        keep = []
        try:
            if cparts == NULL or ctexts == NULL or pptrs == NULL:
                raise MemoryError()
            for i in range(n):
                part = parts[i]
                pptrs[i] = &cparts[i]
                if isinstance(part, Bitmap):
                    if (<Bitmap>part).ptr == NULL:
                        raise ValueError(f"parts[{i}] is an uninitialised Bitmap")
                    if (<Bitmap>part).is_audio and not mtmd_support_audio(ctx):
                        raise MediaError("this projector takes images, not audio")
                    if not (<Bitmap>part).is_audio and not mtmd_support_vision(ctx):
                        raise MediaError("this projector takes audio, not images")
                    cparts[i].bitmap = (<Bitmap>part).ptr
                    keep.append(part)
                    continue
                if isinstance(part, str):
                    text, special = part, True
                elif isinstance(part, tuple) and len(part) == 2 and isinstance(part[0], str):
                    text, special = part[0], bool(part[1])
                else:
                    raise TypeError(f"parts[{i}] must be a str, a (str, parse_special) pair or a Bitmap, "
                                    f"not {type(part).__name__}")
                b = _utf8(text, "a text part")
                keep.append(b)
                ctexts[i].text = <const char *>b
                ctexts[i].text_len = len(b)
                ctexts[i].add_special = add_special
                ctexts[i].parse_special = special
                cparts[i].text = &ctexts[i]
            chunks = mtmd_input_chunks_init()
            if chunks == NULL:
                raise MemoryError()
            pyllama_clear_last_error()
            with nogil:
                rc = mtmd_tokenize_from_parts(ctx, chunks, pptrs, n, add_special)
            if rc != 0:
                mtmd_input_chunks_free(chunks)
                chunks = NULL
                _check(False, MediaError, "mtmd could not tokenize the prompt: ", f"error {rc}")
            return MediaPrompt._wrap(self, chunks)
        finally:
            free(cparts)
            free(ctexts)
            free(pptrs)

    # ---- encoding and evaluation ------------------------------------------------------

    def cache_info(self) -> dict:
        """The encode cache: hits, misses, entries (size), bytes held, and both limits."""
        return {"hits": self.cache_hits, "misses": self.cache_misses, "size": len(self._cache),
                "capacity": self.cache_size, "bytes": self._cached_bytes, "capacity_bytes": self.cache_bytes}

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()
            self._cached_bytes = 0

    cdef bytes _embeddings(self, MediaPrompt prompt, int index):
        """The projector's output for media chunk `index` (float32, n_tokens x n_embd), from
        the cache or encoded now (GIL released)."""
        cdef const mtmd_input_chunk * chunk = prompt._chunk(index)
        cdef size_t n_tokens = mtmd_input_chunk_get_n_tokens(chunk)
        cdef int32_t rc
        cdef float * out
        key = (prompt._media_ids[index], n_tokens)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                self.cache_hits += 1
                return cached
            ctx = self._get()
            pyllama_clear_last_error()
            with nogil:
                rc = pyllama_mtmd_encode_chunk(ctx, chunk)
            _check(rc == 0, MediaError, "the projector could not encode the image/audio: ", f"error {rc}")
            out = mtmd_get_output_embd(ctx)
            if out == NULL:
                raise MediaError("the projector produced no embeddings")
            data = PyBytes_FromStringAndSize(<char *>out, n_tokens * self.n_embd * sizeof(float))
            self.cache_misses += 1
            if self.cache_size > 0 and len(data) <= self.cache_bytes:
                self._cache[key] = data
                self._cached_bytes += len(data)
                while len(self._cache) > self.cache_size or self._cached_bytes > self.cache_bytes:
                    self._cached_bytes -= len(self._cache.popitem(last=False)[1])
            return data

    def encode(self, MediaPrompt prompt not None, int index):
        """The embeddings of media chunk `index` of `prompt` as a float32 numpy array of shape
        (n_tokens, n_embd) (cached like the engine's)."""
        import numpy as np

        prompt._check_owner(self)
        if index < 0 or index >= len(prompt._media_ids) or prompt._media_ids[index] is None:
            raise IndexError(f"chunk {index} is not a media chunk of this prompt")
        data = self._embeddings(prompt, index)
        return np.frombuffer(data, dtype=np.float32).reshape(-1, self.n_embd).copy()

    def eval(self, Context context not None, MediaPrompt prompt not None, *, int seq_id=0, int n_past=0,
             bint logits_last=True) -> int:
        """Evaluate the whole prompt into sequence `seq_id` of `context`, starting at position
        `n_past`: text chunks as batches, media chunks as embeddings (encoded, or from the
        cache).  The GIL is released; Ctrl-C or Context.abort() stop it (the sequence then
        holds no part of the medium being evaluated).  Returns the new n_past."""
        prompt._check_owner(self)
        if context.model is not self.model:
            raise ValueError("the context belongs to another model than this projector's")
        if seq_id < 0 or seq_id >= context.n_seq_max:
            raise InvalidSequenceError(f"seq_id must be in [0, {context.n_seq_max}), got {seq_id}")
        if n_past < 0:
            raise ValueError(f"n_past must be >= 0, got {n_past}")
        if n_past + len(prompt.tokens) > context.n_ctx_seq:
            raise ContextLengthError(f"the prompt needs {len(prompt.tokens)} positions from {n_past}, but the "
                                     f"context holds {context.n_ctx_seq} per sequence")
        cdef int i, j, k, take, n_chunks = len(prompt._media_ids)
        cdef Batch batch
        cdef int n_batch = context.n_batch
        with context._lock:
            for i in range(n_chunks):
                if prompt._media_ids[i] is not None:
                    _eval_media(context, self, prompt, i, n_past, seq_id)
                    n_past += prompt._chunk_npos[i]
                    continue
                toks = prompt._chunk_tokens(i)
                k = 0
                while k < len(toks):
                    take = min(n_batch, len(toks) - k)
                    batch = Batch(take, 1)
                    for j in range(take):
                        batch._add(toks[k + j], n_past + j, seq_id,
                                   logits_last and i == n_chunks - 1 and k + j == len(toks) - 1)
                    context._eval(batch, False)
                    k += take
                    n_past += take
        return n_past

    def __repr__(self) -> str:
        what = "+".join(k for k, on in (("vision", self.ptr != NULL and mtmd_support_vision(self.ptr)),
                                        ("audio", self.ptr != NULL and mtmd_support_audio(self.ptr))) if on)
        return f"Multimodal({self.path!r}, {what or 'closed'})"


cdef int _eval_media(Context ctx, Multimodal mm, MediaPrompt prompt, int index, llama_pos n_past,
                     llama_seq_id seq) except -1:
    """Decode media chunk `index` of `prompt` into sequence `seq` at `n_past`: embeddings from
    the encode cache (or encoded now), then mtmd's helper decodes them (with non-causal
    attention where the model wants it).  Caller holds ctx._lock.  Ctrl-C and abort() work as
    in Context._eval; on any failure the sequence holds none of the medium."""
    global pyllama_sigint_seen
    cdef llama_context * lctx = ctx._get()
    cdef mtmd_context * mctx = mm._get()
    cdef const mtmd_input_chunk * chunk = prompt._chunk(index)
    cdef int n_tokens = <int>mtmd_input_chunk_get_n_tokens(chunk)
    cdef int32_t rc
    cdef llama_pos new_n_past = 0
    cdef int32_t n_batch = llama_n_batch(lctx)
    cdef float * embd
    if ctx._n_views > 0:
        raise BufferError(f"{ctx._n_views} logits/embedding views of this context are still alive; "
                          "llama.cpp may reuse that memory: delete them (or use copy=True) first")
    if n_past + n_tokens > <int>llama_n_ctx_seq(lctx):
        raise ContextLengthError(f"an image of {n_tokens} tokens at position {n_past} does not fit the "
                                 f"context's {llama_n_ctx_seq(lctx)} positions per sequence")
    if mtmd_decode_use_non_causal(mctx, chunk) and n_tokens > <int>llama_n_ubatch(lctx):
        raise MediaError(f"this model reads an image's {n_tokens} tokens in one micro-batch (non-causal "
                         f"attention) but n_ubatch is {llama_n_ubatch(lctx)}: load with n_ubatch >= {n_tokens} "
                         f"(and n_batch >= {n_tokens})")
    data = mm._embeddings(prompt, index)
    embd = <float *>PyBytes_AS_STRING(data)
    if llama_n_threads(lctx) > 1 or llama_n_threads_batch(lctx) > 1:
        _check_thread_pool_after_fork()
    watch = _in_main_thread() and pyllama_sigint_push()
    ctx.abort_state.watch_sigint = 1 if watch else 0
    ctx.abort_state.abort_requested = 0
    ctx._in_eval = True
    pyllama_clear_last_error()
    try:
        while True:
            with nogil:
                rc = pyllama_mtmd_decode_image_chunk(mctx, lctx, chunk, embd, n_past, seq, n_batch, &new_n_past)
            if rc == 0:
                break
            # Whatever sub-batches got in are dropped: the medium is all or nothing.
            llama_memory_seq_rm(llama_get_memory(lctx), seq, n_past, -1)
            if rc != 2 or ctx.abort_state.abort_requested or not watch or not pyllama_sigint_seen:
                break
            pyllama_sigint_seen = 0
            PyErr_CheckSignals()
    finally:
        ctx._in_eval = False
        ctx.abort_state.watch_sigint = 0
        if watch:
            pyllama_sigint_pop()
    ctx._last_n_outputs = 0
    ctx._last_output_flags = b""
    if rc == 0:
        return 0
    if rc == 2:
        requested = ctx.abort_state.abort_requested
        ctx.abort_state.abort_requested = 0
        _check(requested, DecodeError, "llama.cpp aborted the computation: ", "see the 'pyllama' logger")
        raise DecodeAborted("decode aborted by Context.abort()")
    if rc == 1:
        raise KVCacheFullError(f"no room in the KV memory for an image of {n_tokens} tokens "
                               f"(n_ctx={llama_n_ctx(lctx)}): free sequences or use a larger n_ctx")
    _check(False, DecodeError, f"decoding the image failed with code {rc}: ", "see the 'pyllama' logger")
    return 0


cdef class MediaPrompt:
    """A prompt tokenized by :meth:`Multimodal.tokenize`: text chunks and media chunks.

    ``tokens`` is the whole prompt as one list: text token ids, and for every position of a
    media chunk a negative key derived from the medium's id (so equal images at equal places
    compare equal).  Give a MediaPrompt to ``LLM.complete``/``generate``/``stream`` or to a
    ``GenerationRequest`` like a token list.
    """
    cdef mtmd_input_chunks * chunks
    cdef readonly Multimodal multimodal
    cdef readonly list tokens
    cdef list _media_ids        # per chunk: the medium's id, or None for text
    cdef list _chunk_sizes      # per chunk: tokens it takes (KV cells)
    cdef list _chunk_npos       # per chunk: positions it takes (fewer than tokens with M-RoPE)
    cdef readonly list spans    # (start, n_tokens, chunk index) of every media chunk
    # The media whose positions are not one per token (Qwen2-VL's M-RoPE: an image's tokens
    # share their first position and advance it by max(rows, columns)): (start, n_tokens,
    # n_pos, last_t) with last_t the offset of its last token's position from its first.
    # Empty for every other model, so position = token index and nothing else is paid.
    cdef readonly list pos_spans

    def __cinit__(self):
        self.chunks = NULL

    def __init__(self):
        raise TypeError("use Multimodal.tokenize() or Multimodal.tokenize_parts()")

    def __dealloc__(self):
        if self.chunks != NULL:
            mtmd_input_chunks_free(self.chunks)
            self.chunks = NULL

    @staticmethod
    cdef MediaPrompt _wrap(Multimodal mm, mtmd_input_chunks * chunks):
        cdef MediaPrompt p = MediaPrompt.__new__(MediaPrompt)
        p.chunks = chunks
        p.multimodal = mm
        p.tokens = []
        p._media_ids = []
        p._chunk_sizes = []
        p._chunk_npos = []
        p.spans = []
        p.pos_spans = []
        cdef size_t i, n = mtmd_input_chunks_size(chunks), n_text, j
        cdef const mtmd_input_chunk * c
        cdef const llama_token * toks
        cdef const char * cid
        cdef size_t n_tok
        cdef llama_pos n_pos
        cdef const mtmd_image_tokens * image
        cdef uint32_t last_t
        for i in range(n):
            c = mtmd_input_chunks_get(chunks, i)
            if mtmd_input_chunk_get_type(c) == MTMD_INPUT_CHUNK_TYPE_TEXT:
                toks = mtmd_input_chunk_get_tokens_text(c, &n_text)
                p.tokens.extend([toks[j] for j in range(n_text)])
                p._media_ids.append(None)
                p._chunk_sizes.append(<int>n_text)
                p._chunk_npos.append(<int>n_text)
                continue
            n_tok = mtmd_input_chunk_get_n_tokens(c)
            n_pos = mtmd_input_chunk_get_n_pos(c)
            last_t = <uint32_t>(n_tok - 1)
            image = mtmd_input_chunk_get_tokens_image(c) if n_tok > 0 else NULL
            if image != NULL and mtmd_decode_use_mrope(mm._get()):
                last_t = mtmd_image_tokens_get_decoder_pos(image, 0, n_tok - 1).t
            if n_pos <= 0 or <size_t>n_pos > n_tok or last_t >= <uint32_t>n_pos:
                raise MediaError(f"mtmd gave a media chunk of {n_tok} tokens {n_pos} positions, a layout "
                                 "pyllama's engine does not know")
            if <size_t>n_pos != n_tok or last_t != <uint32_t>(n_tok - 1):
                p.pos_spans.append((len(p.tokens), <int>n_tok, <int>n_pos, <int>last_t))
            cid = mtmd_input_chunk_get_id(c)
            media_id = cid.decode("utf-8", "replace") if cid != NULL and cid[0] != 0 else f"anonymous-{id(p)}-{i}"
            p.spans.append((len(p.tokens), <int>n_tok, <int>i))
            p.tokens.extend([_media_key(media_id)] * n_tok)
            p._media_ids.append(media_id)
            p._chunk_sizes.append(<int>n_tok)
            p._chunk_npos.append(<int>n_pos)
        if not p.tokens:
            raise ValueError("the prompt is empty (no tokens)")
        if p._media_ids[-1] is not None:
            raise MediaError("the prompt ends with an image/audio chunk: put some text after it (a chat "
                             "template's assistant prompt does)")
        return p

    cdef const mtmd_input_chunk * _chunk(self, int index):
        return mtmd_input_chunks_get(self.chunks, index)

    cdef list _chunk_tokens(self, int index):
        cdef size_t n, j
        cdef const llama_token * toks = mtmd_input_chunk_get_tokens_text(self._chunk(index), &n)
        return [toks[j] for j in range(n)]

    cdef int _check_owner(self, Multimodal mm) except -1:
        if self.multimodal is not mm:
            raise ValueError("this MediaPrompt was tokenized by another projector")
        return 0

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def n_media(self) -> int:
        return len(self.spans)

    @property
    def n_positions(self) -> int:
        """Positions the prompt takes in a sequence: its length, except on models whose images
        advance the position by less than their token count (M-RoPE, the Qwen2-VL family)."""
        return sum(self._chunk_npos)

    @property
    def n_media_tokens(self) -> int:
        """Positions taken by images/audio (what mtmd reports for each chunk, summed)."""
        return sum(n for _, n, _ in self.spans)

    def chunks_info(self) -> list:
        """One dict per chunk: kind ("text", "image", "audio"), n_tokens, and id for media."""
        out = []
        cdef int i
        for i in range(len(self._media_ids)):
            t = mtmd_input_chunk_get_type(self._chunk(i))
            kind = "text" if t == MTMD_INPUT_CHUNK_TYPE_TEXT else ("image" if t == MTMD_INPUT_CHUNK_TYPE_IMAGE
                                                                    else "audio")
            entry = {"kind": kind, "n_tokens": self._chunk_sizes[i]}
            if self._media_ids[i] is not None:
                entry["id"] = self._media_ids[i]
            out.append(entry)
        return out

    def text_tokens(self) -> list:
        """The text tokens only (media chunks left out)."""
        return [t for t in self.tokens if t >= 0]

    def __repr__(self) -> str:
        return f"MediaPrompt({len(self.tokens)} tokens, {self.n_media} media)"


# Positions on M-RoPE models.  The engine counts a sequence in tokens (KV cells: n_past, the
# prompt cache), while llama.cpp places them at positions that, after an image, run behind the
# token count.  `pos_spans` (MediaPrompt.pos_spans, kept per slot by the engine) maps one to the
# other; it is empty for every other model, where position == token index.

cdef inline llama_pos _pos_of(list pos_spans, Py_ssize_t i):
    """The position of token i of a sequence (i is never inside a medium; i == its length
    gives the next free position): i, less what the media before it saved."""
    cdef Py_ssize_t lag = 0
    if not pos_spans:
        return <llama_pos>i
    for span in pos_spans:
        if <Py_ssize_t>span[0] + <Py_ssize_t>span[1] > i:
            break
        lag += <Py_ssize_t>span[1] - <Py_ssize_t>span[2]
    return <llama_pos>(i - lag)


cdef llama_pos _last_pos_of(list pos_spans, Py_ssize_t n):
    """The position llama_memory_seq_pos_max reports for a sequence of n tokens (-1: none):
    that of its last token, which for an M-RoPE image is its first position plus last_t."""
    if n <= 0:
        return -1
    for span in pos_spans:
        if <Py_ssize_t>span[0] + <Py_ssize_t>span[1] == n:
            return _pos_of(pos_spans, span[0]) + <llama_pos>span[3]
    return _pos_of(pos_spans, n) - 1


cdef int _check_media_fits(Context ctx, MediaPrompt prompt) except -1:
    """Before a request with media is queued: same model, and every medium that needs one
    micro-batch (non-causal attention) fits n_ubatch."""
    cdef Multimodal mm = prompt.multimodal
    cdef mtmd_context * mctx = mm._get()
    if mm.model is not ctx.model:
        raise ValueError("the MediaPrompt was tokenized for another model than this context's")
    cdef uint32_t n_ubatch = llama_n_ubatch(ctx._get())
    for start, n, idx in prompt.spans:
        if n > n_ubatch and mtmd_decode_use_non_causal(mctx, prompt._chunk(idx)):
            raise MediaError(f"this model reads an image's {n} tokens in one micro-batch (non-causal attention) "
                             f"but n_ubatch is {n_ubatch}: load with n_ubatch >= {n} (and n_batch >= {n})")
    return 0
