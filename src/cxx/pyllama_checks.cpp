// Input checks that need C++, compiled into pyllama._core (which is otherwise C).
//
// llama.cpp compiles lazy-grammar trigger patterns with std::regex; the constructor throws
// std::regex_error on a bad pattern, and an exception escaping llama.cpp's C API terminates
// the process.  We compile the same pattern the same way first, here, where it can be caught.

#include <cstring>
#include <exception>
#include <regex>

extern "C" int pyllama_regex_check(const char * pattern, char * err, size_t err_size) {
    try {
        std::regex re(pattern);  // same flags as llama_grammar_init_impl: ECMAScript
        (void) re;
        return 1;
    } catch (const std::exception & e) {
        if (err != nullptr && err_size > 0) {
            std::strncpy(err, e.what(), err_size - 1);
            err[err_size - 1] = '\0';
        }
    } catch (...) {
        if (err != nullptr && err_size > 0) {
            std::strncpy(err, "unknown error", err_size - 1);
            err[err_size - 1] = '\0';
        }
    }
    return 0;
}

// How many entries of a GGUF string array repeat an earlier one.  llama_vocab::load
// GGML_ASSERTs on a vocabulary that lists a token text twice (its token -> id map would
// lose one), so the model pre-check counts them first.  It runs on every model load and a
// vocabulary can have 262,144 entries, so it is an open-addressing table of indices (one
// allocation) rather than a std::unordered_set (a node per entry: 34 ms for Gemma 3; this: ~5).
#include <cstdint>
#include <functional>
#include <string_view>
#include <vector>

#include "gguf.h"

extern "C" size_t pyllama_gguf_count_duplicate_strings(const struct gguf_context * ctx, int64_t key_id) {
    const size_t n = gguf_get_arr_n(ctx, key_id);
    if (n >= UINT32_MAX) {
        return 0;   // no real vocabulary; llama.cpp rejects it on its own
    }
    size_t cap = 16;
    while (cap < 2 * n) {
        cap <<= 1;
    }
    std::vector<std::string_view> strs(n);
    std::vector<uint32_t> slots(cap, 0);   // 0: empty, else index + 1
    const std::hash<std::string_view> hash;
    size_t duplicates = 0;
    for (size_t i = 0; i < n; ++i) {
        const char * s = gguf_get_arr_str(ctx, key_id, i);
        strs[i] = std::string_view(s, std::strlen(s));
        for (size_t h = hash(strs[i]) & (cap - 1);; h = (h + 1) & (cap - 1)) {
            if (slots[h] == 0) {
                slots[h] = (uint32_t) i + 1;
                break;
            }
            if (strs[slots[h] - 1] == strs[i]) {
                ++duplicates;
                break;
            }
        }
    }
    return duplicates;
}
