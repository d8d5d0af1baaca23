// AOTInductor backend: the .pt2 package is loaded with libtorch's AOTIModelPackageLoader.
#include <c10/util/Exception.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/cuda.h>

#include <cstdlib>
#include <unordered_map>
#include <vector>

#include "model.h"

namespace qd {
namespace fs = std::filesystem;

namespace {

using Metadata = std::unordered_map<std::string, std::string>;

// The name export_aoti gives the model inside the package (torch's default).
constexpr const char* kModelName = "model";

std::string first_line(const std::string& text) { return text.substr(0, text.find('\n')); }

// libtorch errors carry a C++ backtrace after the message; keep the message only.
std::string torch_reason(const std::exception& e) {
  if (const auto* error = dynamic_cast<const c10::Error*>(&e)) return first_line(error->what_without_backtrace());
  return first_line(e.what());
}

std::string quoted(const fs::path& path) { return "'" + path.string() + "'"; }

std::string value_or(const Metadata& meta, const std::string& key, const std::string& fallback) {
  const auto it = meta.find(key);
  return it == meta.end() ? fallback : it->second;
}

std::int64_t metadata_int(const Metadata& meta, const std::string& key, const fs::path& path) {
  const auto it = meta.find(key);
  if (it == meta.end()) {
    throw ModelError(quoted(path) + " has no '" + key + "' metadata; export it with export.aoti.export_aoti "
                     "(python -m export --aoti), which records the input size and batch range");
  }
  char* end = nullptr;
  const long long value = std::strtoll(it->second.c_str(), &end, 10);
  if (it->second.empty() || *end != '\0' || value <= 0) {
    throw ModelError(quoted(path) + ": metadata '" + key + "' should be a positive integer, got '" + it->second + "'");
  }
  return value;
}

const char* this_platform() {
#if defined(__linux__)
  return "linux";
#elif defined(__APPLE__)
  return "darwin";
#else
  return "";
#endif
}

const char* this_machine() {
#if defined(__x86_64__)
  return "x86_64";
#elif defined(__aarch64__)
  return "aarch64";
#else
  return "";
#endif
}

// Inductor vectorises the CPU kernels for the exporting machine's ISA (AOTI_CPU_ISA lists it first); on a CPU
// without it the package dies with an illegal instruction instead of an error, so refuse it up front.
bool cpu_has_isa(const std::string& isa) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (isa == "AVX512") {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }
  if (isa == "AVX2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  (void)isa;
  return true;
}

c10::Device package_device(const Metadata& meta, const fs::path& path) {
  const std::string device = value_or(meta, "AOTI_DEVICE_KEY", "cpu");
  if (device == "cuda") {
    if (!torch::cuda::is_available()) {
      throw ModelError(quoted(path) + " was compiled for CUDA, but no CUDA device is available to qd_infer here "
                       "(no GPU, or a CPU-only libtorch); export it with device='cpu' to run it on this machine");
    }
    return c10::Device(c10::kCUDA, 0);
  }
  if (device != "cpu") {
    throw ModelError(quoted(path) + " was compiled for device '" + device + "'; qd_infer runs cpu and cuda packages");
  }
  const std::string platform = value_or(meta, "AOTI_PLATFORM", this_platform());
  const std::string machine = value_or(meta, "AOTI_MACHINE", this_machine());
  if (platform != this_platform() || machine != this_machine()) {
    throw ModelError(quoted(path) + " was compiled for " + platform + "/" + machine + ", this machine is " +
                     this_platform() + "/" + this_machine());
  }
  const std::string isa_list = value_or(meta, "AOTI_CPU_ISA", "");
  const std::string isa = isa_list.substr(0, isa_list.find(' '));
  if (!isa.empty() && !cpu_has_isa(isa)) {
    throw ModelError(quoted(path) + " was compiled for CPUs with " + isa + ", which this CPU lacks; export it "
                     "again on a machine like this one");
  }
  return c10::Device(c10::kCPU);
}

class AotiModel final : public Model {
 public:
  explicit AotiModel(const fs::path& path) {
    std::error_code error;
    if (!fs::is_regular_file(path, error)) {
      throw ModelError("--model: " + quoted(path) + (fs::exists(path, error) ? " is not a file" : " does not exist"));
    }
    Metadata meta;
    try {
      meta = torch::inductor::AOTIModelPackageLoader::load_metadata_from_package(path.string(), kModelName);
    } catch (const std::exception& e) {
      throw ModelError(quoted(path) + " is not a readable AOTInductor package: " + torch_reason(e));
    }
    device_ = package_device(meta, path);
    info_.height = metadata_int(meta, "qd.height", path);
    info_.width = metadata_int(meta, "qd.width", path);
    info_.batch_min = metadata_int(meta, "qd.batch_min", path);
    info_.batch_max = metadata_int(meta, "qd.batch_max", path);
    if (info_.batch_min > info_.batch_max) {
      throw ModelError(quoted(path) + ": metadata batch range " + std::to_string(info_.batch_min) + ".." +
                       std::to_string(info_.batch_max) + " is empty");
    }
    info_.description = "AOTInductor package " + path.filename().string() + " on " + device_.str() + ", input " +
                        std::to_string(info_.height) + "x" + std::to_string(info_.width) + ", batch " +
                        std::to_string(info_.batch_min) + ".." + std::to_string(info_.batch_max);
    try {
      loader_ = std::make_unique<torch::inductor::AOTIModelPackageLoader>(
          path.string(), kModelName, /*run_single_threaded=*/false, /*num_runners=*/1,
          device_.is_cuda() ? device_.index() : -1);
    } catch (const std::exception& e) {
      throw ModelError("cannot load " + quoted(path) + ": " + torch_reason(e));
    }
  }

  const ModelInfo& info() const override { return info_; }

  Prediction run(const at::Tensor& images) override {
    std::vector<at::Tensor> outputs;
    try {
      outputs = loader_->run({images.to(device_)});
    } catch (const std::exception& e) {
      throw ModelError("running the AOTInductor package failed: " + torch_reason(e));
    }
    Prediction out;
    for (const at::Tensor& t : outputs) {
      if (t.dim() == 4 && !out.logits.defined()) out.logits = t.to(at::kCPU);
      else if (t.dim() == 3 && !out.labels.defined()) out.labels = t.to(at::kCPU);
    }
    if (outputs.size() != 2 || !out.logits.defined() || !out.labels.defined()) {
      throw ModelError("the package returned " + std::to_string(outputs.size()) + " outputs; expected logits "
                       "(B, K, H/4, W/4) and labels (B, H, W) as export/wrapper.py produces them");
    }
    return out;
  }

 private:
  c10::Device device_{c10::kCPU};
  ModelInfo info_;
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader_;
};

}  // namespace

std::unique_ptr<Model> load_aoti_model(const fs::path& path) { return std::make_unique<AotiModel>(path); }

}  // namespace qd
