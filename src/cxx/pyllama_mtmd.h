/* llama.cpp's mtmd library (tools/mtmd: images and audio in prompts) for pyllama._core,
 * declared in src/pyllama/_mtmd.pxd.  With PYLLAMA_HAS_MTMD (the default build) this is
 * upstream's mtmd.h and mtmd-helper.h.  A build configured with -DPYLLAMA_MTMD=OFF gets
 * stand-ins with the same names that do nothing: _core checks PYLLAMA_HAS_MTMD and raises
 * before it would call one. */
#ifndef PYLLAMA_MTMD_H
#define PYLLAMA_MTMD_H

#include "pyllama_config.h"

#ifndef PYLLAMA_HAS_MTMD
#define PYLLAMA_HAS_MTMD 0
#endif

#if PYLLAMA_HAS_MTMD
#include "mtmd.h"
#include "mtmd-helper.h"
#else
#include <stddef.h>
#include <stdint.h>

#include "llama.h"

enum mtmd_input_chunk_type {
    MTMD_INPUT_CHUNK_TYPE_TEXT,
    MTMD_INPUT_CHUNK_TYPE_IMAGE,
    MTMD_INPUT_CHUNK_TYPE_AUDIO,
};
typedef struct mtmd_context mtmd_context;
typedef struct mtmd_bitmap mtmd_bitmap;
typedef struct mtmd_input_chunk mtmd_input_chunk;
typedef struct mtmd_input_chunks mtmd_input_chunks;
typedef struct mtmd_image_tokens mtmd_image_tokens;
struct mtmd_decoder_pos { uint32_t t; uint32_t x; uint32_t y; uint32_t z; };
typedef struct mtmd_input_text {
    const char * text;
    size_t text_len;
    bool add_special;
    bool parse_special;
} mtmd_input_text;
typedef struct mtmd_input_part {
    const mtmd_input_text * text;
    const mtmd_bitmap * bitmap;
} mtmd_input_part;
struct mtmd_context_params {
    bool use_gpu;
    bool print_timings;
    int n_threads;
    const char * media_marker;
    bool warmup;
    int image_min_tokens;
    int image_max_tokens;
};
typedef struct mtmd_helper_init_opt { int unused; } mtmd_helper_init_opt;
struct mtmd_helper_bitmap_wrapper { mtmd_bitmap * bitmap; void * video_ctx; };
typedef int32_t (*mtmd_helper_post_decode_callback)(const void * batch, void * user_data);

static inline const char * mtmd_default_marker(void) { return "<__media__>"; }
static inline struct mtmd_context_params mtmd_context_params_default(void) {
    struct mtmd_context_params p = {true, false, 4, "<__media__>", false, -1, -1}; return p;
}
static inline mtmd_context * mtmd_init_from_file(const char * f, const struct llama_model * m, struct mtmd_context_params p) {
    (void)f; (void)m; (void)p; return NULL;
}
static inline void mtmd_free(mtmd_context * c) { (void)c; }
static inline bool mtmd_support_vision(const mtmd_context * c) { (void)c; return false; }
static inline bool mtmd_support_audio(const mtmd_context * c) { (void)c; return false; }
static inline bool mtmd_decode_use_mrope(const mtmd_context * c) { (void)c; return false; }
static inline bool mtmd_decode_use_non_causal(const mtmd_context * c, const mtmd_input_chunk * k) { (void)c; (void)k; return false; }
static inline int mtmd_get_audio_sample_rate(const mtmd_context * c) { (void)c; return -1; }
static inline mtmd_bitmap * mtmd_bitmap_init(uint32_t x, uint32_t y, const unsigned char * d) { (void)x; (void)y; (void)d; return NULL; }
static inline mtmd_bitmap * mtmd_bitmap_init_from_audio(size_t n, const float * d) { (void)n; (void)d; return NULL; }
static inline uint32_t mtmd_bitmap_get_nx(const mtmd_bitmap * b) { (void)b; return 0; }
static inline uint32_t mtmd_bitmap_get_ny(const mtmd_bitmap * b) { (void)b; return 0; }
static inline size_t mtmd_bitmap_get_n_bytes(const mtmd_bitmap * b) { (void)b; return 0; }
static inline bool mtmd_bitmap_is_audio(const mtmd_bitmap * b) { (void)b; return false; }
static inline void mtmd_bitmap_free(mtmd_bitmap * b) { (void)b; }
static inline const char * mtmd_bitmap_get_id(const mtmd_bitmap * b) { (void)b; return NULL; }
static inline void mtmd_bitmap_set_id(mtmd_bitmap * b, const char * i) { (void)b; (void)i; }
static inline mtmd_input_chunks * mtmd_input_chunks_init(void) { return NULL; }
static inline size_t mtmd_input_chunks_size(const mtmd_input_chunks * c) { (void)c; return 0; }
static inline const mtmd_input_chunk * mtmd_input_chunks_get(const mtmd_input_chunks * c, size_t i) { (void)c; (void)i; return NULL; }
static inline void mtmd_input_chunks_free(mtmd_input_chunks * c) { (void)c; }
static inline enum mtmd_input_chunk_type mtmd_input_chunk_get_type(const mtmd_input_chunk * c) { (void)c; return MTMD_INPUT_CHUNK_TYPE_TEXT; }
static inline const llama_token * mtmd_input_chunk_get_tokens_text(const mtmd_input_chunk * c, size_t * n) { (void)c; *n = 0; return NULL; }
static inline size_t mtmd_input_chunk_get_n_tokens(const mtmd_input_chunk * c) { (void)c; return 0; }
static inline const char * mtmd_input_chunk_get_id(const mtmd_input_chunk * c) { (void)c; return NULL; }
static inline llama_pos mtmd_input_chunk_get_n_pos(const mtmd_input_chunk * c) { (void)c; return 0; }
static inline const mtmd_image_tokens * mtmd_input_chunk_get_tokens_image(const mtmd_input_chunk * c) { (void)c; return NULL; }
static inline struct mtmd_decoder_pos mtmd_image_tokens_get_decoder_pos(const mtmd_image_tokens * t, llama_pos p, size_t i) {
    struct mtmd_decoder_pos d = {0, 0, 0, 0}; (void)t; (void)p; (void)i; return d;
}
static inline int32_t mtmd_tokenize(const mtmd_context * c, mtmd_input_chunks * o, const mtmd_input_text * t,
                                    const mtmd_bitmap * const * b, size_t n) {
    (void)c; (void)o; (void)t; (void)b; (void)n; return 2;
}
static inline int32_t mtmd_tokenize_from_parts(const mtmd_context * c, mtmd_input_chunks * o,
                                               const mtmd_input_part * const * p, size_t n, bool a) {
    (void)c; (void)o; (void)p; (void)n; (void)a; return 2;
}
static inline int32_t mtmd_encode_chunk(mtmd_context * c, const mtmd_input_chunk * k) { (void)c; (void)k; return 1; }
static inline float * mtmd_get_output_embd(mtmd_context * c) { (void)c; return NULL; }
static inline mtmd_helper_init_opt mtmd_helper_init_opt_default(void) { mtmd_helper_init_opt o = {0}; return o; }
static inline struct mtmd_helper_bitmap_wrapper mtmd_helper_bitmap_init_from_buf(
        const mtmd_context * c, const unsigned char * b, size_t n, bool p, mtmd_helper_init_opt o) {
    struct mtmd_helper_bitmap_wrapper w = {NULL, NULL}; (void)c; (void)b; (void)n; (void)p; (void)o; return w;
}
static inline int32_t mtmd_helper_decode_image_chunk(mtmd_context * c, struct llama_context * l, const mtmd_input_chunk * k,
        float * e, llama_pos p, llama_seq_id s, int32_t nb, llama_pos * np, mtmd_helper_post_decode_callback cb, void * ud) {
    (void)c; (void)l; (void)k; (void)e; (void)p; (void)s; (void)nb; (void)np; (void)cb; (void)ud; return 1;
}
static inline void mtmd_helper_log_set(ggml_log_callback cb, void * ud) { (void)cb; (void)ud; }
#endif

/* The projector's encode and an image's decode, on the compute thread (pyllama_compute.h: one
 * OpenMP team for the process).  The projector always goes there: it is milliseconds to seconds
 * of work, so the hand-off costs nothing, and its thread count is the mtmd context's own. */
#include "pyllama_compute.h"

struct pyllama_mtmd_encode_args {
    mtmd_context * ctx;
    const mtmd_input_chunk * chunk;
};

static int32_t pyllama_mtmd_encode_job(void * p) {
    pyllama_mtmd_encode_args * a = (pyllama_mtmd_encode_args *) p;
    return mtmd_encode_chunk(a->ctx, a->chunk);
}

static int32_t pyllama_mtmd_encode_chunk(mtmd_context * ctx, const mtmd_input_chunk * chunk) {
    pyllama_mtmd_encode_args a = { ctx, chunk };
    if (!pyllama_compute_thread_enabled()) {
        return pyllama_mtmd_encode_job(&a);
    }
    return pyllama_compute_run(pyllama_mtmd_encode_job, &a);
}

struct pyllama_mtmd_decode_args {
    mtmd_context * ctx;
    struct llama_context * lctx;
    const mtmd_input_chunk * chunk;
    float * embd;
    llama_pos n_past;
    llama_seq_id seq;
    int32_t n_batch;
    llama_pos * new_n_past;
};

static int32_t pyllama_mtmd_decode_job(void * p) {
    pyllama_mtmd_decode_args * a = (pyllama_mtmd_decode_args *) p;
    return mtmd_helper_decode_image_chunk(a->ctx, a->lctx, a->chunk, a->embd, a->n_past, a->seq, a->n_batch,
                                          a->new_n_past, NULL, NULL);
}

static int32_t pyllama_mtmd_decode_image_chunk(mtmd_context * ctx, struct llama_context * lctx,
                                               const mtmd_input_chunk * chunk, float * embd, llama_pos n_past,
                                               llama_seq_id seq, int32_t n_batch, llama_pos * new_n_past) {
    pyllama_mtmd_decode_args a = { ctx, lctx, chunk, embd, n_past, seq, n_batch, new_n_past };
    if (!pyllama_compute_wanted(lctx)) {
        return pyllama_mtmd_decode_job(&a);
    }
    return pyllama_compute_run(pyllama_mtmd_decode_job, &a);
}

#endif /* PYLLAMA_MTMD_H */
