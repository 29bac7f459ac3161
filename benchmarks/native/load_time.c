/* Model load time of the llama.cpp C API, timed around the call (benchmarks/run.py, "startup").
 *
 *   load_time MODEL.gguf [REPEAT]
 *
 * Prints one JSON line per load: {"load_ms": wall time of llama_model_load_from_file}.
 * llama-completion's own "load time" counter is not comparable with a library call timed
 * from outside: it starts after the GGUF metadata was parsed and ends at the first decode.
 * This is what pyllama's Model() and llama-cpp-python's llama_model_load_from_file are
 * measured against: the same C call, with llama.cpp's default parameters (mmap on).
 * Built by benchmarks/setup_native.sh against the same static libraries as the tools. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "llama.h"

static void quiet(enum ggml_log_level level, const char * text, void * user) {
    (void) level; (void) text; (void) user;
}

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

int main(int argc, char ** argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s MODEL.gguf [REPEAT]\n", argv[0]);
        return 2;
    }
    int repeat = argc > 2 ? atoi(argv[2]) : 1;
    llama_log_set(quiet, NULL);
    llama_backend_init();
    for (int i = 0; i < repeat; i++) {
        struct llama_model_params params = llama_model_default_params();
        double t0 = now_ms();
        struct llama_model * model = llama_model_load_from_file(argv[1], params);
        double t1 = now_ms();
        if (model == NULL) {
            fprintf(stderr, "could not load %s\n", argv[1]);
            return 1;
        }
        printf("{\"load_ms\": %.3f}\n", t1 - t0);
        fflush(stdout);
        llama_model_free(model);
    }
    llama_backend_free();
    return 0;
}
