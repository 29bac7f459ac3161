// Force-included (g++ -include) when the test suite compiles llama.cpp's unchanged
// examples/simple/simple.cpp: every token that program turns into text is also written to
// stderr as "PYLLAMA_TOKEN <id>", so tests can compare pyllama's token ids with the C++
// program's exactly, not only the text (two token sequences can spell the same text).
#pragma once
#include <cstdio>

#include "llama.h"

static inline int32_t pyllama_logged_token_to_piece(const struct llama_vocab * vocab, llama_token token,
                                                    char * buf, int32_t length, int32_t lstrip, bool special) {
    std::fprintf(stderr, "PYLLAMA_TOKEN %d\n", token);
    return llama_token_to_piece(vocab, token, buf, length, lstrip, special);
}

// From here on (simple.cpp's own code) every call goes through the logger above.
#define llama_token_to_piece pyllama_logged_token_to_piece
