# Map option names from older llama.cpp releases (still printed by many tutorials)
# onto today's names.  Each mapping prints one line so the user sees what happened.
#
#   -DLLAMA_CUBLAS=on      -> GGML_CUDA      (upstream: fatal error)
#   -DLLAMA_BLAS=on        -> GGML_BLAS      (upstream: silently ignored)
#   -DLLAMA_CLBLAST=on     -> configure stops: CLBlast was removed upstream
#
# The legacy variable is removed afterwards so upstream's own deprecation checks
# do not fire a second time (or, for LLAMA_CUBLAS, abort the configure).

set(_pyllama_legacy_map
  "LLAMA_CUBLAS=GGML_CUDA"
  "LLAMA_CUDA=GGML_CUDA"
  "LLAMA_METAL=GGML_METAL"
  "LLAMA_METAL_EMBED_LIBRARY=GGML_METAL_EMBED_LIBRARY"
  "LLAMA_BLAS=GGML_BLAS"
  "LLAMA_BLAS_VENDOR=GGML_BLAS_VENDOR"
  "LLAMA_VULKAN=GGML_VULKAN"
  "LLAMA_HIPBLAS=GGML_HIP"
  "LLAMA_HIP=GGML_HIP"
  "LLAMA_RPC=GGML_RPC"
  "LLAMA_NATIVE=GGML_NATIVE"
  "LLAMA_SYCL=GGML_SYCL"
  "LLAMA_CANN=GGML_CANN"
  "LLAMA_AVX=GGML_AVX"
  "LLAMA_AVX2=GGML_AVX2"
  "LLAMA_AVX512=GGML_AVX512"
  "LLAMA_FMA=GGML_FMA"
  "LLAMA_F16C=GGML_F16C"
  "LLAMA_OPENMP=GGML_OPENMP"
  "LLAMA_CUDA_F16=GGML_CUDA_F16"
  "LLAMA_CUDA_FORCE_MMQ=GGML_CUDA_FORCE_MMQ"
  "LLAMA_CUDA_FORCE_CUBLAS=GGML_CUDA_FORCE_CUBLAS"
)

set(PYLLAMA_LEGACY_MAPPED "")
foreach(_pair IN LISTS _pyllama_legacy_map)
  string(REPLACE "=" ";" _pair "${_pair}")
  list(GET _pair 0 _old)
  list(GET _pair 1 _new)
  if(DEFINED ${_old})
    set(_value "${${_old}}")
    if(_old STREQUAL "LLAMA_BLAS_VENDOR")
      set(${_new} "${_value}" CACHE STRING "BLAS library vendor" FORCE)
    else()
      set(${_new} "${_value}" CACHE BOOL "" FORCE)
    endif()
    message(NOTICE "pyllama: legacy option ${_old}=${_value} mapped to ${_new}=${_value} (use -D${_new} in new scripts)")
    list(APPEND PYLLAMA_LEGACY_MAPPED "${_old}->${_new}")
    unset(${_old} CACHE)
    unset(${_old})
  endif()
endforeach()

if(DEFINED LLAMA_CLBLAST)
  if(LLAMA_CLBLAST)
    message(FATAL_ERROR
      "pyllama: LLAMA_CLBLAST=${LLAMA_CLBLAST}: CLBlast was removed from llama.cpp and has no direct replacement. "
      "Use -DGGML_VULKAN=on (most GPUs), -DGGML_OPENCL=on (OpenCL devices such as Adreno) "
      "or -DGGML_BLAS=on -DGGML_BLAS_VENDOR=OpenBLAS (CPU BLAS) instead.")
  endif()
  unset(LLAMA_CLBLAST CACHE)
  unset(LLAMA_CLBLAST)
endif()

# FORCE_CMAKE=1 was how older llama-cpp-python builds were told to use CMake.  We always
# build with CMake, so it is accepted and has no effect.
if(DEFINED ENV{FORCE_CMAKE})
  message(STATUS "pyllama: FORCE_CMAKE=$ENV{FORCE_CMAKE} noted; pyllama always builds with CMake")
endif()
