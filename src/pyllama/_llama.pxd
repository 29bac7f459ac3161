# Raw C declarations of the parts of llama.h / ggml*.h that pyllama uses.
# Nothing but declarations lives here; the cdef classes are in _core.pyx.

from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdio cimport FILE
from libcpp cimport bool as cpp_bool   # _core is compiled as C++ (see CMakeLists.txt)


cdef extern from "ggml.h" nogil:
    cdef enum ggml_log_level:
        GGML_LOG_LEVEL_NONE
        GGML_LOG_LEVEL_DEBUG
        GGML_LOG_LEVEL_INFO
        GGML_LOG_LEVEL_WARN
        GGML_LOG_LEVEL_ERROR
        GGML_LOG_LEVEL_CONT

    ctypedef void (*ggml_log_callback)(ggml_log_level level, const char * text, void * user_data) noexcept
    ctypedef cpp_bool (*ggml_abort_callback)(void * data) noexcept

    cdef enum ggml_type:
        GGML_TYPE_F32
        GGML_TYPE_F16
        GGML_TYPE_Q4_0
        GGML_TYPE_Q4_1
        GGML_TYPE_Q5_0
        GGML_TYPE_Q5_1
        GGML_TYPE_Q8_0
        GGML_TYPE_BF16
        GGML_TYPE_COUNT

    const char * ggml_type_name(ggml_type type) except +


cdef extern from "ggml-backend.h" nogil:
    ctypedef struct ggml_backend_device
    ctypedef ggml_backend_device * ggml_backend_dev_t
    ctypedef struct ggml_backend_reg
    ctypedef ggml_backend_reg * ggml_backend_reg_t

    cdef enum ggml_backend_dev_type:
        GGML_BACKEND_DEVICE_TYPE_CPU
        GGML_BACKEND_DEVICE_TYPE_GPU
        GGML_BACKEND_DEVICE_TYPE_IGPU
        GGML_BACKEND_DEVICE_TYPE_ACCEL

    size_t ggml_backend_reg_count() except +
    ggml_backend_reg_t ggml_backend_reg_get(size_t index) except +
    const char * ggml_backend_reg_name(ggml_backend_reg_t reg) except +
    size_t ggml_backend_reg_dev_count(ggml_backend_reg_t reg) except +
    ggml_backend_dev_t ggml_backend_reg_dev_get(ggml_backend_reg_t reg, size_t index) except +

    size_t ggml_backend_dev_count() except +
    ggml_backend_dev_t ggml_backend_dev_get(size_t index) except +
    ggml_backend_dev_t ggml_backend_dev_by_name(const char * name) except +
    const char * ggml_backend_dev_name(ggml_backend_dev_t device) except +
    const char * ggml_backend_dev_description(ggml_backend_dev_t device) except +
    void ggml_backend_dev_memory(ggml_backend_dev_t device, size_t * free, size_t * total) except +
    ggml_backend_dev_type ggml_backend_dev_get_type "ggml_backend_dev_type"(ggml_backend_dev_t device) except +
    ggml_backend_reg_t ggml_backend_dev_backend_reg(ggml_backend_dev_t device) except +

    void ggml_backend_load_all() except +
    void ggml_backend_load_all_from_path(const char * dir_path) except +
    void ggml_backend_device_register(ggml_backend_dev_t device) except +
    void ggml_backend_register(ggml_backend_reg_t reg) except +


cdef extern from "ggml-cpu.h" nogil:
    pass


cdef extern from "gguf.h" nogil:
    # types that can be stored as GGUF key/value data (pyllama_checks.cpp uses the same enum)
    cdef enum gguf_type:
        GGUF_TYPE_UINT8
        GGUF_TYPE_INT8
        GGUF_TYPE_UINT16
        GGUF_TYPE_INT16
        GGUF_TYPE_UINT32
        GGUF_TYPE_INT32
        GGUF_TYPE_FLOAT32
        GGUF_TYPE_BOOL
        GGUF_TYPE_STRING
        GGUF_TYPE_ARRAY
        GGUF_TYPE_UINT64
        GGUF_TYPE_INT64
        GGUF_TYPE_FLOAT64
        GGUF_TYPE_COUNT

    cdef struct ggml_context:
        pass
    cdef struct gguf_context:
        pass
    cdef struct gguf_init_params:
        cpp_bool no_alloc
        ggml_context ** ctx
    gguf_context * gguf_init_from_file(const char * fname, gguf_init_params params) except +
    void gguf_free(gguf_context * ctx) except +
    int64_t gguf_find_key(const gguf_context * ctx, const char * key) except +
    gguf_type gguf_get_kv_type(const gguf_context * ctx, int64_t key_id) except +
    gguf_type gguf_get_arr_type(const gguf_context * ctx, int64_t key_id) except +
    size_t gguf_get_arr_n(const gguf_context * ctx, int64_t key_id) except +
    const void * gguf_get_arr_data(const gguf_context * ctx, int64_t key_id) except +
    const void * gguf_get_val_data(const gguf_context * ctx, int64_t key_id) except +
    const char * gguf_get_val_str(const gguf_context * ctx, int64_t key_id) except +
    const char * gguf_get_arr_str(const gguf_context * ctx, int64_t key_id, size_t i) except +
    int64_t gguf_get_n_kv(const gguf_context * ctx) except +
    const char * gguf_get_key(const gguf_context * ctx, int64_t key_id) except +
    int64_t gguf_get_n_tensors(const gguf_context * ctx) except +
    const char * gguf_get_tensor_name(const gguf_context * ctx, int64_t tensor_id) except +
    ggml_type gguf_get_tensor_type(const gguf_context * ctx, int64_t tensor_id) except +


cdef extern from "llama.h" nogil:
    ctypedef int32_t llama_pos
    ctypedef int32_t llama_token
    ctypedef int32_t llama_seq_id

    cdef struct llama_vocab
    cdef struct llama_model
    cdef struct llama_context
    cdef struct llama_memory_i
    ctypedef llama_memory_i * llama_memory_t
    cdef struct llama_adapter_lora

    cdef int LLAMA_DEFAULT_SEED
    cdef int LLAMA_TOKEN_NULL

    cdef enum llama_vocab_type:
        LLAMA_VOCAB_TYPE_NONE
        LLAMA_VOCAB_TYPE_SPM
        LLAMA_VOCAB_TYPE_BPE
        LLAMA_VOCAB_TYPE_WPM
        LLAMA_VOCAB_TYPE_UGM
        LLAMA_VOCAB_TYPE_RWKV
        LLAMA_VOCAB_TYPE_PLAMO2

    cdef enum llama_token_attr:
        LLAMA_TOKEN_ATTR_UNDEFINED
        LLAMA_TOKEN_ATTR_UNKNOWN
        LLAMA_TOKEN_ATTR_UNUSED
        LLAMA_TOKEN_ATTR_NORMAL
        LLAMA_TOKEN_ATTR_CONTROL
        LLAMA_TOKEN_ATTR_USER_DEFINED
        LLAMA_TOKEN_ATTR_BYTE

    cdef enum llama_ftype:
        LLAMA_FTYPE_ALL_F32

    cdef enum llama_rope_scaling_type:
        LLAMA_ROPE_SCALING_TYPE_UNSPECIFIED

    cdef enum llama_pooling_type:
        LLAMA_POOLING_TYPE_UNSPECIFIED
        LLAMA_POOLING_TYPE_NONE
        LLAMA_POOLING_TYPE_MEAN
        LLAMA_POOLING_TYPE_CLS
        LLAMA_POOLING_TYPE_LAST
        LLAMA_POOLING_TYPE_RANK

    cdef enum llama_attention_type:
        LLAMA_ATTENTION_TYPE_UNSPECIFIED

    cdef enum llama_flash_attn_type:
        LLAMA_FLASH_ATTN_TYPE_AUTO
        LLAMA_FLASH_ATTN_TYPE_DISABLED
        LLAMA_FLASH_ATTN_TYPE_ENABLED

    cdef enum llama_split_mode:
        LLAMA_SPLIT_MODE_NONE
        LLAMA_SPLIT_MODE_LAYER
        LLAMA_SPLIT_MODE_ROW

    cdef enum llama_load_mode:
        LLAMA_LOAD_MODE_AUTO
        LLAMA_LOAD_MODE_NONE
        LLAMA_LOAD_MODE_MMAP
        LLAMA_LOAD_MODE_MLOCK
        LLAMA_LOAD_MODE_MMAP_MLOCK

    ctypedef struct llama_token_data:
        llama_token id
        float logit
        float p

    ctypedef struct llama_token_data_array:
        llama_token_data * data
        size_t size
        int64_t selected
        bint sorted

    ctypedef cpp_bool (*llama_progress_callback)(float progress, void * user_data) noexcept

    ctypedef struct llama_batch:
        int32_t n_tokens
        llama_token * token
        float * embd
        llama_pos * pos
        int32_t * n_seq_id
        llama_seq_id ** seq_id
        int8_t * logits

    cdef enum llama_model_kv_override_type:
        LLAMA_KV_OVERRIDE_TYPE_INT
        LLAMA_KV_OVERRIDE_TYPE_FLOAT
        LLAMA_KV_OVERRIDE_TYPE_BOOL
        LLAMA_KV_OVERRIDE_TYPE_STR

    cdef struct llama_model_kv_override:
        llama_model_kv_override_type tag
        char key[128]
        int64_t val_i64
        double val_f64
        bint val_bool
        char val_str[128]

    cdef struct llama_model_params:
        ggml_backend_dev_t * devices
        int32_t n_gpu_layers
        llama_split_mode split_mode
        llama_load_mode load_mode
        int32_t main_gpu
        const float * tensor_split
        llama_progress_callback progress_callback
        void * progress_callback_user_data
        const llama_model_kv_override * kv_overrides
        bint vocab_only
        bint check_tensors
        bint use_extra_bufts
        bint no_host
        bint no_alloc

    cdef struct llama_context_params:
        uint32_t n_ctx
        uint32_t n_batch
        uint32_t n_ubatch
        uint32_t n_seq_max
        int32_t n_threads
        int32_t n_threads_batch
        llama_rope_scaling_type rope_scaling_type
        llama_pooling_type pooling_type
        llama_attention_type attention_type
        llama_flash_attn_type flash_attn_type
        float rope_freq_base
        float rope_freq_scale
        float yarn_ext_factor
        float yarn_attn_factor
        float yarn_beta_fast
        float yarn_beta_slow
        uint32_t yarn_orig_ctx
        ggml_type type_k
        ggml_type type_v
        ggml_abort_callback abort_callback
        void * abort_callback_data
        bint embeddings
        bint offload_kqv
        bint no_perf
        bint op_offload
        bint swa_full
        bint kv_unified

    ctypedef struct llama_logit_bias:
        llama_token token
        float bias

    ctypedef struct llama_sampler_chain_params:
        bint no_perf

    ctypedef struct llama_chat_message:
        const char * role
        const char * content

    cdef struct llama_sampler:
        pass

    const char * llama_version() except +
    llama_model_params llama_model_default_params() except +
    llama_context_params llama_context_default_params() except +
    llama_sampler_chain_params llama_sampler_chain_default_params() except +

    void llama_backend_init() except +
    void llama_backend_free() except +

    llama_model * llama_model_load_from_file(const char * path_model, llama_model_params params) except +
    void llama_model_free(llama_model * model) except +
    llama_context * llama_init_from_model(llama_model * model, llama_context_params params) except +
    void llama_free(llama_context * ctx) except +

    int64_t llama_time_us() except +
    size_t llama_max_devices() except +
    size_t llama_max_parallel_sequences() except +
    bint llama_supports_mmap() except +
    bint llama_supports_mlock() except +
    bint llama_supports_gpu_offload() except +
    bint llama_supports_rpc() except +

    uint32_t llama_n_ctx(const llama_context * ctx) except +
    uint32_t llama_n_ctx_seq(const llama_context * ctx) except +
    uint32_t llama_n_batch(const llama_context * ctx) except +
    uint32_t llama_n_ubatch(const llama_context * ctx) except +
    uint32_t llama_n_seq_max(const llama_context * ctx) except +

    const llama_model * llama_get_model(const llama_context * ctx) except +
    llama_memory_t llama_get_memory(const llama_context * ctx) except +
    llama_pooling_type llama_get_pooling_type "llama_pooling_type"(const llama_context * ctx) except +

    const llama_vocab * llama_model_get_vocab(const llama_model * model) except +
    int32_t llama_model_n_ctx_train(const llama_model * model) except +
    int32_t llama_model_n_embd(const llama_model * model) except +
    int32_t llama_model_n_embd_out(const llama_model * model) except +
    int32_t llama_model_n_embd_inp(const llama_model * model) except +
    uint32_t llama_model_n_cls_out(const llama_model * model) except +
    int32_t llama_model_n_layer(const llama_model * model) except +
    int32_t llama_model_n_head(const llama_model * model) except +
    int32_t llama_model_n_head_kv(const llama_model * model) except +
    int32_t llama_model_n_swa(const llama_model * model) except +
    float llama_model_rope_freq_scale_train(const llama_model * model) except +

    llama_vocab_type llama_vocab_get_type "llama_vocab_type"(const llama_vocab * vocab) except +
    int32_t llama_vocab_n_tokens(const llama_vocab * vocab) except +

    int32_t llama_model_meta_val_str(const llama_model * model, const char * key, char * buf, size_t buf_size) except +
    int32_t llama_model_meta_count(const llama_model * model) except +
    int32_t llama_model_meta_key_by_index(const llama_model * model, int32_t i, char * buf, size_t buf_size) except +
    int32_t llama_model_meta_val_str_by_index(const llama_model * model, int32_t i, char * buf, size_t buf_size) except +
    int32_t llama_model_desc(const llama_model * model, char * buf, size_t buf_size) except +
    llama_ftype llama_model_ftype(const llama_model * model) except +
    const char * llama_ftype_name(llama_ftype ftype) except +
    uint64_t llama_model_size(const llama_model * model) except +
    const char * llama_model_chat_template(const llama_model * model, const char * name) except +
    uint64_t llama_model_n_params(const llama_model * model) except +
    bint llama_model_has_encoder(const llama_model * model) except +
    bint llama_model_has_decoder(const llama_model * model) except +
    llama_token llama_model_decoder_start_token(const llama_model * model) except +
    bint llama_model_is_recurrent(const llama_model * model) except +

    llama_adapter_lora * llama_adapter_lora_init(llama_model * model, const char * path_lora) except +
    void llama_adapter_lora_free(llama_adapter_lora * adapter) except +
    int32_t llama_set_adapters_lora(llama_context * ctx, llama_adapter_lora ** adapters, size_t n_adapters, float * scales) except +

    void llama_memory_clear(llama_memory_t mem, bint data) except +
    bint llama_memory_seq_rm(llama_memory_t mem, llama_seq_id seq_id, llama_pos p0, llama_pos p1) except +
    void llama_memory_seq_cp(llama_memory_t mem, llama_seq_id seq_id_src, llama_seq_id seq_id_dst, llama_pos p0, llama_pos p1) except +
    void llama_memory_seq_keep(llama_memory_t mem, llama_seq_id seq_id) except +
    void llama_memory_seq_add(llama_memory_t mem, llama_seq_id seq_id, llama_pos p0, llama_pos p1, llama_pos delta) except +
    void llama_memory_seq_div(llama_memory_t mem, llama_seq_id seq_id, llama_pos p0, llama_pos p1, int d) except +
    llama_pos llama_memory_seq_pos_min(llama_memory_t mem, llama_seq_id seq_id) except +
    llama_pos llama_memory_seq_pos_max(llama_memory_t mem, llama_seq_id seq_id) except +
    bint llama_memory_can_shift(llama_memory_t mem) except +

    size_t llama_state_get_size(llama_context * ctx) except +
    size_t llama_state_get_data(llama_context * ctx, uint8_t * dst, size_t size) except +
    size_t llama_state_set_data(llama_context * ctx, const uint8_t * src, size_t size) except +
    bint llama_state_load_file(llama_context * ctx, const char * path_session, llama_token * tokens_out,
                               size_t n_token_capacity, size_t * n_token_count_out) except +
    bint llama_state_save_file(llama_context * ctx, const char * path_session, const llama_token * tokens,
                               size_t n_token_count) except +
    size_t llama_state_seq_get_size(llama_context * ctx, llama_seq_id seq_id) except +
    size_t llama_state_seq_get_data(llama_context * ctx, uint8_t * dst, size_t size, llama_seq_id seq_id) except +
    size_t llama_state_seq_set_data(llama_context * ctx, const uint8_t * src, size_t size, llama_seq_id dest_seq_id) except +
    size_t llama_state_seq_save_file(llama_context * ctx, const char * filepath, llama_seq_id seq_id,
                                     const llama_token * tokens, size_t n_token_count) except +
    size_t llama_state_seq_load_file(llama_context * ctx, const char * filepath, llama_seq_id dest_seq_id,
                                     llama_token * tokens_out, size_t n_token_capacity, size_t * n_token_count_out) except +

    llama_batch llama_batch_init(int32_t n_tokens, int32_t embd, int32_t n_seq_max) except +
    void llama_batch_free(llama_batch batch) except +
    int32_t llama_encode(llama_context * ctx, llama_batch batch) except +
    int32_t llama_decode(llama_context * ctx, llama_batch batch) except +

    void llama_set_n_threads(llama_context * ctx, int32_t n_threads, int32_t n_threads_batch) except +
    int32_t llama_n_threads(llama_context * ctx) except +
    int32_t llama_n_threads_batch(llama_context * ctx) except +
    void llama_set_embeddings(llama_context * ctx, bint embeddings) except +
    void llama_set_causal_attn(llama_context * ctx, bint causal_attn) except +
    void llama_set_abort_callback(llama_context * ctx, ggml_abort_callback abort_callback, void * abort_callback_data) except +
    void llama_synchronize(llama_context * ctx) except +

    float * llama_get_logits(llama_context * ctx) except +
    float * llama_get_logits_ith(llama_context * ctx, int32_t i) except +
    float * llama_get_embeddings(llama_context * ctx) except +
    float * llama_get_embeddings_ith(llama_context * ctx, int32_t i) except +
    float * llama_get_embeddings_seq(llama_context * ctx, llama_seq_id seq_id) except +

    const char * llama_vocab_get_text(const llama_vocab * vocab, llama_token token) except +
    float llama_vocab_get_score(const llama_vocab * vocab, llama_token token) except +
    llama_token_attr llama_vocab_get_attr(const llama_vocab * vocab, llama_token token) except +
    bint llama_vocab_is_eog(const llama_vocab * vocab, llama_token token) except +
    bint llama_vocab_is_control(const llama_vocab * vocab, llama_token token) except +
    llama_token llama_vocab_bos(const llama_vocab * vocab) except +
    llama_token llama_vocab_eos(const llama_vocab * vocab) except +
    llama_token llama_vocab_eot(const llama_vocab * vocab) except +
    llama_token llama_vocab_sep(const llama_vocab * vocab) except +
    llama_token llama_vocab_nl(const llama_vocab * vocab) except +
    llama_token llama_vocab_pad(const llama_vocab * vocab) except +
    llama_token llama_vocab_mask(const llama_vocab * vocab) except +
    bint llama_vocab_get_add_bos(const llama_vocab * vocab) except +
    bint llama_vocab_get_add_eos(const llama_vocab * vocab) except +
    bint llama_vocab_get_add_sep(const llama_vocab * vocab) except +
    llama_token llama_vocab_fim_pre(const llama_vocab * vocab) except +
    llama_token llama_vocab_fim_suf(const llama_vocab * vocab) except +
    llama_token llama_vocab_fim_mid(const llama_vocab * vocab) except +
    llama_token llama_vocab_fim_pad(const llama_vocab * vocab) except +
    llama_token llama_vocab_fim_rep(const llama_vocab * vocab) except +
    llama_token llama_vocab_fim_sep(const llama_vocab * vocab) except +

    int32_t llama_tokenize(const llama_vocab * vocab, const char * text, int32_t text_len, llama_token * tokens,
                           int32_t n_tokens_max, bint add_special, bint parse_special) except +
    int32_t llama_token_to_piece(const llama_vocab * vocab, llama_token token, char * buf, int32_t length,
                                 int32_t lstrip, bint special) except +
    int32_t llama_detokenize(const llama_vocab * vocab, const llama_token * tokens, int32_t n_tokens, char * text,
                             int32_t text_len_max, bint remove_special, bint unparse_special) except +

    int32_t llama_chat_apply_template(const char * tmpl, const llama_chat_message * chat, size_t n_msg,
                                      bint add_ass, char * buf, int32_t length) except +
    int32_t llama_chat_builtin_templates(const char ** output, size_t len) except +

    const char * llama_sampler_name(const llama_sampler * smpl) except +
    void llama_sampler_accept(llama_sampler * smpl, llama_token token) except +
    void llama_sampler_apply(llama_sampler * smpl, llama_token_data_array * cur_p) except +
    void llama_sampler_reset(llama_sampler * smpl) except +
    llama_sampler * llama_sampler_clone(const llama_sampler * smpl) except +
    void llama_sampler_free(llama_sampler * smpl) except +
    llama_sampler * llama_sampler_chain_init(llama_sampler_chain_params params) except +
    void llama_sampler_chain_add(llama_sampler * chain, llama_sampler * smpl) except +
    llama_sampler * llama_sampler_chain_get(llama_sampler * chain, int32_t i) except +
    int32_t llama_sampler_chain_n(const llama_sampler * chain) except +
    llama_sampler * llama_sampler_init_greedy() except +
    llama_sampler * llama_sampler_init_dist(uint32_t seed) except +
    llama_sampler * llama_sampler_init_top_k(int32_t k) except +
    llama_sampler * llama_sampler_init_top_p(float p, size_t min_keep) except +
    llama_sampler * llama_sampler_init_min_p(float p, size_t min_keep) except +
    llama_sampler * llama_sampler_init_typical(float p, size_t min_keep) except +
    llama_sampler * llama_sampler_init_temp(float t) except +
    llama_sampler * llama_sampler_init_temp_ext(float t, float delta, float exponent) except +
    llama_sampler * llama_sampler_init_xtc(float p, float t, size_t min_keep, uint32_t seed) except +
    llama_sampler * llama_sampler_init_top_n_sigma(float n) except +
    llama_sampler * llama_sampler_init_mirostat(int32_t n_vocab, uint32_t seed, float tau, float eta, int32_t m) except +
    llama_sampler * llama_sampler_init_mirostat_v2(uint32_t seed, float tau, float eta) except +
    llama_sampler * llama_sampler_init_grammar(const llama_vocab * vocab, const char * grammar_str,
                                               const char * grammar_root) except +
    llama_sampler * llama_sampler_init_grammar_lazy_patterns(const llama_vocab * vocab, const char * grammar_str,
                                                             const char * grammar_root,
                                                             const char ** trigger_patterns,
                                                             size_t num_trigger_patterns,
                                                             const llama_token * trigger_tokens,
                                                             size_t num_trigger_tokens) except +
    llama_sampler * llama_sampler_init_penalties(int32_t n_vocab, int32_t penalty_last_n, float penalty_repeat,
                                                 float penalty_freq, float penalty_present) except +
    llama_sampler * llama_sampler_init_dry(const llama_vocab * vocab, float dry_multiplier, float dry_base,
                                           int32_t dry_allowed_length, int32_t dry_penalty_last_n,
                                           const char ** seq_breakers, size_t num_breakers) except +
    llama_sampler * llama_sampler_init_logit_bias(int32_t n_vocab, int32_t n_logit_bias,
                                                  const llama_logit_bias * logit_bias) except +
    uint32_t llama_sampler_get_seed(const llama_sampler * smpl) except +
    llama_token llama_sampler_sample(llama_sampler * smpl, llama_context * ctx, int32_t idx) except +

    const char * llama_print_system_info() except +
    void llama_log_set(ggml_log_callback log_callback, void * user_data) except +

    cdef struct llama_perf_context_data:
        double t_start_ms
        double t_load_ms
        double t_p_eval_ms
        double t_eval_ms
        int32_t n_p_eval
        int32_t n_eval
        int32_t n_reused

    cdef struct llama_perf_sampler_data:
        double t_sample_ms
        int32_t n_sample

    llama_perf_context_data llama_perf_context(const llama_context * ctx) except +
    void llama_perf_context_reset(llama_context * ctx) except +
    llama_perf_sampler_data llama_perf_sampler(const llama_sampler * chain) except +
    void llama_perf_sampler_reset(llama_sampler * chain) except +


# ggml-rpc: linked, loaded at run time (GGML_BACKEND_DL) or absent -- src/cxx/pyllama_rpc.h
# gives the same names in all three builds.
cdef extern from "pyllama_rpc.h":
    int PYLLAMA_RPC_AVAILABLE
    int PYLLAMA_RPC_PROTO_MAJOR
    int PYLLAMA_RPC_PROTO_MINOR
    ggml_backend_reg_t ggml_backend_rpc_add_server(const char * endpoint) except + nogil
    void ggml_backend_rpc_start_server(const char * endpoint, const char * cache_dir, size_t n_threads,
                                       size_t n_devices, ggml_backend_dev_t * devices) except + nogil
    void ggml_backend_rpc_get_device_memory(const char * endpoint, uint32_t device, size_t * free,
                                            size_t * total) except + nogil
