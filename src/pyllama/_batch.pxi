# Batch (owns llama_batch): the tokens of one llama_decode, with their positions, sequences
# and which of them want logits; bounds-checked before llama.cpp sees them.

cdef int64_t _BATCH_MAX_TOKENS = 1 << 24      # 16M tokens: far beyond any n_batch
cdef int64_t _BATCH_MAX_SEQ_SLOTS = 1 << 26   # capacity x n_seq_max (one malloc'd seq-id array per token)


cdef class Batch:
    """Tokens for one decode call, over any number of sequences."""

    cdef llama_batch batch
    cdef readonly int32_t capacity
    cdef readonly int32_t n_seq_max

    def __cinit__(self, int32_t capacity, int32_t n_seq_max=1):
        self.batch.token = NULL
        if capacity < 1:
            raise ValueError(f"batch capacity must be >= 1, got {capacity}")
        if n_seq_max < 1 or <size_t>n_seq_max > llama_max_parallel_sequences():
            raise ValueError(f"n_seq_max must be in 1..{llama_max_parallel_sequences()}, got {n_seq_max}")
        # llama_batch_init neither checks its mallocs nor guards (capacity + 1) * 8 against
        # overflow: a huge capacity is a segfault inside it, so refuse one here.
        if capacity > _BATCH_MAX_TOKENS or <int64_t>capacity * n_seq_max > _BATCH_MAX_SEQ_SLOTS:
            raise BatchCapacityError(f"a batch of {capacity} tokens x {n_seq_max} sequence ids is too large "
                                     f"(at most {_BATCH_MAX_TOKENS} tokens and {_BATCH_MAX_SEQ_SLOTS} "
                                     "token-sequence slots)")
        self.capacity = capacity
        self.n_seq_max = n_seq_max
        self.batch = llama_batch_init(capacity, 0, n_seq_max)
        if (self.batch.token == NULL or self.batch.pos == NULL or self.batch.n_seq_id == NULL
                or self.batch.seq_id == NULL or self.batch.logits == NULL):
            raise MemoryError(f"cannot allocate a batch of {capacity} tokens")
        self.batch.n_tokens = 0

    def __dealloc__(self):
        if self.batch.token != NULL:
            llama_batch_free(self.batch)
            self.batch.token = NULL

    @property
    def n_tokens(self) -> int:
        return self.batch.n_tokens

    def __len__(self):
        return self.batch.n_tokens

    def clear(self) -> None:
        self.batch.n_tokens = 0

    cdef inline int _add(self, llama_token token, llama_pos pos, llama_seq_id seq, bint logits) except -1 nogil:
        cdef int32_t i = self.batch.n_tokens
        if i >= self.capacity:
            with gil:
                raise BatchCapacityError(f"batch is full ({self.capacity} tokens)")
        self.batch.token[i] = token
        self.batch.pos[i] = pos
        self.batch.n_seq_id[i] = 1
        self.batch.seq_id[i][0] = seq
        self.batch.logits[i] = logits
        self.batch.n_tokens = i + 1
        return i

    def add(self, int token, int pos, seq_ids=0, bint logits=False) -> int:
        """Append one token at `pos` for one or more sequences; returns its index."""
        cdef int32_t i = self.batch.n_tokens, k
        if i >= self.capacity:
            raise BatchCapacityError(f"batch is full ({self.capacity} tokens)")
        if pos < 0:
            raise ValueError(f"position must be >= 0, got {pos}")
        seqs = (seq_ids,) if isinstance(seq_ids, int) else tuple(seq_ids)
        if not seqs or len(seqs) > self.n_seq_max:
            raise InvalidSequenceError(f"a token needs 1..{self.n_seq_max} sequence ids, got {len(seqs)}")
        for s in seqs:
            if s < 0 or s >= self.n_seq_max:
                raise InvalidSequenceError(f"sequence id {s} is outside [0, {self.n_seq_max}) for this batch")
        self.batch.token[i] = token
        self.batch.pos[i] = pos
        self.batch.n_seq_id[i] = len(seqs)
        for k, s in enumerate(seqs):
            self.batch.seq_id[i][k] = s
        self.batch.logits[i] = logits
        self.batch.n_tokens = i + 1
        return i

    def add_sequence(self, tokens, int pos0=0, int seq_id=0, bint logits_last=True) -> int:
        """Append tokens of one sequence at positions pos0, pos0+1, ...; returns the last index."""
        cdef Py_ssize_t n = len(tokens), k
        if n == 0:
            raise ValueError("add_sequence needs at least one token")
        if self.batch.n_tokens + n > self.capacity:
            raise BatchCapacityError(f"{n} tokens do not fit: the batch holds {self.batch.n_tokens} "
                                     f"of {self.capacity}")
        if seq_id < 0 or seq_id >= self.n_seq_max:
            raise InvalidSequenceError(f"sequence id {seq_id} is outside [0, {self.n_seq_max}) for this batch")
        if pos0 < 0:
            raise ValueError(f"pos0 must be >= 0, got {pos0}")
        cdef int32_t last = 0
        for k in range(n):
            last = self._add(tokens[k], pos0 + k, seq_id, logits_last and k == n - 1)
        return last

    def add_sequences(self, sequences, seq_ids=None, int pos0=0, *, bint logits_all=False) -> int:
        """Append several sequences in one call: the tokens of sequences[j] for sequence
        seq_ids[j] (default: j) at positions pos0, pos0+1, ...; logits on every token with
        logits_all=True (what pooled embeddings need), else on the last token of each.
        Returns the index of the last token appended (-1 if none).  All or nothing: on an
        error the batch is left as it was."""
        cdef list seqs = list(sequences)
        cdef list ids = list(range(len(seqs))) if seq_ids is None else [int(s) for s in seq_ids]
        cdef Py_ssize_t j, k, n, total = 0
        cdef int32_t start = self.batch.n_tokens, i
        cdef llama_seq_id sid
        if len(ids) != len(seqs):
            raise ValueError(f"{len(seqs)} sequences but {len(ids)} sequence ids")
        if pos0 < 0:
            raise ValueError(f"pos0 must be >= 0, got {pos0}")
        for j in range(len(seqs)):
            if ids[j] < 0 or ids[j] >= self.n_seq_max:
                raise InvalidSequenceError(f"sequence id {ids[j]} is outside [0, {self.n_seq_max}) for this batch")
            total += len(seqs[j])
        if start + total > self.capacity:
            raise BatchCapacityError(f"{total} tokens do not fit: the batch holds {start} of {self.capacity}")
        i = start
        try:
            for j in range(len(seqs)):
                tokens = seqs[j]
                n = len(tokens)
                sid = ids[j]
                for k in range(n):
                    self.batch.token[i] = tokens[k]
                    self.batch.pos[i] = pos0 + k
                    self.batch.n_seq_id[i] = 1
                    self.batch.seq_id[i][0] = sid
                    self.batch.logits[i] = logits_all or k == n - 1
                    i += 1
        except BaseException:
            self.batch.n_tokens = start   # a token that is not an int32: append nothing
            raise
        self.batch.n_tokens = i
        return i - 1 if i > start else -1

    @classmethod
    def from_arrays(cls, tokens, pos, seq_ids, logits=None, int n_seq_max=1):
        n = len(tokens)
        if len(pos) != n or len(seq_ids) != n or (logits is not None and len(logits) != n):
            raise ValueError("tokens, pos, seq_ids (and logits) must have the same length")
        cdef Batch b = cls(max(n, 1), n_seq_max)
        for i in range(n):
            b.add(int(tokens[i]), int(pos[i]), int(seq_ids[i]), bool(logits[i]) if logits is not None else False)
        return b

    def tokens(self) -> list:
        return [self.batch.token[i] for i in range(self.batch.n_tokens)]

    def __repr__(self):
        return f"<pyllama.Batch {self.batch.n_tokens}/{self.capacity} tokens>"
