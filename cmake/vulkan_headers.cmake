# Vulkan headers new enough for the vendored ggml-vulkan.
#
# ggml-vulkan at the pinned llama.cpp uses VK_EXT_layer_settings (vk::LayerSettingEXT), which the
# Vulkan headers have since 1.3.261.  Older headers (Debian 12 ships 1.3.239) fail deep inside
# ggml-vulkan.cpp with "'LayerSettingEXT' is not a member of 'vk'" after minutes of shader
# compilation; this check says so at configure time, with the way out.
if(GGML_VULKAN)
  find_package(Vulkan QUIET)
  if(Vulkan_INCLUDE_DIR AND EXISTS "${Vulkan_INCLUDE_DIR}/vulkan/vulkan_core.h")
    file(STRINGS "${Vulkan_INCLUDE_DIR}/vulkan/vulkan_core.h" _pyllama_vk_patch
         REGEX "^#define VK_HEADER_VERSION [0-9]+")
    file(STRINGS "${Vulkan_INCLUDE_DIR}/vulkan/vulkan_core.h" _pyllama_vk_complete
         REGEX "^#define VK_HEADER_VERSION_COMPLETE ")
    string(REGEX MATCH "[0-9]+$" _pyllama_vk_patch "${_pyllama_vk_patch}")
    string(REGEX MATCH "\\(0, *([0-9]+), *([0-9]+)," _pyllama_vk_mm "${_pyllama_vk_complete}")
    set(_pyllama_vk_version "${CMAKE_MATCH_1}.${CMAKE_MATCH_2}.${_pyllama_vk_patch}")
    if(_pyllama_vk_patch AND _pyllama_vk_mm AND _pyllama_vk_version VERSION_LESS "1.3.261")
      message(FATAL_ERROR
        "pyllama: the Vulkan headers in ${Vulkan_INCLUDE_DIR} are ${_pyllama_vk_version}; the vendored "
        "llama.cpp's Vulkan backend needs Vulkan headers 1.3.261 or newer (VK_EXT_layer_settings). "
        "Install newer ones (the LunarG Vulkan SDK, Ubuntu 24.04's or Debian 13's libvulkan-dev) and "
        "point the build at them, e.g. CMAKE_ARGS=\"-DGGML_VULKAN=on -DVulkan_INCLUDE_DIR=/path/to/include\" "
        "(only the headers are needed: the system's Vulkan loader is fine). scripts/check_vulkan.sh does "
        "this on Debian 12; see docs/building.md.")
    endif()
    set(PYLLAMA_VULKAN_HEADERS "${_pyllama_vk_version}")
  endif()
endif()
