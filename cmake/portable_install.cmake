# Portable builds (PYLLAMA_PORTABLE=ON): install llama, ggml, ggml-base and every
# runtime-loaded backend library next to _core, once each.  NAMELINK_SKIP and
# no SOVERSION keep a single real file per library instead of three copies.
foreach(_t llama ggml ggml-base)
  if(TARGET ${_t})
    set_target_properties(${_t} PROPERTIES SOVERSION "" VERSION "" INSTALL_RPATH "$ORIGIN")
    if(APPLE)
      set_target_properties(${_t} PROPERTIES INSTALL_RPATH "@loader_path")
    endif()
    install(TARGETS ${_t} LIBRARY DESTINATION pyllama COMPONENT python NAMELINK_SKIP
                          RUNTIME DESTINATION pyllama COMPONENT python)
  endif()
endforeach()
# Dynamic backends (ggml-cpu-*, ggml-cuda, ggml-vulkan, ggml-rpc ...) are MODULE libraries.
get_property(_backends GLOBAL PROPERTY GGML_BACKEND_DL_TARGETS)
if(NOT _backends)
  set(_backends "")
  foreach(_cand ggml-cpu ggml-cpu-x64 ggml-cpu-sse42 ggml-cpu-sandybridge ggml-cpu-haswell ggml-cpu-skylakex
                ggml-cpu-icelake ggml-cpu-alderlake ggml-cpu-sapphirerapids ggml-cpu-zen4 ggml-cpu-cannonlake
                ggml-cpu-cascadelake ggml-cpu-cooperlake ggml-cpu-armv8.0_1 ggml-cpu-armv8.2_1 ggml-cpu-armv8.2_2
                ggml-cpu-armv8.2_3 ggml-cpu-armv8.6_1 ggml-cpu-armv9.2_1 ggml-cpu-armv9.2_2
                ggml-blas ggml-cuda ggml-vulkan ggml-hip ggml-metal ggml-rpc ggml-opencl)
    if(TARGET ${_cand})
      list(APPEND _backends ${_cand})
    endif()
  endforeach()
endif()
foreach(_t IN LISTS _backends)
  add_dependencies(_core ${_t})
  set_target_properties(${_t} PROPERTIES INSTALL_RPATH "$ORIGIN")
  install(TARGETS ${_t} LIBRARY DESTINATION pyllama COMPONENT python RUNTIME DESTINATION pyllama COMPONENT python)
endforeach()
