// See pyllama_memory.h.
#include "pyllama_memory.h"

#include <cstring>
#include <exception>

#include "ggml-backend.h"
#include "llama-ext.h"   // llama_get_memory_breakdown (vendored src/, an exported C++ API)

static void copy_name(char * dst, size_t cap, const char * src) {
    if (src == nullptr) src = "";
    std::strncpy(dst, src, cap - 1);
    dst[cap - 1] = '\0';
}

extern "C" int pyllama_memory_breakdown(const struct llama_context * ctx, pyllama_memory_entry * out, int cap) {
    try {
        const llama_memory_breakdown mb = llama_get_memory_breakdown(ctx);
        int n = 0;
        for (const auto & kv : mb) {
            if (n < cap) {
                pyllama_memory_entry & e = out[n];
                ggml_backend_buffer_type_t buft = kv.first;
                ggml_backend_dev_t dev = ggml_backend_buft_get_device(buft);
                copy_name(e.buffer, sizeof(e.buffer), ggml_backend_buft_name(buft));
                copy_name(e.device, sizeof(e.device), dev ? ggml_backend_dev_name(dev) : nullptr);
                e.is_host = ggml_backend_buft_is_host(buft) ? 1 : 0;
                e.model = kv.second.model;
                e.context = kv.second.context;
                e.compute = kv.second.compute;
            }
            n++;
        }
        return n;
    } catch (const std::exception &) {
        return -1;
    }
}
