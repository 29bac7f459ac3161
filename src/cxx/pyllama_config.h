/* The build options CMake passes to pyllama._core (target_compile_definitions in
 * CMakeLists.txt), with the values a compile without them gets. */
#ifndef PYLLAMA_CONFIG_H
#define PYLLAMA_CONFIG_H

/* The llama.cpp commit vendored into this build (pyllama.__llama_cpp_commit__). */
#ifndef PYLLAMA_LLAMA_COMMIT
#define PYLLAMA_LLAMA_COMMIT "unknown"
#endif

/* GGML_BACKEND_DL: the backends are shared libraries loaded at run time (portable wheels). */
#ifndef PYLLAMA_BACKEND_DL
#define PYLLAMA_BACKEND_DL 0
#endif

/* GGML_RPC: the RPC backend is built (linked, or loaded at run time with GGML_BACKEND_DL). */
#ifndef PYLLAMA_HAS_RPC
#define PYLLAMA_HAS_RPC 0
#endif

#endif /* PYLLAMA_CONFIG_H */
