# CUDA architectures when no GPU is visible at build time.
#
# Source builds turn GGML_NATIVE on (the CPU code is compiled for this CPU), and with it
# ggml-cuda asks CMake for CMAKE_CUDA_ARCHITECTURES=native: the GPUs in this machine.  On a
# machine without one (a build host, a container without the driver) CMake then fails.  In
# that case pyllama builds for a default list instead -- upstream's own non-native list for
# this CUDA version, without the Blackwell entries that need a recent CMake:
#
#   CUDA >= 13:  75-virtual;80-virtual;86-real;89-real;90-virtual
#   CUDA <  13:  50-virtual;61-virtual;70-virtual;75-virtual;80-virtual;86-real;89-real;90-virtual
#
# (XX-real: machine code for that GPU family; XX-virtual: PTX, compiled by the driver on first
# use for that family and newer ones.)  Name your own with -DCMAKE_CUDA_ARCHITECTURES="89"
# (one architecture builds several times faster).  PYLLAMA_CUDA_ARCHITECTURES_CHOSEN records
# what was used, and why, for pyllama.build_info().
set(PYLLAMA_CUDA_ARCHITECTURES_CHOSEN "")
if(GGML_CUDA)
  if(DEFINED CMAKE_CUDA_ARCHITECTURES)
    set(PYLLAMA_CUDA_ARCHITECTURES_CHOSEN "${CMAKE_CUDA_ARCHITECTURES} (given)")
  elseif(NOT GGML_NATIVE)
    set(PYLLAMA_CUDA_ARCHITECTURES_CHOSEN "upstream default (GGML_NATIVE off)")
  else()
    set(_pyllama_gpu_caps "")
    find_program(PYLLAMA_NVIDIA_SMI nvidia-smi)
    if(PYLLAMA_NVIDIA_SMI)
      execute_process(COMMAND "${PYLLAMA_NVIDIA_SMI}" --query-gpu=compute_cap --format=csv,noheader
                      OUTPUT_VARIABLE _pyllama_gpu_caps RESULT_VARIABLE _pyllama_smi_rc
                      ERROR_QUIET OUTPUT_STRIP_TRAILING_WHITESPACE TIMEOUT 30)
      if(NOT _pyllama_smi_rc EQUAL 0)
        set(_pyllama_gpu_caps "")
      endif()
    endif()
    if(_pyllama_gpu_caps MATCHES "[0-9]")
      string(REPLACE "\n" ";" _pyllama_gpu_caps "${_pyllama_gpu_caps}")
      set(PYLLAMA_CUDA_ARCHITECTURES_CHOSEN "native (GPUs with compute capability ${_pyllama_gpu_caps})")
    else()
      find_package(CUDAToolkit)
      if(CUDAToolkit_FOUND AND CUDAToolkit_VERSION VERSION_LESS "13")
        set(_pyllama_archs "50-virtual;61-virtual;70-virtual;75-virtual;80-virtual;86-real;89-real;90-virtual")
      else()
        set(_pyllama_archs "75-virtual;80-virtual;86-real;89-real;90-virtual")
      endif()
      set(CMAKE_CUDA_ARCHITECTURES "${_pyllama_archs}" CACHE STRING
          "CUDA architectures (pyllama default: no GPU was visible at build time)")
      set(PYLLAMA_CUDA_ARCHITECTURES_CHOSEN "${_pyllama_archs} (default: no GPU visible at build time)")
      message(STATUS "pyllama: no CUDA GPU visible at build time (nvidia-smi), so GGML_NATIVE cannot "
                     "pick the architectures: building for CMAKE_CUDA_ARCHITECTURES=${_pyllama_archs}. "
                     "Name yours with -DCMAKE_CUDA_ARCHITECTURES=...")
    endif()
  endif()
endif()
