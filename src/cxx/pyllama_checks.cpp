// Input checks that need C++ (a separate source file of pyllama._core; declared in
// pyllama_checks.h).
//
// llama.cpp compiles lazy-grammar trigger patterns with std::regex; the constructor throws
// std::regex_error on a bad pattern, and an exception escaping llama.cpp's C API terminates
// the process.  We compile the same pattern the same way first, here, where it can be caught.

#include "pyllama_checks.h"

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

namespace {

size_t count_duplicates(const std::vector<std::string_view> & strs) {
    size_t cap = 16;
    while (cap < 2 * strs.size()) {
        cap <<= 1;
    }
    std::vector<uint32_t> slots(cap, 0);   // 0: empty, else index + 1
    const std::hash<std::string_view> hash;
    size_t duplicates = 0;
    for (size_t i = 0; i < strs.size(); ++i) {
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

}  // namespace

extern "C" size_t pyllama_gguf_count_duplicate_strings(const struct gguf_context * ctx, int64_t key_id) {
    const size_t n = gguf_get_arr_n(ctx, key_id);
    if (n >= UINT32_MAX) {
        return 0;   // no real vocabulary; llama.cpp rejects it on its own
    }
    std::vector<std::string_view> strs(n);
    for (size_t i = 0; i < n; ++i) {
        strs[i] = gguf_get_arr_str(ctx, key_id, i);   // up to a NUL, as llama.cpp reads it
    }
    return count_duplicates(strs);
}

// A fast read of a GGUF file's metadata for the model pre-check (pyllama._core).
//
// The pre-check needs the integer and string key/values and the duplicate count of
// tokenizer.ggml.tokens *before* llama.cpp loads the file (llama.cpp aborts on some bad
// values).  ggml's gguf_init_from_file builds a std::string per array entry: 32 ms for a
// 262k vocabulary, on every load, on top of llama.cpp's own parse.  This walks the key/value
// section in one buffer instead (~10 ms, most of it hashing the tokens).  It is strict: any
// irregularity (bad magic or version, a length past the end, an unknown type, a section
// over 512 MiB) returns 0 and the caller falls back to ggml's parser, which then either
// succeeds or explains what is wrong.
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <string>

namespace {

struct Reader {
    FILE * f = nullptr;
    std::vector<char> buf;
    size_t have = 0, pos = 0, file_size = 0;

    // Make sure n more bytes are in the buffer (read more of the file when needed).
    bool need(size_t n) {
        if (n > file_size || pos > file_size - n) {
            return false;
        }
        if (pos + n <= have) {
            return true;
        }
        size_t want = buf.size();
        while (want < pos + n) {
            want *= 2;
        }
        if (want > ((size_t) 512 << 20)) {
            return false;
        }
        want = want < file_size ? want : file_size;
        buf.resize(want);
        size_t got = std::fread(buf.data() + have, 1, want - have, f);
        have += got;
        return pos + n <= have;
    }
    template <typename T> bool get(T & out) {
        if (!need(sizeof(T))) return false;
        std::memcpy(&out, buf.data() + pos, sizeof(T));
        pos += sizeof(T);
        return true;
    }
    bool str(size_t & off, uint64_t & len) {
        if (!get(len) || len > ((uint64_t) 1 << 30) || !need((size_t) len)) return false;
        off = pos;
        pos += (size_t) len;
        return true;
    }
};

const size_t kTypeSize[GGUF_TYPE_COUNT] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};

long long read_int(const char * p, int type) {
    switch (type) {
        case GGUF_TYPE_UINT8: { uint8_t v; std::memcpy(&v, p, 1); return v; }
        case GGUF_TYPE_INT8: { int8_t v; std::memcpy(&v, p, 1); return v; }
        case GGUF_TYPE_UINT16: { uint16_t v; std::memcpy(&v, p, 2); return v; }
        case GGUF_TYPE_INT16: { int16_t v; std::memcpy(&v, p, 2); return v; }
        case GGUF_TYPE_UINT32: { uint32_t v; std::memcpy(&v, p, 4); return v; }
        case GGUF_TYPE_INT32: { int32_t v; std::memcpy(&v, p, 4); return v; }
        case GGUF_TYPE_UINT64: { uint64_t v; std::memcpy(&v, p, 8); return (long long) v; }   // kind 2: reinterpret
        default: { int64_t v; std::memcpy(&v, p, 8); return v; }
    }
}

bool is_int(int t) {
    return t == GGUF_TYPE_UINT8 || t == GGUF_TYPE_INT8 || t == GGUF_TYPE_UINT16 || t == GGUF_TYPE_INT16 ||
           t == GGUF_TYPE_UINT32 || t == GGUF_TYPE_INT32 || t == GGUF_TYPE_UINT64 || t == GGUF_TYPE_INT64;
}

}  // namespace

// Calls cb for every integer key (kind 0; kind 2 for a u64, whose bits ival carries; an
// array of u32/i32 reports its largest element), string key (kind 1) and float key (kind 3); counts repeated entries of tokenizer.ggml.tokens into
// *n_token_dups (and sets *has_tokens).  Returns 1 when the whole key/value section was
// read, 0 when the caller should use ggml's parser instead, and -1 (with a message in err)
// when a value type is not a GGUF type: ggml's parser would reject the file too, but only
// after loading the out-of-range number into its gguf_type enum (undefined behaviour that
// UBSan reports), so such a file is refused here.
//
// After the key/values it reads the tensor infos and reports the first tensor that must be F32
// in llama.cpp's graphs but is not (into bad_tensor / *bad_type; bad_tensor[0] stays 0 when
// there is none): a norm weight ("...norm.weight") or any vector (a tensor whose dimensions
// after the first are all 1: norms, biases, scales).  convert_hf_to_gguf.py always writes
// those as F32 ("most of the codebase that takes in 1D tensors or norms only handles F32");
// an F16 one loads, and then ggml's CPU binary ops abort the process at the first decode
// ("binary_op: unsupported types: dst: f32, src0: f32, src1: f16").
extern "C" int pyllama_gguf_scan(const char * path, pyllama_kv_cb cb, void * user,
                                 size_t * n_token_dups, int * has_tokens, char * err, size_t err_cap,
                                 char * bad_tensor, size_t bad_cap, int * bad_type) {
    Reader r;
    *n_token_dups = 0;
    *has_tokens = 0;
    *bad_type = -1;
    if (err_cap > 0) err[0] = '\0';
    if (bad_cap > 0) bad_tensor[0] = '\0';
    auto bad_value_type = [&](size_t key_off, uint64_t key_len, uint32_t t, const char * what) {
        std::string key(r.buf.data() + key_off, (size_t) key_len);
        key = key.substr(0, std::min(key.find('\0'), (size_t) 200));
        std::snprintf(err, err_cap, "key '%s' has an invalid GGUF %s %u (the file is corrupt)", key.c_str(), what, t);
        return -1;
    };
    r.f = std::fopen(path, "rb");
    if (r.f == nullptr) {
        return 0;
    }
    struct Closer { FILE * f; ~Closer() { std::fclose(f); } } closer{r.f};
    if (std::fseek(r.f, 0, SEEK_END) != 0) return 0;
    long end = std::ftell(r.f);
    if (end < 0 || std::fseek(r.f, 0, SEEK_SET) != 0) return 0;
    r.file_size = (size_t) end;
    r.buf.resize(1 << 20);

    uint32_t magic, version;
    uint64_t n_tensors, n_kv;
    if (!r.get(magic) || std::memcmp(&magic, "GGUF", 4) != 0 || !r.get(version) || version < 2 || version > 3 ||
        !r.get(n_tensors) || !r.get(n_kv) || n_kv > ((uint64_t) 1 << 20)) {
        return 0;
    }
    for (uint64_t k = 0; k < n_kv; ++k) {
        size_t key_off;
        uint64_t key_len;
        uint32_t type;
        if (!r.str(key_off, key_len) || !r.get(type)) return 0;
        if (type >= GGUF_TYPE_COUNT) return bad_value_type(key_off, key_len, type, "value type");
        // note: r.buf may move while reading the value; keep offsets, not pointers
        if (type == GGUF_TYPE_STRING) {
            size_t off;
            uint64_t len;
            if (!r.str(off, len)) return 0;
            cb(user, r.buf.data() + key_off, (size_t) key_len, 1, 0, 0.0, r.buf.data() + off, (size_t) len);
        } else if (type == GGUF_TYPE_ARRAY) {
            uint32_t et;
            uint64_t n;
            if (!r.get(et) || !r.get(n)) return 0;
            if (et >= GGUF_TYPE_COUNT) return bad_value_type(key_off, key_len, et, "array element type");
            if (et == GGUF_TYPE_ARRAY) return 0;
            if (et == GGUF_TYPE_STRING) {
                const bool tokens = std::string(r.buf.data() + key_off, (size_t) key_len) == "tokenizer.ggml.tokens";
                if (n > ((uint64_t) 1 << 28)) return 0;
                std::vector<std::pair<size_t, size_t>> items;   // offsets: the buffer may grow
                if (tokens) items.reserve((size_t) n);
                for (uint64_t i = 0; i < n; ++i) {
                    size_t off;
                    uint64_t len;
                    if (!r.str(off, len)) return 0;
                    // llama.cpp reads each text as a C string (gguf_get_arr_str): up to a NUL,
                    // so "ab\0x" and "ab" are the same token to it -- and a duplicate.
                    if (tokens) items.emplace_back(off, strnlen(r.buf.data() + off, (size_t) len));
                }
                if (tokens) {   // the buffer no longer moves: offsets become views
                    *has_tokens = 1;
                    std::vector<std::string_view> strs(items.size());
                    for (size_t i = 0; i < items.size(); ++i) {
                        strs[i] = std::string_view(r.buf.data() + items[i].first, items[i].second);
                    }
                    *n_token_dups = count_duplicates(strs);
                }
            } else {
                const size_t es = kTypeSize[et];
                if (n > ((uint64_t) 1 << 40) / es || !r.need((size_t) (n * es))) return 0;
                if ((et == GGUF_TYPE_UINT32 || et == GGUF_TYPE_INT32) && n > 0) {
                    long long best = read_int(r.buf.data() + r.pos, (int) et);
                    for (uint64_t i = 1; i < n; ++i) {
                        long long v = read_int(r.buf.data() + r.pos + i * es, (int) et);
                        best = v > best ? v : best;
                    }
                    cb(user, r.buf.data() + key_off, (size_t) key_len, 0, best, 0.0, nullptr, 0);
                }
                r.pos += (size_t) (n * es);
            }
        } else {
            const size_t es = kTypeSize[type];
            if (!r.need(es)) return 0;
            if (is_int((int) type)) {
                cb(user, r.buf.data() + key_off, (size_t) key_len, type == GGUF_TYPE_UINT64 ? 2 : 0,
                   read_int(r.buf.data() + r.pos, (int) type), 0.0, nullptr, 0);
            } else if (type == GGUF_TYPE_FLOAT32 || type == GGUF_TYPE_FLOAT64) {
                double v;
                if (type == GGUF_TYPE_FLOAT32) { float f; std::memcpy(&f, r.buf.data() + r.pos, 4); v = f; }
                else { std::memcpy(&v, r.buf.data() + r.pos, 8); }
                cb(user, r.buf.data() + key_off, (size_t) key_len, 3, 0, v, nullptr, 0);
            }
            r.pos += es;
        }
    }
    // Tensor infos: name, n_dims (u32), ne[n_dims] (i64), type (u32), offset (u64).  Any
    // irregularity ends this check only (llama.cpp's loader reports a broken tensor table).
    for (uint64_t t = 0; t < n_tensors && t < ((uint64_t) 1 << 24); ++t) {
        size_t name_off;
        uint64_t name_len;
        uint32_t n_dims, type;
        uint64_t offset;
        if (!r.str(name_off, name_len) || !r.get(n_dims) || n_dims == 0 || n_dims > 4) break;
        int64_t ne[4] = {1, 1, 1, 1};
        bool ok = true;
        for (uint32_t d = 0; d < n_dims && ok; ++d) ok = r.get(ne[d]);
        if (!ok || !r.get(type) || !r.get(offset)) break;
        if (type == 0 /* GGML_TYPE_F32 */) continue;
        std::string name(r.buf.data() + name_off, (size_t) name_len);
        name = name.substr(0, name.find('\0'));
        const bool vector = ne[1] == 1 && ne[2] == 1 && ne[3] == 1;
        const std::string suffix = "norm.weight";
        const bool norm = name.size() >= suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
        if (vector || norm) {
            std::snprintf(bad_tensor, bad_cap, "%s", name.c_str());
            *bad_type = (int) type;
            break;
        }
    }
    return 1;
}
