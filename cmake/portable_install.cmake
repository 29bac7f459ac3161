# Portable builds (PYLLAMA_PORTABLE=ON): install llama, ggml, ggml-base, mtmd and every
# runtime-loaded backend library next to _core, once each.  No SOVERSION and
# NAMELINK_SKIP keep a single real file per library instead of three copies.
if(APPLE)
  set(_pyllama_origin "@loader_path")
else()
  set(_pyllama_origin "$ORIGIN")
endif()

foreach(_t llama ggml ggml-base mtmd)
  if(TARGET ${_t})
    # Unset, not empty: an empty VERSION names the file "libllama.so.".
    set_property(TARGET ${_t} PROPERTY VERSION)
    set_property(TARGET ${_t} PROPERTY SOVERSION)
    # No headers in the wheel (and no warning about their missing destination).
    set_target_properties(${_t} PROPERTIES PUBLIC_HEADER "" INSTALL_RPATH "${_pyllama_origin}")
    # Windows import libraries (.lib) go to a component the wheel does not install.
    install(TARGETS ${_t} LIBRARY DESTINATION pyllama COMPONENT python NAMELINK_SKIP
                          RUNTIME DESTINATION pyllama COMPONENT python
                          ARCHIVE DESTINATION lib COMPONENT devel)
  endif()
endforeach()

# Dynamic backends (ggml-cpu-<variant>, ggml-cuda, ggml-vulkan, ggml-metal, ggml-rpc ...)
# are MODULE libraries that ggml_backend_load_all_from_path() finds by their file name
# (libggml-*.so / ggml-*.dll) in the package directory.  Upstream records every backend
# library it added in GGML_AVAILABLE_BACKENDS, so no list of names has to be kept here;
# `if(TARGET)` drops stale entries of that cache variable after a reconfigure.
#
# A few x86-64 CPU variants are left out of the wheel to keep it under 8 MiB: each is
# 1.2-1.7 MB, and these four serve rare CPUs that the next variant down runs at nearly the
# same speed (ggml picks the best variant the CPU supports, so nothing breaks):
#   ivybridge, piledriver (AVX + F16C[/FMA], 2012-era, no AVX2)  -> sandybridge
#   cannonlake (AVX-512 VBMI without VNNI: one laptop chip)        -> skylakex
#   cooperlake (AVX-512 BF16 without VBMI: 4/8-socket Xeons)       -> cascadelake
# -DPYLLAMA_CPU_VARIANTS_SKIP="" ships every variant upstream builds.
set(PYLLAMA_CPU_VARIANTS_SKIP "ivybridge;piledriver;cannonlake;cooperlake" CACHE STRING
    "ggml CPU variants (GGML_CPU_ALL_VARIANTS) not installed in a portable wheel")
set(_pyllama_backend_modules "")
set(_pyllama_skipped "")
foreach(_t IN LISTS GGML_AVAILABLE_BACKENDS)
  if(TARGET ${_t})
    get_target_property(_type ${_t} TYPE)
    string(REGEX REPLACE "^ggml-cpu-" "" _variant "${_t}")
    if(NOT _type STREQUAL "MODULE_LIBRARY")
      continue()
    elseif(_t MATCHES "^ggml-cpu-" AND _variant IN_LIST PYLLAMA_CPU_VARIANTS_SKIP)
      list(APPEND _pyllama_skipped ${_t})
    else()
      list(APPEND _pyllama_backend_modules ${_t})
    endif()
  endif()
endforeach()
if(_pyllama_skipped)
  message(STATUS "pyllama: portable build leaves out (PYLLAMA_CPU_VARIANTS_SKIP): ${_pyllama_skipped}")
endif()
if(NOT _pyllama_backend_modules)
  message(FATAL_ERROR "pyllama: PYLLAMA_PORTABLE found no runtime-loaded ggml backend "
                      "(GGML_AVAILABLE_BACKENDS='${GGML_AVAILABLE_BACKENDS}')")
endif()
message(STATUS "pyllama: portable build ships these backend modules: ${_pyllama_backend_modules}")
foreach(_t IN LISTS _pyllama_backend_modules)
  add_dependencies(_core ${_t})
  set_target_properties(${_t} PROPERTIES INSTALL_RPATH "${_pyllama_origin}")
  install(TARGETS ${_t} LIBRARY DESTINATION pyllama COMPONENT python
                        RUNTIME DESTINATION pyllama COMPONENT python)
endforeach()
