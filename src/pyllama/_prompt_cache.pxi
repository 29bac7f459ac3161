# The prompt cache in host memory (llama-server's --cache-ram, server_prompt_cache): copies of
# slot sequences kept in RAM once their KV cells go to another prompt, loaded back into a slot
# when a later prompt starts with one of them.  A chat server with fewer slots than
# conversations then re-evaluates only each turn's new tokens instead of the whole history.
#
# The class is here (included before the engine, which holds one); what the engine does with
# it (_engine_cache_save/_load/_idle_slots) is in _engine_memory.pxi.  All of that runs in the
# stepping thread under the context's lock: the entries need no lock of their own.

_cache_log = _logging.getLogger("pyllama")


cdef class PromptCache:
    """Host-memory copies of slot sequences (llama-server's ``--cache-ram``), oldest first.

    Engine.prompt_cache holds one (None: no cache, the default of the library; ``pyllama
    serve`` has llama-server's 8192 MiB).  A slot's sequence is copied in when it is about to
    lose most of its cached prompt (its next request shares less than half of it), when its
    cells are freed for lack of KV room, and, with `idle_slots`, whenever a request starts,
    for every idle slot (on a unified KV cache those slots are then emptied: their cells go to
    the running requests).  The slot a new request takes loads the entry that covers more of
    that request's prompt than the slot itself does: llama-server's rule, a larger share of
    both the entry and the prompt, and at least a quarter of the entry.  A loaded entry leaves
    the cache (the slot holds it now).  Only text is cached (as slot files: no media)."""
    cdef list entries                     # [(tokens, state bytes, checkpoints)], oldest first
    cdef readonly long long limit_bytes   # 0: no byte limit (the token limit still applies)
    cdef readonly long long limit_tokens  # 0: none; raised to what limit_bytes holds (see _update)
    cdef public bint idle_slots
    cdef readonly long long n_saved, n_restored

    def __init__(self, long long limit_mib, long long limit_tokens=0, bint idle_slots=True):
        """`limit_mib`: the most RAM its entries take, in MiB (< 0: no byte limit, as
        llama-server's ``--cache-ram -1``); `limit_tokens`: the most tokens they hold (the
        context size, as llama-server; raised to what `limit_mib` holds at the entries'
        average size per token)."""
        if limit_mib == 0:
            raise ValueError("limit_mib=0 is no cache: leave Engine.prompt_cache as None instead")
        if limit_tokens < 0:
            raise ValueError(f"limit_tokens must be >= 0, got {limit_tokens}")
        self.entries = []
        self.limit_bytes = 0 if limit_mib < 0 else limit_mib * 1024 * 1024
        self.limit_tokens = limit_tokens
        self.idle_slots = idle_slots

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def size_bytes(self) -> int:
        """RAM the entries take (their states and checkpoints), in bytes."""
        return sum(_entry_bytes(e) for e in self.entries)

    @property
    def n_tokens(self) -> int:
        """Tokens the entries hold, all together."""
        return sum(len(e[0]) for e in self.entries)

    def clear(self) -> None:
        """Drop every entry (Engine.reset does: the states may no longer fit the context)."""
        self.entries = []

    def info(self) -> dict:
        """Entries, tokens, bytes, limits and the save/load counters, as a dict."""
        return {"entries": len(self.entries), "tokens": self.n_tokens, "bytes": self.size_bytes,
                "limit_bytes": self.limit_bytes, "limit_tokens": self.limit_tokens,
                "idle_slots": bool(self.idle_slots), "saved": self.n_saved, "restored": self.n_restored}

    cdef void _make_room(self, long long size):
        if self.limit_bytes > 0:
            while self.entries and self.size_bytes + size > self.limit_bytes:
                del self.entries[0]

    cdef void _update(self):
        """llama-server's server_prompt_cache::update: the oldest entries go until the byte
        limit holds, then until the token limit (raised to what the bytes allow) does."""
        cdef long long size, n, limit_tokens
        cdef double per_token
        self._make_room(0)
        size, n = self.size_bytes, self.n_tokens
        per_token = max(1.0, size / <double>max(1, n))
        limit_tokens = self.limit_tokens
        if self.limit_bytes > 0:
            limit_tokens = max(limit_tokens, <long long>(self.limit_bytes / per_token))
        if self.limit_tokens > 0:
            while self.entries and self.n_tokens > limit_tokens:
                del self.entries[0]


cdef inline long long _entry_bytes(tuple e):
    return PyBytes_GET_SIZE(e[1]) + sum(PyBytes_GET_SIZE(c[1]) for c in e[2])
