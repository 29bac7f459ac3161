// llama.cpp's own reference path for a multimodal prompt, for tests that compare pyllama's
// engine with it (built by tests/native_tools.py: build_mtmd_reference()).
//
//   mtmd_reference MODEL MMPROJ IMAGE_FILE PROMPT N_PREDICT
//
// PROMPT holds mtmd_default_marker() ("<__media__>") where the image goes.  The program
// uses only llama.h, mtmd.h and mtmd-helper.h: it loads the model (CPU) and the projector
// (use_gpu = false, no warm-up), loads the image with mtmd_helper_bitmap_init_from_file,
// tokenizes with mtmd_tokenize (add_special and parse_special true), evaluates every chunk
// with mtmd_helper_eval_chunks(ctx, lctx, chunks, 0, 0, n_batch, true, &new_n_past) -- the
// helper that knows M-RoPE image positions (t, x, y) and that an image advances the position
// by n_pos, not n_tokens -- then greedy-decodes N_PREDICT tokens itself: token i is the argmax
// of llama_get_logits_ith(lctx, -1) and is decoded (1-token batch, seq 0) at position
// new_n_past + i.  No end-of-generation check: always N_PREDICT ids.
//
// Output: one line of JSON on stdout,
//   {"n_past_after_prompt": P, "seq_pos_max": M, "n_vocab": V, "use_mrope": bool,
//    "chunks": [{"type": "text", "n_tokens": n, "n_pos": p, "ids": [...]},
//               {"type": "image", "n_tokens": n, "n_pos": p, "nx": x, "ny": y}, ...],
//    "tokens": [greedy ids], "first_logits": [the first 8 logits after the prompt]}
// where seq_pos_max is llama_memory_seq_pos_max(memory, 0) right after the prompt.
// Exit status 0 on success; on any failure a message on stderr and a non-zero status.
// Settings: n_ctx 512, n_batch 512, 1 thread, logging silenced (llama_log_set and
// mtmd_helper_log_set to a no-op).

#include "llama.h"
#include "mtmd.h"
#include "mtmd-helper.h"

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

constexpr int N_CTX = 512;
constexpr int N_BATCH = 512;
constexpr int N_FIRST_LOGITS = 8;

void quiet_log(enum ggml_log_level, const char *, void *) {}

int fail(const char * msg) {
    std::fprintf(stderr, "mtmd_reference: %s\n", msg);
    return 1;
}

void put_float(std::string & out, float v) {
    if (!std::isfinite(v)) {
        out += "null";
        return;
    }
    char buf[64];
    std::snprintf(buf, sizeof(buf), "%.9g", (double) v);
    out += buf;
}

void put_ints(std::string & out, const llama_token * ids, size_t n) {
    out += '[';
    for (size_t i = 0; i < n; ++i) {
        if (i) out += ", ";
        out += std::to_string(ids[i]);
    }
    out += ']';
}

llama_token argmax(const float * logits, int n_vocab) {
    int best = 0;
    for (int i = 1; i < n_vocab; ++i) {
        if (logits[i] > logits[best]) best = i;
    }
    return best;
}

// Owns everything, freed in reverse order whatever path main() returns by.
struct resources {
    llama_model * model = nullptr;
    llama_context * lctx = nullptr;
    mtmd_context * mctx = nullptr;
    mtmd_bitmap * bitmap = nullptr;
    mtmd_input_chunks * chunks = nullptr;
    llama_batch batch{};
    bool batch_alloc = false;

    ~resources() {
        if (batch_alloc) llama_batch_free(batch);
        if (chunks) mtmd_input_chunks_free(chunks);
        if (bitmap) mtmd_bitmap_free(bitmap);
        if (mctx) mtmd_free(mctx);
        if (lctx) llama_free(lctx);
        if (model) llama_model_free(model);
    }
};

int run(int argc, char ** argv) {
    if (argc != 6) {
        std::fprintf(stderr, "usage: %s MODEL MMPROJ IMAGE_FILE PROMPT N_PREDICT\n",
                     argc > 0 ? argv[0] : "mtmd_reference");
        return 2;
    }
    const char * model_path = argv[1];
    const char * mmproj_path = argv[2];
    const char * image_path = argv[3];
    const std::string prompt = argv[4];
    char * end = nullptr;
    errno = 0;
    const long n_predict = std::strtol(argv[5], &end, 10);
    if (errno || end == argv[5] || *end || n_predict < 0 || n_predict > N_CTX) {
        return fail("N_PREDICT must be an integer in [0, 512]");
    }

    llama_log_set(quiet_log, nullptr);
    mtmd_helper_log_set(quiet_log, nullptr);  // also mtmd_log_set
    llama_backend_init();

    resources r;

    llama_model_params mparams = llama_model_default_params();
    mparams.n_gpu_layers = 0;
    r.model = llama_model_load_from_file(model_path, mparams);
    if (!r.model) return fail("failed to load the model");

    llama_context_params cparams = llama_context_default_params();
    cparams.n_ctx = N_CTX;
    cparams.n_batch = N_BATCH;
    cparams.n_threads = 1;
    cparams.n_threads_batch = 1;
    cparams.no_perf = true;
    r.lctx = llama_init_from_model(r.model, cparams);
    if (!r.lctx) return fail("failed to create the llama context");

    mtmd_context_params pparams = mtmd_context_params_default();
    pparams.use_gpu = false;
    pparams.print_timings = false;
    pparams.n_threads = 1;
    pparams.warmup = false;
    r.mctx = mtmd_init_from_file(mmproj_path, r.model, pparams);
    if (!r.mctx) return fail("mtmd_init_from_file failed");

    mtmd_helper_bitmap_wrapper bw = mtmd_helper_bitmap_init_from_file(r.mctx, image_path, false,
                                                                      mtmd_helper_init_opt_default());
    r.bitmap = bw.bitmap;
    if (bw.video_ctx) {
        mtmd_helper_video_free(bw.video_ctx);
        return fail("IMAGE_FILE is a video, not an image");
    }
    if (!r.bitmap) return fail("failed to load the image");

    r.chunks = mtmd_input_chunks_init();
    if (!r.chunks) return fail("mtmd_input_chunks_init failed");
    mtmd_input_text text;
    text.text = prompt.c_str();
    text.text_len = prompt.size();
    text.add_special = true;
    text.parse_special = true;
    const mtmd_bitmap * bitmaps[] = {r.bitmap};
    const int32_t tok_res = mtmd_tokenize(r.mctx, r.chunks, &text, bitmaps, 1);
    if (tok_res != 0) {
        std::fprintf(stderr, "mtmd_reference: mtmd_tokenize failed (%d)\n", tok_res);
        return 1;
    }

    std::string chunks_json = "[";
    const size_t n_chunks = mtmd_input_chunks_size(r.chunks);
    for (size_t i = 0; i < n_chunks; ++i) {
        const mtmd_input_chunk * chunk = mtmd_input_chunks_get(r.chunks, i);
        const auto type = mtmd_input_chunk_get_type(chunk);
        if (i) chunks_json += ", ";
        chunks_json += "{\"type\": ";
        chunks_json += type == MTMD_INPUT_CHUNK_TYPE_TEXT    ? "\"text\""
                     : type == MTMD_INPUT_CHUNK_TYPE_IMAGE ? "\"image\""
                                                           : "\"audio\"";
        chunks_json += ", \"n_tokens\": " + std::to_string(mtmd_input_chunk_get_n_tokens(chunk));
        chunks_json += ", \"n_pos\": " + std::to_string(mtmd_input_chunk_get_n_pos(chunk));
        if (type == MTMD_INPUT_CHUNK_TYPE_TEXT) {
            size_t n = 0;
            const llama_token * ids = mtmd_input_chunk_get_tokens_text(chunk, &n);
            chunks_json += ", \"ids\": ";
            put_ints(chunks_json, ids, n);
        } else if (type == MTMD_INPUT_CHUNK_TYPE_IMAGE) {
            const mtmd_image_tokens * img = mtmd_input_chunk_get_tokens_image(chunk);
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
            chunks_json += ", \"nx\": " + std::to_string(mtmd_image_tokens_get_nx(img));
            chunks_json += ", \"ny\": " + std::to_string(mtmd_image_tokens_get_ny(img));
#pragma GCC diagnostic pop
        }
        chunks_json += '}';
    }
    chunks_json += ']';

    llama_pos new_n_past = 0;
    const int32_t eval_res = mtmd_helper_eval_chunks(r.mctx, r.lctx, r.chunks, 0, 0, N_BATCH, true, &new_n_past);
    if (eval_res != 0) {
        std::fprintf(stderr, "mtmd_reference: mtmd_helper_eval_chunks failed (%d)\n", eval_res);
        return 1;
    }
    const llama_pos seq_pos_max = llama_memory_seq_pos_max(llama_get_memory(r.lctx), 0);

    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(r.model));
    const float * logits = llama_get_logits_ith(r.lctx, -1);
    if (!logits) return fail("no logits after the prompt");
    std::string first_logits = "[";
    for (int i = 0; i < N_FIRST_LOGITS && i < n_vocab; ++i) {
        if (i) first_logits += ", ";
        put_float(first_logits, logits[i]);
    }
    first_logits += ']';

    r.batch = llama_batch_init(1, 0, 1);
    r.batch_alloc = true;
    std::vector<llama_token> generated;
    for (long i = 0; i < n_predict; ++i) {
        const llama_token tok = argmax(logits, n_vocab);
        generated.push_back(tok);
        if (i + 1 == n_predict) break;  // the last token's logits are not needed
        r.batch.n_tokens = 1;
        r.batch.token[0] = tok;
        r.batch.pos[0] = new_n_past + (llama_pos) i;
        r.batch.n_seq_id[0] = 1;
        r.batch.seq_id[0][0] = 0;
        r.batch.logits[0] = 1;
        const int32_t dec = llama_decode(r.lctx, r.batch);
        if (dec != 0) {
            std::fprintf(stderr, "mtmd_reference: llama_decode failed (%d) at generated token %ld\n", dec, i);
            return 1;
        }
        logits = llama_get_logits_ith(r.lctx, -1);
        if (!logits) return fail("no logits after a generated token");
    }

    std::string out = "{\"n_past_after_prompt\": " + std::to_string(new_n_past);
    out += ", \"seq_pos_max\": " + std::to_string(seq_pos_max);
    out += ", \"n_vocab\": " + std::to_string(n_vocab);
    out += std::string(", \"use_mrope\": ") + (mtmd_decode_use_mrope(r.mctx) ? "true" : "false");
    out += ", \"chunks\": " + chunks_json;
    out += ", \"tokens\": ";
    put_ints(out, generated.data(), generated.size());
    out += ", \"first_logits\": " + first_logits + "}\n";
    std::fputs(out.c_str(), stdout);
    std::fflush(stdout);
    return 0;
}

}  // namespace

int main(int argc, char ** argv) {
    const int rc = run(argc, argv);
    llama_backend_free();
    return rc;
}
