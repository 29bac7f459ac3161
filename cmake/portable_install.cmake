# Portable builds (PYLLAMA_PORTABLE=ON): install llama, ggml, ggml-base and every
# runtime-loaded backend library next to _core, once each.  No SOVERSION and
# NAMELINK_SKIP keep a single real file per library instead of three copies.
if(APPLE)
  set(_pyllama_origin "@loader_path")
else()
  set(_pyllama_origin "$ORIGIN")
endif()

foreach(_t llama ggml ggml-base)
  if(TARGET ${_t})
    # No headers in the wheel (and no warning about their missing destination).
    set_target_properties(${_t} PROPERTIES SOVERSION "" VERSION "" PUBLIC_HEADER ""
                                           INSTALL_RPATH "${_pyllama_origin}")
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
set(_pyllama_backend_modules "")
foreach(_t IN LISTS GGML_AVAILABLE_BACKENDS)
  if(TARGET ${_t})
    get_target_property(_type ${_t} TYPE)
    if(_type STREQUAL "MODULE_LIBRARY")
      list(APPEND _pyllama_backend_modules ${_t})
    endif()
  endif()
endforeach()
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
