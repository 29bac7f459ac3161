from libcpp cimport bool as cpp_bool

# C-level support: Ctrl-C during long nogil calls, UTF-8 scanning, the last
# llama.cpp error message, and routing llama.cpp's log into Python's logging.
#
# The C code itself lives in src/cxx: the helpers in pyllama_support.h (static, header-only,
# so the per-token ones inline), the C++ input checks in pyllama_checks.cpp (declared in
# pyllama_checks.h).
cdef extern from "pyllama_support.h":
    ctypedef struct pyllama_abort_state:
        int abort_requested
        int watch_sigint
    int pyllama_sigint_push()
    void pyllama_sigint_pop()
    cpp_bool pyllama_abort_cb(void * data) noexcept nogil
    int pyllama_sigint_seen
    void pyllama_set_last_error(const char * text) noexcept nogil
    const char * pyllama_get_last_error() noexcept nogil
    void pyllama_clear_last_error() noexcept nogil
    size_t pyllama_utf8_complete_len(const char * buf, size_t n) noexcept nogil
    double pyllama_now_ms() nogil
    int32_t pyllama_argmax_f32(const float * x, int32_t n) nogil
    int pyllama_library_of(const void * addr, char * buf, size_t n)
    # build options (pyllama_config.h: CMake's values, else defaults)
    const char * PYLLAMA_LLAMA_COMMIT_C "PYLLAMA_LLAMA_COMMIT"
    int PYLLAMA_BACKEND_DL


cdef extern from "pyllama_compute.h" nogil:
    # llama_decode/llama_encode on the process's one compute thread when the context uses
    # several threads (why: pyllama_compute.h), else on the caller's.
    int32_t pyllama_eval(llama_context * ctx, llama_batch batch, int encode) except +
    cpp_bool pyllama_compute_wanted(llama_context * ctx)
    ctypedef int32_t (*pyllama_compute_fn)(void * arg) noexcept
    int32_t pyllama_compute_run(pyllama_compute_fn fn, void * arg) except +
    unsigned long long pyllama_compute_jobs()


cdef extern from "pyllama_memory.h" nogil:
    ctypedef struct pyllama_memory_entry:
        char buffer[128]
        char device[128]
        int is_host
        size_t model, context, compute
    int pyllama_memory_breakdown(const llama_context * ctx, pyllama_memory_entry * out, int cap)


cdef extern from "pyllama_checks.h" nogil:
    int pyllama_regex_check(const char * pattern, char * err, size_t err_size)
    size_t pyllama_gguf_count_duplicate_strings(const gguf_context * ctx, int64_t key_id)
    ctypedef void (*pyllama_kv_cb)(void * user, const char * key, size_t key_len, int kind,
                                   long long ival, double fval, const char * sval, size_t sval_len) noexcept
    int pyllama_gguf_scan(const char * path, pyllama_kv_cb cb, void * user,
                          size_t * n_token_dups, int * has_tokens, char * err, size_t err_cap,
                          char * bad_tensor, size_t bad_cap, int * bad_type) noexcept


_LLAMA_COMMIT = (<bytes>PYLLAMA_LLAMA_COMMIT_C).decode()


cdef inline str _str(const char * s):
    if s == NULL:
        return ""
    return s.decode("utf-8", "replace")


cdef inline bytes _utf8(object value, str what):
    """str or bytes -> UTF-8 bytes without NULs, for C strings."""
    cdef bytes b
    if isinstance(value, bytes):
        b = <bytes>value
    elif isinstance(value, str):
        try:
            b = (<str>value).encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"{what} is not valid text: {e.reason} at index {e.start}") from None
    else:
        raise TypeError(f"{what} must be str, not {type(value).__name__}")
    if b"\0" in b:
        raise ValueError(f"{what} must not contain NUL characters")
    return b


cdef inline str _short(object s, int n=60):
    s = str(s)
    return s if len(s) <= n else s[:n] + "..."


cdef str _last_error(str fallback):
    cdef const char * e = pyllama_get_last_error()
    if e != NULL and e[0] != 0:
        return e.decode("utf-8", "replace")
    return fallback


cdef int _check(bint ok, object exc_type, str what, str cause=None, object path=None) except -1:
    """The one place where a failed llama.cpp/ggml call (a NULL pointer, a false or non-zero
    return code) becomes an exception.  `what` says what failed; with `cause`, it is followed
    by the first error llama.cpp logged on this thread since pyllama_clear_last_error(), or by
    `cause` when it logged none.  With `path`, the exception is exc_type(path, message)
    (ModelLoadError's signature).  Cheap when `ok`: call it right after the C call, GIL held.
    The few sites whose message lists what would have been valid (unknown device or chat
    template names) test the result and raise themselves, so the list is built only on failure."""
    if ok:
        return 0
    if cause is not None:
        what = what + _last_error(cause)
    if path is not None:
        raise exc_type(path, what)
    raise exc_type(what)


cdef inline bint _in_main_thread():
    return _threading.current_thread() is _threading.main_thread()


# ---- logging --------------------------------------------------------------

_logger = _logging.getLogger("pyllama")
# Python logging level below which llama.cpp records are dropped in C, before the
# GIL is taken.  The default forwards nothing: verbose=False prints nothing at all.
cdef int _log_threshold = _logging.CRITICAL + 10
cdef int _log_last_level = _logging.INFO

cdef int _ggml_to_logging(ggml_log_level level) noexcept nogil:
    if level == GGML_LOG_LEVEL_ERROR:
        return 40
    if level == GGML_LOG_LEVEL_WARN:
        return 30
    if level == GGML_LOG_LEVEL_INFO:
        return 20
    if level == GGML_LOG_LEVEL_DEBUG:
        return 10
    return -1


cdef void _log_callback(ggml_log_level level, const char * text, void * user_data) noexcept nogil:
    global _log_last_level
    cdef int pylevel = _ggml_to_logging(level)
    if level == GGML_LOG_LEVEL_CONT:
        pylevel = _log_last_level
    else:
        _log_last_level = pylevel
    if level == GGML_LOG_LEVEL_ERROR:
        pyllama_set_last_error(text)
    if pylevel < _log_threshold or pylevel < 0:
        return
    with gil:
        try:
            msg = text.decode("utf-8", "replace").rstrip("\n")
            if msg:
                _logger.log(pylevel, "%s", msg)
        except BaseException:
            pass  # a log line must never raise into llama.cpp


def _compute_thread_jobs() -> int:
    """How many graph computations the process's compute thread has run (pyllama_compute.h);
    for tests."""
    return pyllama_compute_jobs()


def _argmax_f32(const float[::1] values) -> int:
    """The index greedy sampling picks from a float32 row (pyllama_argmax_f32: the first
    largest value, NaNs never win); for tests of the vectorised scan."""
    if values.shape[0] == 0:
        raise ValueError("an empty row has no largest value")
    return pyllama_argmax_f32(&values[0], <int32_t>values.shape[0])


def set_log_level(int level) -> None:
    """Forward llama.cpp/ggml log records at or above `level` (a logging level) to the
    "pyllama" logger.  logging.CRITICAL + 10 (the default) forwards nothing."""
    global _log_threshold
    _log_threshold = level


def get_log_level() -> int:
    return _log_threshold


llama_log_set(_log_callback, NULL)


# ---- backends ---------------------------------------------------------------

cdef bint _backends_loaded = False

cdef void _ensure_backends_loaded():
    """With GGML_BACKEND_DL (portable wheels) the backends are shared libraries next to
    this module: load them once, from here, before anything needs a device."""
    global _backends_loaded
    if _backends_loaded:
        return
    _backends_loaded = True
    if PYLLAMA_BACKEND_DL:
        here = _os.path.dirname(_os.path.abspath(__file__)).encode()
        ggml_backend_load_all_from_path(here)


llama_backend_init()
_ensure_backends_loaded()


# ---- RPC helpers ------------------------------------------------------------

cdef bytes _check_endpoint(object endpoint):
    if not isinstance(endpoint, str) or ":" not in endpoint:
        raise ValueError(f"RPC endpoint must be 'host:port', got {endpoint!r}")
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit() or not (0 < int(port) < 65536):
        raise ValueError(f"RPC endpoint must be 'host:port' with a port in 1..65535, got {endpoint!r}")
    return _utf8(endpoint, "endpoint")


# ggml-rpc's HELLO (ggml/src/ggml-rpc/ggml-rpc.cpp, negotiate_hello): the client sends
# | cmd u8 = 14 | size u64 = 24 | conn_caps[24] | and the server answers
# | size u64 = 28 | major u8 | minor u8 | patch u8 | pad u8 | conn_caps[24] |.
# ggml's own client does this with no timeout and GGML_ABORTs on a short or malformed answer.
_RPC_CMD_HELLO = 14
_RPC_CONN_CAPS_SIZE = 24


def _recv_exact(sock, int n, str endpoint):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"{endpoint} closed the connection during the ggml RPC handshake "
                                  f"(after {len(buf)} of {n} bytes): not a ggml rpc-server of this protocol")
        buf += chunk
    return bytes(buf)


cdef _rpc_probe(str endpoint, double timeout=3.0):
    """Connect and run ggml-rpc's HELLO handshake ourselves, with a timeout: an address that
    accepts and never answers would hang ggml's client, and one that answers with another
    protocol (an HTTP server, say) would make it abort the process."""
    import socket
    import struct
    import time
    host, _, port = endpoint.rpartition(":")
    host = host.strip("[]")
    deadline = time.monotonic() + timeout
    try:
        sock = socket.create_connection((host, int(port)), timeout=timeout)
    except OSError as e:
        raise ConnectionError(f"cannot reach RPC server {endpoint}: {e.strerror or e}") from None
    try:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            sock.sendall(struct.pack("<BQ", _RPC_CMD_HELLO, _RPC_CONN_CAPS_SIZE) + bytes(_RPC_CONN_CAPS_SIZE))
            size = struct.unpack("<Q", _recv_exact(sock, 8, endpoint))[0]
            expected = 4 + _RPC_CONN_CAPS_SIZE
            if size != expected:
                raise ConnectionError(f"{endpoint} is not a ggml RPC server (or speaks another protocol version): "
                                      f"its answer to the handshake announces {size} bytes, expected {expected}")
            major, minor, patch = struct.unpack("<BBB", _recv_exact(sock, expected, endpoint)[:3])
        except socket.timeout:
            raise ConnectionError(f"{endpoint} accepted the connection but did not answer the ggml RPC handshake "
                                  f"within {timeout:g} s (not a ggml rpc-server, or one busy with another client)") from None
        except ConnectionError:
            raise
        except OSError as e:
            raise ConnectionError(f"RPC handshake with {endpoint} failed: {e.strerror or e}") from None
        if major != PYLLAMA_RPC_PROTO_MAJOR or minor > PYLLAMA_RPC_PROTO_MINOR:
            raise ConnectionError(f"RPC server {endpoint} speaks protocol {major}.{minor}.{patch}; this pyllama's "
                                  f"ggml needs {PYLLAMA_RPC_PROTO_MAJOR}.x (x <= {PYLLAMA_RPC_PROTO_MINOR}): "
                                  "run an rpc-server from the same llama.cpp version")
    finally:
        sock.close()
