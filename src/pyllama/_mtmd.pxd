# llama.cpp's mtmd library (tools/mtmd/mtmd.h, mtmd-helper.h): images and audio in prompts.
# Declared through src/cxx/pyllama_mtmd.h, which has stand-ins when the build leaves mtmd out
# (-DPYLLAMA_MTMD=OFF); PYLLAMA_HAS_MTMD says which, and _core refuses before calling a stand-in.

from libc.stdint cimport int32_t, uint32_t

from pyllama._llama cimport ggml_log_callback, llama_context, llama_model, llama_pos, llama_seq_id, llama_token


cdef extern from "pyllama_mtmd.h" nogil:
    int PYLLAMA_HAS_MTMD

    enum mtmd_input_chunk_type:
        MTMD_INPUT_CHUNK_TYPE_TEXT
        MTMD_INPUT_CHUNK_TYPE_IMAGE
        MTMD_INPUT_CHUNK_TYPE_AUDIO

    ctypedef struct mtmd_context:
        pass
    ctypedef struct mtmd_bitmap:
        pass
    ctypedef struct mtmd_input_chunk:
        pass
    ctypedef struct mtmd_input_chunks:
        pass

    ctypedef struct mtmd_input_text:
        const char * text
        size_t text_len
        bint add_special
        bint parse_special

    ctypedef struct mtmd_input_part:
        const mtmd_input_text * text
        const mtmd_bitmap * bitmap

    struct mtmd_context_params:
        bint use_gpu
        bint print_timings
        int n_threads
        const char * media_marker
        bint warmup
        int image_min_tokens
        int image_max_tokens

    ctypedef struct mtmd_helper_init_opt:
        pass

    struct mtmd_helper_bitmap_wrapper:
        mtmd_bitmap * bitmap
        void * video_ctx

    const char * mtmd_default_marker()
    mtmd_context_params mtmd_context_params_default()
    mtmd_context * mtmd_init_from_file(const char * mmproj_fname, const llama_model * text_model,
                                       mtmd_context_params ctx_params) except +
    void mtmd_free(mtmd_context * ctx) except +
    bint mtmd_support_vision(const mtmd_context * ctx)
    bint mtmd_support_audio(const mtmd_context * ctx)
    bint mtmd_decode_use_mrope(const mtmd_context * ctx)
    bint mtmd_decode_use_non_causal(const mtmd_context * ctx, const mtmd_input_chunk * chunk)
    int mtmd_get_audio_sample_rate(const mtmd_context * ctx)

    mtmd_bitmap * mtmd_bitmap_init(uint32_t nx, uint32_t ny, const unsigned char * data) except +
    mtmd_bitmap * mtmd_bitmap_init_from_audio(size_t n_samples, const float * data) except +
    uint32_t mtmd_bitmap_get_nx(const mtmd_bitmap * bitmap)
    uint32_t mtmd_bitmap_get_ny(const mtmd_bitmap * bitmap)
    size_t mtmd_bitmap_get_n_bytes(const mtmd_bitmap * bitmap)
    bint mtmd_bitmap_is_audio(const mtmd_bitmap * bitmap)
    void mtmd_bitmap_free(mtmd_bitmap * bitmap)
    const char * mtmd_bitmap_get_id(const mtmd_bitmap * bitmap)
    void mtmd_bitmap_set_id(mtmd_bitmap * bitmap, const char * id) except +

    mtmd_input_chunks * mtmd_input_chunks_init() except +
    size_t mtmd_input_chunks_size(const mtmd_input_chunks * chunks)
    const mtmd_input_chunk * mtmd_input_chunks_get(const mtmd_input_chunks * chunks, size_t idx)
    void mtmd_input_chunks_free(mtmd_input_chunks * chunks)
    mtmd_input_chunk_type mtmd_input_chunk_get_type(const mtmd_input_chunk * chunk)
    const llama_token * mtmd_input_chunk_get_tokens_text(const mtmd_input_chunk * chunk, size_t * n_tokens_output)
    size_t mtmd_input_chunk_get_n_tokens(const mtmd_input_chunk * chunk)
    const char * mtmd_input_chunk_get_id(const mtmd_input_chunk * chunk)
    llama_pos mtmd_input_chunk_get_n_pos(const mtmd_input_chunk * chunk)
    ctypedef struct mtmd_image_tokens:
        pass
    struct mtmd_decoder_pos:
        uint32_t t
        uint32_t x
        uint32_t y
        uint32_t z
    const mtmd_image_tokens * mtmd_input_chunk_get_tokens_image(const mtmd_input_chunk * chunk)
    mtmd_decoder_pos mtmd_image_tokens_get_decoder_pos(const mtmd_image_tokens * image_tokens, llama_pos pos_0,
                                                       size_t i)

    int32_t mtmd_tokenize(const mtmd_context * ctx, mtmd_input_chunks * output, const mtmd_input_text * text,
                          const mtmd_bitmap * const * bitmaps, size_t n_bitmaps) except +
    int32_t mtmd_tokenize_from_parts(const mtmd_context * ctx, mtmd_input_chunks * output,
                                     const mtmd_input_part * const * parts, size_t n_parts, bint add_special) except +
    int32_t mtmd_encode_chunk(mtmd_context * ctx, const mtmd_input_chunk * chunk) except +
    float * mtmd_get_output_embd(mtmd_context * ctx)

    mtmd_helper_init_opt mtmd_helper_init_opt_default()
    mtmd_helper_bitmap_wrapper mtmd_helper_bitmap_init_from_buf(const mtmd_context * ctx, const unsigned char * buf,
                                                                size_t len, bint placeholder,
                                                                mtmd_helper_init_opt opt) except +
    ctypedef int32_t (*mtmd_helper_post_decode_callback)(const void * batch, void * user_data)
    int32_t mtmd_helper_decode_image_chunk(mtmd_context * ctx, llama_context * lctx, const mtmd_input_chunk * chunk,
                                           float * encoded_embd, llama_pos n_past, llama_seq_id seq_id,
                                           int32_t n_batch, llama_pos * new_n_past,
                                           mtmd_helper_post_decode_callback callback, void * user_data) except +
    void mtmd_helper_log_set(ggml_log_callback log_callback, void * user_data)
    # pyllama_mtmd.h: the two above on the compute thread (pyllama_compute.h)
    int32_t pyllama_mtmd_encode_chunk(mtmd_context * ctx, const mtmd_input_chunk * chunk) except +
    int32_t pyllama_mtmd_decode_image_chunk(mtmd_context * ctx, llama_context * lctx, const mtmd_input_chunk * chunk,
                                            float * encoded_embd, llama_pos n_past, llama_seq_id seq_id,
                                            int32_t n_batch, llama_pos * new_n_past) except +
