/* Where a context's memory lives: llama.cpp's per-buffer-type breakdown (model weights,
 * context = KV/recurrent state, compute buffers), flattened into C structs for Cython.
 * llama.cpp exposes it only as a C++ std::map (src/llama-ext.h, LLAMA_API), hence this file. */
#ifndef PYLLAMA_MEMORY_H
#define PYLLAMA_MEMORY_H

#include <stddef.h>

#include "llama.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    char buffer[128];   /* the buffer type's name ("CPU", "Vulkan0", "CUDA0", "CUDA_Host" ...) */
    char device[128];   /* its device's name, "" when it has none */
    int is_host;        /* the buffer lives in host memory */
    size_t model, context, compute;
} pyllama_memory_entry;

/* Fills up to `cap` entries; returns how many buffer types there are (may exceed cap), or -1
 * when llama.cpp raised. */
int pyllama_memory_breakdown(const struct llama_context * ctx, pyllama_memory_entry * out, int cap);

#ifdef __cplusplus
}
#endif

#endif
