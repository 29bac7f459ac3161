# Options passed on the command line (e.g. through CMAKE_ARGS) that no CMakeLists
# ever declared keep the cache type UNINITIALIZED.  A misspelt -DGGML_CUDA=on would
# otherwise vanish without a word, so name them loudly, and record them so that
# pyllama.build_info() can show them at run time.
get_cmake_property(_pyllama_cache_vars CACHE_VARIABLES)
set(PYLLAMA_UNKNOWN_OPTIONS "")
foreach(_var IN LISTS _pyllama_cache_vars)
  if(_var MATCHES "^(GGML|LLAMA)_")
    get_property(_type CACHE "${_var}" PROPERTY TYPE)
    if(_type STREQUAL "UNINITIALIZED")
      list(APPEND PYLLAMA_UNKNOWN_OPTIONS "${_var}=${${_var}}")
    endif()
  endif()
endforeach()
if(PYLLAMA_UNKNOWN_OPTIONS)
  message(WARNING "pyllama: these options are not used by llama.cpp ${PYLLAMA_LLAMA_COMMIT} and have no effect: "
                  "${PYLLAMA_UNKNOWN_OPTIONS}. Check the spelling (see README, 'Backends').")
endif()
