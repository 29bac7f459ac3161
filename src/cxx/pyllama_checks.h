/* What src/cxx/pyllama_checks.cpp exports to pyllama._core (declared in
 * src/pyllama/_support.pxi): input checks that need C++ (std::regex) and the fast GGUF
 * metadata scan of the model pre-check.  See pyllama_checks.cpp for what each one does. */
#ifndef PYLLAMA_CHECKS_H
#define PYLLAMA_CHECKS_H

#include <stddef.h>
#include <stdint.h>

struct gguf_context;

#ifdef __cplusplus
extern "C" {
#endif

/* 1 when `pattern` compiles as llama.cpp's lazy grammar compiles its trigger patterns
   (std::regex, ECMAScript); else 0, with the reason in err. */
int pyllama_regex_check(const char * pattern, char * err, size_t err_size);

/* How many entries of the GGUF string array key_id repeat an earlier one. */
size_t pyllama_gguf_count_duplicate_strings(const struct gguf_context * ctx, int64_t key_id);

/* One metadata key/value of pyllama_gguf_scan: kind 0 integer, 1 string, 2 u64 (bits in
   ival), 3 float. */
typedef void (*pyllama_kv_cb)(void * user, const char * key, size_t key_len, int kind,
                              long long ival, double fval, const char * sval, size_t sval_len);

/* 1: the whole key/value section was read; 0: use ggml's parser instead; -1: an invalid
   value type (message in err). */
int pyllama_gguf_scan(const char * path, pyllama_kv_cb cb, void * user,
                      size_t * n_token_dups, int * has_tokens, char * err, size_t err_cap,
                      char * bad_tensor, size_t bad_cap, int * bad_type);

#ifdef __cplusplus
}
#endif

#endif /* PYLLAMA_CHECKS_H */
