// Command line of qd_infer.
#pragma once

#include <filesystem>
#include <stdexcept>
#include <string>
#include <vector>

namespace qd {

// A bad command line; qd_infer prints it as one line and exits with kExitUsage.
class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

inline constexpr int kExitOk = 0;
inline constexpr int kExitFailure = 1;  // a model, image or output problem
inline constexpr int kExitUsage = 2;    // the command line itself is wrong

enum class ModelKind { kAotInductor, kTensorRT };

struct Options {
  std::filesystem::path model;
  std::filesystem::path images;
  std::filesystem::path out;
  std::filesystem::path timings;  // empty: no timings file
  int batch = 1;
  int warmup = 1;
  int iters = 1;
  int threads = 0;  // 0 keeps libtorch's default (one per core)
  bool overwrite = false;
  bool help = false;
};

// Parses the arguments after the program name. `--name value` and `--name=value` are both accepted.
// Throws UsageError naming the option and what was expected.
Options parse_args(const std::vector<std::string>& args);

// The backend a model file needs, from its suffix: .pt2 → AOTInductor; .engine, .plan, .trt → TensorRT.
ModelKind model_kind(const std::filesystem::path& model);

std::string usage();

}  // namespace qd
