/* ggml's RPC client and server entry points for pyllama._core (declared in
 * src/pyllama/_llama.pxd), the same names whichever way this build has the RPC backend:
 * linked (ggml-rpc.h), loaded at run time (GGML_BACKEND_DL), or not built at all (stubs,
 * with PYLLAMA_RPC_AVAILABLE 0 so _core refuses before calling them). */
#ifndef PYLLAMA_RPC_H
#define PYLLAMA_RPC_H

#include <stddef.h>
#include <stdint.h>

#include "ggml-backend.h"
#include "pyllama_config.h"

#if PYLLAMA_HAS_RPC && PYLLAMA_BACKEND_DL
/* Portable builds load ggml-rpc at run time (GGML_BACKEND_DL), so it cannot be
   linked: its entry points come from the registry, as upstream's tools do it. */
#define PYLLAMA_RPC_AVAILABLE 1
/* the protocol of the ggml-rpc this tree builds (ggml-rpc.h; not included here) */
#define PYLLAMA_RPC_PROTO_MAJOR 7
#define PYLLAMA_RPC_PROTO_MINOR 0
static void * pyllama_rpc_proc(const char * name) {
    ggml_backend_reg_t reg = ggml_backend_reg_by_name("RPC");
    return reg ? ggml_backend_reg_get_proc_address(reg, name) : NULL;
}
static inline ggml_backend_reg_t pyllama_rpc_add_server(const char * endpoint) {
    typedef ggml_backend_reg_t (*fn_t)(const char *);
    fn_t fn = (fn_t) pyllama_rpc_proc("ggml_backend_rpc_add_server");
    return fn ? fn(endpoint) : NULL;
}
static inline void pyllama_rpc_start_server(const char * e, const char * c, size_t t, size_t n, ggml_backend_dev_t * d) {
    typedef void (*fn_t)(const char *, const char *, size_t, size_t, ggml_backend_dev_t *);
    fn_t fn = (fn_t) pyllama_rpc_proc("ggml_backend_rpc_start_server");
    if (fn) fn(e, c, t, n, d);
}
static inline void ggml_backend_rpc_get_device_memory(const char * e, uint32_t d, size_t * f, size_t * t) { (void)e; (void)d; *f = 0; *t = 0; }
#define ggml_backend_rpc_add_server pyllama_rpc_add_server
#define ggml_backend_rpc_start_server pyllama_rpc_start_server
#elif PYLLAMA_HAS_RPC
#include "ggml-rpc.h"
#define PYLLAMA_RPC_AVAILABLE 1
#define PYLLAMA_RPC_PROTO_MAJOR RPC_PROTO_MAJOR_VERSION
#define PYLLAMA_RPC_PROTO_MINOR RPC_PROTO_MINOR_VERSION
#else
#define PYLLAMA_RPC_AVAILABLE 0
#define PYLLAMA_RPC_PROTO_MAJOR 0
#define PYLLAMA_RPC_PROTO_MINOR 0
static inline ggml_backend_reg_t ggml_backend_rpc_add_server(const char * endpoint) { (void)endpoint; return NULL; }
static inline void ggml_backend_rpc_start_server(const char * e, const char * c, size_t t, size_t n, ggml_backend_dev_t * d) { (void)e; (void)c; (void)t; (void)n; (void)d; }
static inline void ggml_backend_rpc_get_device_memory(const char * e, uint32_t d, size_t * f, size_t * t) { (void)e; (void)d; *f = 0; *t = 0; }
#endif

#endif /* PYLLAMA_RPC_H */
