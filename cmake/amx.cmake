# ggml's AMX kernels (ggml/src/ggml-cpu/amx) and GCC's AMX intrinsics.
#
# On a CPU with AMX (Intel Sapphire Rapids and later) a GGML_NATIVE build, or the
# "sapphirerapids" variant of a portable build, compiles ggml's AMX matmul kernels and
# repacks Q4_0/Q4_1/Q8_0/K-quant weights into an "AMX" buffer.  GCC 12's <amxtileintrin.h>
# (and older) writes _tile_loadconfig as inline asm that declares only the first 8 bytes
# of the 64-byte tile configuration as read, so the optimiser drops the stores that fill
# in rows/colsb: ldtilecfg then loads garbage and the process dies with SIGSEGV (#GP) in
# ggml_backend_amx_mul_mat at the first decode (seen with GCC 12.2, Debian 12, on a
# Sapphire Rapids VM; upstream report: ggml-org/llama.cpp#20824, closed without a fix).
#
# PYLLAMA_AMX:
#   AUTO (default)  probe the compiler: if its _tile_loadconfig loses the configuration
#                   stores, build ggml-cpu without AMX (AVX-512/VNNI kernels are used);
#                   otherwise keep upstream's behaviour
#   OFF             never use AMX
#   ON              upstream's behaviour, whatever the compiler (at your own risk)
#
# Disabling is done from the outside, on ggml's CPU targets only: explicit -mno-amx-*
# (GCC lets explicit ISA flags win over -march=native) and -U of the __AMX_*__ macros
# that ggml's portable variants define by hand.  Nothing upstream is edited.

set(PYLLAMA_AMX "AUTO" CACHE STRING "use ggml's AMX kernels: AUTO (off when the compiler miscompiles them), ON, OFF")
set_property(CACHE PYLLAMA_AMX PROPERTY STRINGS AUTO ON OFF)
string(TOUPPER "${PYLLAMA_AMX}" _pyllama_amx)
if(NOT _pyllama_amx MATCHES "^(AUTO|ON|OFF)$")
  message(FATAL_ERROR "pyllama: PYLLAMA_AMX must be AUTO, ON or OFF, not '${PYLLAMA_AMX}'")
endif()

set(PYLLAMA_AMX_DISABLED_REASON "")
set(PYLLAMA_AMX_FLAGS -mno-amx-tile -mno-amx-int8 -mno-amx-bf16 -U__AMX_TILE__ -U__AMX_INT8__ -U__AMX_BF16__)

# Returns TRUE in ${out} when ${compiler}'s _tile_loadconfig drops the configuration
# stores: compile a probe to assembly and look for a byte it must store (0x5a = 90).
function(pyllama_amx_intrinsics_broken compiler out)
  set(_probe "${CMAKE_BINARY_DIR}/pyllama_amx_probe.cpp")
  file(WRITE "${_probe}" [=[
#include <immintrin.h>
void pyllama_amx_probe(void) {
    alignas(64) unsigned char cfg[64] = {0};
    cfg[0] = 1;      /* palette 1 */
    cfg[48] = 0x5a;  /* rows[0]: must reach memory before ldtilecfg reads it */
    _tile_loadconfig(cfg);
}
]=])
  execute_process(COMMAND "${compiler}" -O2 -mamx-tile -S -o - "${_probe}"
                  OUTPUT_VARIABLE _asm ERROR_VARIABLE _err RESULT_VARIABLE _rc)
  set(${out} FALSE PARENT_SCOPE)
  if(NOT _rc EQUAL 0 OR NOT _asm MATCHES "ldtilecfg")
    return()   # no AMX support in this compiler: nothing to guard
  endif()
  string(REGEX REPLACE "(^|\n)[ \t]*#[^\n]*" "" _asm "${_asm}")   # drop line markers / comments
  if(NOT _asm MATCHES "[$ \t,]90([^0-9]|$)")
    set(${out} TRUE PARENT_SCOPE)
  endif()
endfunction()

if(CMAKE_SYSTEM_PROCESSOR MATCHES "x86_64|AMD64|amd64" AND NOT MSVC AND NOT _pyllama_amx STREQUAL "ON")
  if(_pyllama_amx STREQUAL "OFF")
    set(PYLLAMA_AMX_DISABLED_REASON "PYLLAMA_AMX=OFF")
  elseif(CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
    pyllama_amx_intrinsics_broken("${CMAKE_CXX_COMPILER}" _broken)
    if(_broken)
      set(PYLLAMA_AMX_DISABLED_REASON
          "GCC ${CMAKE_CXX_COMPILER_VERSION}'s _tile_loadconfig drops the tile configuration (ggml's AMX kernels would crash)")
    endif()
  endif()
endif()

# Apply to every ggml CPU target (ggml-cpu, or ggml-cpu-<variant> in portable builds), once.
function(pyllama_disable_amx dir)
  get_property(_targets DIRECTORY "${dir}" PROPERTY BUILDSYSTEM_TARGETS)
  foreach(_t IN LISTS _targets)
    get_property(_done GLOBAL PROPERTY PYLLAMA_AMX_TARGETS)
    if(_t MATCHES "^ggml-cpu" AND NOT _t IN_LIST _done)
      target_compile_options(${_t} PRIVATE ${PYLLAMA_AMX_FLAGS})
      set_property(GLOBAL APPEND PROPERTY PYLLAMA_AMX_TARGETS ${_t})
    endif()
  endforeach()
  get_property(_subdirs DIRECTORY "${dir}" PROPERTY SUBDIRECTORIES)
  foreach(_d IN LISTS _subdirs)
    pyllama_disable_amx("${_d}")
  endforeach()
endfunction()

if(PYLLAMA_AMX_DISABLED_REASON)
  pyllama_disable_amx("${LLAMA_CPP_DIR}/ggml/src")
  get_property(PYLLAMA_AMX_TARGETS GLOBAL PROPERTY PYLLAMA_AMX_TARGETS)
  message(STATUS "pyllama: ggml's AMX kernels are off (${PYLLAMA_AMX_DISABLED_REASON}); "
                 "targets: ${PYLLAMA_AMX_TARGETS}. -DPYLLAMA_AMX=ON forces them on.")
  set(PYLLAMA_AMX_EFFECTIVE "OFF")
else()
  set(PYLLAMA_AMX_EFFECTIVE "${_pyllama_amx}")
endif()
