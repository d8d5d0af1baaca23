// Stands in for trt_model.cpp when CMake did not find TensorRT and CUDA.
#include "model.h"

namespace qd {

std::unique_ptr<Model> load_tensorrt_model(const std::filesystem::path& path) {
  throw ModelError("'" + path.string() + "' is a TensorRT engine, but this qd_infer was built without TensorRT; "
                   "configure CMake with TensorRT_ROOT pointing at TensorRT 10+ on a machine with CUDA");
}

bool tensorrt_available() { return false; }

}  // namespace qd
