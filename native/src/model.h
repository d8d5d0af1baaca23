// The model interface qd_infer runs, and the backends behind it (AOTInductor; TensorRT when built with it).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <filesystem>
#include <memory>
#include <stdexcept>
#include <string>

namespace qd {

// A model file that cannot be loaded or run here; what() names the file and the reason.
class ModelError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct ModelInfo {
  std::int64_t height = 0;  // the input size the model was built for
  std::int64_t width = 0;
  std::int64_t batch_min = 1;  // accepted batch sizes, inclusive
  std::int64_t batch_max = 1;
  std::string description;  // one line for the log: backend, device, input size
};

struct Prediction {
  at::Tensor logits;  // (B, K, H/4, W/4) float32 on the CPU
  at::Tensor labels;  // (B, H, W) integer train ids on the CPU
};

class Model {
 public:
  virtual ~Model() = default;
  virtual const ModelInfo& info() const = 0;
  // images: (B, 3, H, W) float32 RGB in [0, 255], contiguous on the CPU, with batch_min ≤ B ≤ batch_max and
  // (H, W) = (info().height, info().width). Returns once the results are on the CPU, so the wall-clock time
  // around the call is the whole latency, transfers included.
  virtual Prediction run(const at::Tensor& images) = 0;
};

// An AOTInductor package written by export.aoti.export_aoti. Throws ModelError for a missing or unreadable
// file, a package without the input-size metadata, or one compiled for a device or CPU this machine lacks.
std::unique_ptr<Model> load_aoti_model(const std::filesystem::path& path);

// A serialized TensorRT engine (TensorRT 10 or newer, one input and outputs (logits, labels)). Throws
// ModelError without a CUDA device, or for an engine built for another GPU or TensorRT version.
std::unique_ptr<Model> load_tensorrt_model(const std::filesystem::path& path);

// Whether this build of qd_infer contains the TensorRT backend.
bool tensorrt_available();

}  // namespace qd
