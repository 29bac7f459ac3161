/* Small C helpers for pyllama._core (declared in src/pyllama/_support.pxi): Ctrl-C during
 * long nogil calls, the abort callback, the last llama.cpp error, UTF-8 scanning, a monotonic
 * clock, the argmax of the logits, and which shared library holds an address.
 *
 * Everything here is `static` (header-only): only the Cython-generated _core.cpp includes it,
 * and the helpers on the per-token path (pyllama_now_ms, pyllama_argmax_f32) stay inlinable. */
#ifndef PYLLAMA_SUPPORT_H
#define PYLLAMA_SUPPORT_H

#include <signal.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "pyllama_config.h"

/* ---- Ctrl-C while the GIL is released ---------------------------------
 * Python's own SIGINT handler only sets a flag that is looked at when the
 * interpreter runs bytecode, which it does not do during a long llama_decode.
 * Around such calls (main thread only) we put a tiny handler in front of
 * Python's: it raises our flag, which ggml's abort callback reads between graph
 * nodes, and then chains to Python's handler so KeyboardInterrupt is raised as
 * usual once we are back with the GIL.  Both handlers only set flags, so this is
 * async-signal-safe. */
static volatile sig_atomic_t pyllama_sigint_seen = 0;
#ifndef _WIN32
static struct sigaction pyllama_prev_sigint;
static int pyllama_sigint_depth = 0;
static void pyllama_on_sigint(int sig) {
    pyllama_sigint_seen = 1;
    if (pyllama_prev_sigint.sa_handler != SIG_DFL && pyllama_prev_sigint.sa_handler != SIG_IGN) {
        pyllama_prev_sigint.sa_handler(sig);
    }
}
static int pyllama_sigint_push(void) {
    /* called with the GIL held, from the main thread only */
    if (pyllama_sigint_depth++ > 0) return 1;
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = pyllama_on_sigint;
    sigemptyset(&sa.sa_mask);
    pyllama_sigint_seen = 0;
    if (sigaction(SIGINT, NULL, &pyllama_prev_sigint) != 0) { pyllama_sigint_depth--; return 0; }
    if ((pyllama_prev_sigint.sa_flags & SA_SIGINFO) || pyllama_prev_sigint.sa_handler == SIG_IGN ||
        pyllama_prev_sigint.sa_handler == SIG_DFL) { pyllama_sigint_depth--; return 0; }
    if (sigaction(SIGINT, &sa, NULL) != 0) { pyllama_sigint_depth--; return 0; }
    return 1;
}
static void pyllama_sigint_pop(void) {
    if (pyllama_sigint_depth <= 0) return;
    if (--pyllama_sigint_depth == 0) sigaction(SIGINT, &pyllama_prev_sigint, NULL);
}
#else
static int pyllama_sigint_push(void) { return 0; }
static void pyllama_sigint_pop(void) {}
#endif

typedef struct {
    volatile int abort_requested;   /* Context.abort() from another thread */
    volatile int watch_sigint;      /* this call installed the SIGINT hook */
} pyllama_abort_state;

static bool pyllama_abort_cb(void * data) {
    pyllama_abort_state * st = (pyllama_abort_state *) data;
    if (st->abort_requested) return true;
    if (st->watch_sigint && pyllama_sigint_seen) return true;
    return false;
}

/* ---- The last error llama.cpp logged on this thread -----------------------
 * Loader failures are reported through the log, not through return values,
 * so the log callback keeps the first ERROR line per thread since the last clear. */
#if defined(_MSC_VER)
#define PYLLAMA_TLS __declspec(thread)
#else
#define PYLLAMA_TLS __thread
#endif
static PYLLAMA_TLS char pyllama_last_error[1024];
static void pyllama_set_last_error(const char * text) {
    /* Keep the FIRST error since the last clear: it names the cause ("tensor ... data is
     * not within the file bounds"); the lines after it only say that loading failed. */
    if (pyllama_last_error[0] != 0) return;
    size_t n = strlen(text);
    while (n > 0 && (text[n-1] == '\n' || text[n-1] == ' ')) n--;
    if (n >= sizeof(pyllama_last_error)) n = sizeof(pyllama_last_error) - 1;
    memcpy(pyllama_last_error, text, n);
    pyllama_last_error[n] = 0;
}
static const char * pyllama_get_last_error(void) { return pyllama_last_error; }
static void pyllama_clear_last_error(void) { pyllama_last_error[0] = 0; }

/* ---- UTF-8 ------------------------------------------------------------------
 * Length of the longest prefix of buf[0:n] that does not end inside an
 * unfinished UTF-8 sequence (so a multi-byte character is never split). */
static size_t pyllama_utf8_complete_len(const char * buf, size_t n) {
    size_t i = n, back = 0;
    while (i > 0 && back < 4) {
        unsigned char c = (unsigned char) buf[i-1];
        if ((c & 0xC0) != 0x80) {           /* a lead byte (or ASCII) */
            size_t need = (c < 0x80) ? 1 : ((c & 0xE0) == 0xC0) ? 2 : ((c & 0xF0) == 0xE0) ? 3 :
                          ((c & 0xF8) == 0xF0) ? 4 : 1;
            return (back + 1 >= need) ? n : i - 1;
        }
        i--; back++;
    }
    return n;  /* only continuation bytes: invalid anyway, let the decoder replace them */
}

/* ---- The generation loop's clock (per token: keep it inline) ---------------- */
static inline double pyllama_now_ms(void) {
#ifdef _WIN32
    return (double) clock() * 1000.0 / CLOCKS_PER_SEC;
#else
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000.0 + ts.tv_nsec / 1e6;
#endif
}

/* ---- Greedy sampling without llama.cpp's candidate array (per token) ----------
 * The first index of the largest value, as llama.cpp's greedy sampler finds it
 * (best = 0; for i: if (x[i] > x[best]) best = i): NaNs never win, ties go to the
 * lowest index.
 *
 * With SSE2 (every x86-64) in two vector passes: the largest value, then the first index
 * holding it.  MAXPS(v, acc) returns acc when v is NaN -- exactly `v > acc ? v : acc` -- so
 * NaNs are skipped as the strict > skips them, and `==` in the second pass treats -0 and +0
 * alike as `>` does.  Compilers do not vectorise the one-pass index scan (a branch per
 * element: ~30 us for a 49k vocabulary, a third of the engine's Python-side work per step at
 * 8 streams); the two passes take a few microseconds.  Elsewhere: 16 independent lanes. */
#if defined(__SSE2__)
#include <emmintrin.h>
#endif
static inline int32_t pyllama_argmax_f32(const float * x, int32_t n) {
    int32_t i = 0, j, best = 0;
    float m;
    if (n <= 0 || x[0] != x[0]) {
        return 0;   /* a NaN first value is never beaten by a strict > */
    }
    m = x[0];
#if defined(__SSE2__)
    {
        __m128 a0 = _mm_set1_ps(m), a1 = a0, a2 = a0, a3 = a0, mv;
        float lanes[4];
        for (; i + 16 <= n; i += 16) {
            a0 = _mm_max_ps(_mm_loadu_ps(x + i), a0);
            a1 = _mm_max_ps(_mm_loadu_ps(x + i + 4), a1);
            a2 = _mm_max_ps(_mm_loadu_ps(x + i + 8), a2);
            a3 = _mm_max_ps(_mm_loadu_ps(x + i + 12), a3);
        }
        _mm_storeu_ps(lanes, _mm_max_ps(_mm_max_ps(a0, a1), _mm_max_ps(a2, a3)));
        for (j = 0; j < 4; j++) {
            if (lanes[j] > m) m = lanes[j];
        }
        for (; i < n; i++) {
            if (x[i] > m) m = x[i];
        }
        mv = _mm_set1_ps(m);
        for (i = 0; i + 16 <= n; i += 16) {
            int any = _mm_movemask_ps(_mm_or_ps(
                _mm_or_ps(_mm_cmpeq_ps(_mm_loadu_ps(x + i), mv), _mm_cmpeq_ps(_mm_loadu_ps(x + i + 4), mv)),
                _mm_or_ps(_mm_cmpeq_ps(_mm_loadu_ps(x + i + 8), mv), _mm_cmpeq_ps(_mm_loadu_ps(x + i + 12), mv))));
            if (any) break;
        }
        for (; i < n; i++) {
            if (x[i] == m) return i;
        }
        return 0;   /* not reached: m is one of the values */
    }
#else
    {
        float lane_max[16];
        int32_t lane_idx[16];
        for (j = 0; j < 16; j++) { lane_max[j] = x[0]; lane_idx[j] = 0; }
        for (; i + 16 <= n; i += 16) {
            for (j = 0; j < 16; j++) {
                float v = x[i + j];
                int gt = v > lane_max[j];
                lane_max[j] = gt ? v : lane_max[j];
                lane_idx[j] = gt ? i + j : lane_idx[j];
            }
        }
        for (j = 0; j < 16; j++) {
            if (lane_max[j] > m || (lane_max[j] == m && lane_idx[j] < best)) {
                m = lane_max[j];
                best = lane_idx[j];
            }
        }
        for (; i < n; i++) {
            if (x[i] > m) { m = x[i]; best = i; }
        }
        return best;
    }
#endif
}

/* ---- Which shared library holds an address ----------------------------------
 * With GGML_BACKEND_DL each backend (and each CPU variant, libggml-cpu-haswell.so ...) is
 * its own library, so the file that holds a backend's registry object names the variant
 * ggml chose for this machine. */
#if defined(_WIN32)
#ifndef WIN32_LEAN_AND_MEAN
#define WIN32_LEAN_AND_MEAN
#endif
#ifndef NOMINMAX
#define NOMINMAX
#endif
#include <windows.h>
static int pyllama_library_of(const void * addr, char * buf, size_t n) {
    HMODULE h = NULL;
    DWORD len;
    if (!GetModuleHandleExA(GET_MODULE_HANDLE_EX_FLAG_FROM_ADDRESS |
                            GET_MODULE_HANDLE_EX_FLAG_UNCHANGED_REFCOUNT, (LPCSTR)addr, &h)) return 0;
    len = GetModuleFileNameA(h, buf, (DWORD)n);
    return len > 0 && len < n;
}
#else
#include <dlfcn.h>
#include <stdio.h>
static int pyllama_library_of(const void * addr, char * buf, size_t n) {
    Dl_info info;
    if (!dladdr(addr, &info) || info.dli_fname == NULL || info.dli_fname[0] == 0) return 0;
    return snprintf(buf, n, "%s", info.dli_fname) < (int)n;
}
#endif

#endif /* PYLLAMA_SUPPORT_H */
