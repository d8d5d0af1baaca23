# FindTensorRT: the TensorRT C++ runtime (NvInfer.h, libnvinfer) and, when present, its plugin library.
#
# Hints: -DTensorRT_ROOT=DIR or the environment variables TensorRT_ROOT / TENSORRT_ROOT (a tar-file install with
# include/ and lib/ below it); the system locations of the Debian/Ubuntu packages are searched too.
#
# Sets TensorRT_FOUND, TensorRT_VERSION, TensorRT_INCLUDE_DIR, TensorRT_LIBRARY, TensorRT_PLUGIN_LIBRARY and
# TensorRT_REASON (why it was not found, for the configure summary); defines the imported targets
# TensorRT::nvinfer and, with the plugin library, TensorRT::nvinfer_plugin.

set(_qd_trt_hints ${TensorRT_ROOT} $ENV{TensorRT_ROOT} $ENV{TENSORRT_ROOT})

find_path(TensorRT_INCLUDE_DIR NvInfer.h HINTS ${_qd_trt_hints} PATH_SUFFIXES include include/x86_64-linux-gnu)
find_library(TensorRT_LIBRARY nvinfer HINTS ${_qd_trt_hints} PATH_SUFFIXES lib lib64 lib/x86_64-linux-gnu)
find_library(TensorRT_PLUGIN_LIBRARY nvinfer_plugin HINTS ${_qd_trt_hints} PATH_SUFFIXES lib lib64 lib/x86_64-linux-gnu)

set(TensorRT_VERSION "")
if(TensorRT_INCLUDE_DIR AND EXISTS "${TensorRT_INCLUDE_DIR}/NvInferVersion.h")
  file(READ "${TensorRT_INCLUDE_DIR}/NvInferVersion.h" _qd_trt_version_h)
  # TensorRT 10 defines the numbers as TRT_*_ENTERPRISE and aliases NV_TENSORRT_* to them; older releases
  # define NV_TENSORRT_* directly.
  foreach(_part MAJOR MINOR PATCH)
    if(_qd_trt_version_h MATCHES "#define TRT_${_part}_ENTERPRISE ([0-9]+)")
      set(_qd_trt_${_part} ${CMAKE_MATCH_1})
    elseif(_qd_trt_version_h MATCHES "#define NV_TENSORRT_${_part} ([0-9]+)")
      set(_qd_trt_${_part} ${CMAKE_MATCH_1})
    else()
      set(_qd_trt_${_part} 0)
    endif()
  endforeach()
  set(TensorRT_VERSION "${_qd_trt_MAJOR}.${_qd_trt_MINOR}.${_qd_trt_PATCH}")
endif()

set(TensorRT_REASON "")
if(NOT TensorRT_INCLUDE_DIR)
  set(TensorRT_REASON "NvInfer.h not found (set TensorRT_ROOT to the TensorRT install folder)")
elseif(NOT TensorRT_LIBRARY)
  set(TensorRT_REASON "NvInfer.h found in ${TensorRT_INCLUDE_DIR} but libnvinfer was not (set TensorRT_ROOT)")
elseif(NOT TensorRT_VERSION)
  set(TensorRT_REASON "NvInfer.h found in ${TensorRT_INCLUDE_DIR} but not its version (NvInferVersion.h)")
elseif(TensorRT_VERSION VERSION_LESS 10)
  # The runner uses the name-based I/O API (setTensorAddress, enqueueV3) introduced with TensorRT 10.
  set(TensorRT_REASON "TensorRT ${TensorRT_VERSION} found, but qd_infer needs TensorRT 10 or newer")
endif()

include(FindPackageHandleStandardArgs)
if(TensorRT_REASON)
  set(_qd_trt_ok "")
else()
  set(_qd_trt_ok TRUE)
endif()
find_package_handle_standard_args(TensorRT
  REQUIRED_VARS TensorRT_LIBRARY TensorRT_INCLUDE_DIR _qd_trt_ok
  VERSION_VAR TensorRT_VERSION
  REASON_FAILURE_MESSAGE "${TensorRT_REASON}")

if(TensorRT_FOUND AND NOT TARGET TensorRT::nvinfer)
  add_library(TensorRT::nvinfer UNKNOWN IMPORTED)
  set_target_properties(TensorRT::nvinfer PROPERTIES
    IMPORTED_LOCATION "${TensorRT_LIBRARY}"
    INTERFACE_INCLUDE_DIRECTORIES "${TensorRT_INCLUDE_DIR}")
  if(TensorRT_PLUGIN_LIBRARY)
    add_library(TensorRT::nvinfer_plugin UNKNOWN IMPORTED)
    set_target_properties(TensorRT::nvinfer_plugin PROPERTIES
      IMPORTED_LOCATION "${TensorRT_PLUGIN_LIBRARY}"
      INTERFACE_LINK_LIBRARIES TensorRT::nvinfer)
  endif()
endif()
mark_as_advanced(TensorRT_INCLUDE_DIR TensorRT_LIBRARY TensorRT_PLUGIN_LIBRARY)
