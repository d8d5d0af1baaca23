#include "args.h"

#include <algorithm>
#include <cctype>
#include <limits>
#include <optional>

namespace qd {
namespace {

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s;
}

// libtorch sizes its thread pool from --threads; tens of thousands of threads crash its teardown at exit.
constexpr int kMaxThreads = 1024;

int parse_int(const std::string& name, const std::string& text, int min_value,
              int max_value = std::numeric_limits<int>::max()) {
  std::string expected =
      min_value == 0 ? "a non-negative integer" : "an integer >= " + std::to_string(min_value);
  if (max_value < std::numeric_limits<int>::max()) expected += " and <= " + std::to_string(max_value);
  size_t used = 0;
  long value = 0;
  try {
    value = std::stol(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (text.empty() || used != text.size() || value < min_value || value > max_value) {
    throw UsageError(name + ": expected " + expected + ", got '" + text + "'");
  }
  return static_cast<int>(value);
}

}  // namespace

std::string usage() {
  return "usage: qd_infer --model student.pt2|student.engine --images DIR --out DIR\n"
         "                [--batch N] [--warmup W] [--iters I] [--threads T] [--timings FILE] [--overwrite]\n"
         "\n"
         "Segments every PNG and JPEG image in DIR with an AOTInductor package (.pt2) or a TensorRT engine\n"
         "(.engine, .plan, .trt) and writes, for each image NAME.ext, OUT/NAME.png (train ids, 8-bit) and\n"
         "OUT/NAME_color.png (Cityscapes colours). Images are resized to the model's input size and the labels\n"
         "back to the image's size.\n"
         "\n"
         "  --model PATH    the model file\n"
         "  --images DIR    folder of input images (.png, .jpg, .jpeg)\n"
         "  --out DIR       output folder (created if missing)\n"
         "  --batch N       images per forward pass (default 1; within the model's batch range)\n"
         "  --warmup W      untimed passes on the first batch before timing (default 1)\n"
         "  --iters I       timed passes per batch; latency percentiles cover all of them (default 1)\n"
         "  --threads T     CPU threads for libtorch, at most 1024 (default 0: one per core)\n"
         "  --timings FILE  also write every timed pass as JSON: {\"batch\", \"threads\", \"warmup\",\n"
         "                  \"runs\": [[milliseconds, images], ...]} (for benchmark reports)\n"
         "  --overwrite     replace existing output files\n"
         "  --help          print this text\n"
         "\n"
         "Exit status: 0 all images written, 1 a model, image or output error, 2 a command-line error.\n";
}

Options parse_args(const std::vector<std::string>& args) {
  Options opt;
  std::optional<std::string> model, images, out;
  for (size_t i = 0; i < args.size(); ++i) {
    std::string name = args[i];
    std::optional<std::string> inline_value;
    if (const size_t eq = name.find('='); name.rfind("--", 0) == 0 && eq != std::string::npos) {
      inline_value = name.substr(eq + 1);
      name = name.substr(0, eq);
    }
    if (name == "--help" || name == "-h") {
      opt.help = true;
      continue;
    }
    if (name == "--overwrite") {
      if (inline_value) throw UsageError("--overwrite: takes no value");
      opt.overwrite = true;
      continue;
    }
    const bool known = name == "--model" || name == "--images" || name == "--out" || name == "--batch" ||
                       name == "--warmup" || name == "--iters" || name == "--threads" || name == "--timings";
    if (!known) {
      throw UsageError(name.rfind("-", 0) == 0 ? "unknown option '" + name + "'"
                                               : "unexpected argument '" + name + "'");
    }
    std::string value;
    if (inline_value) {
      value = *inline_value;
    } else {
      // "--out --overwrite" is a forgotten value, not a folder named "--overwrite" ("--out=--x" still is one).
      if (i + 1 >= args.size() || args[i + 1].rfind("--", 0) == 0) throw UsageError(name + ": missing value");
      value = args[++i];
    }
    if (name == "--model") model = value;
    if (name == "--images") images = value;
    if (name == "--out") out = value;
    if (name == "--batch") opt.batch = parse_int(name, value, 1);
    if (name == "--warmup") opt.warmup = parse_int(name, value, 0);
    if (name == "--iters") opt.iters = parse_int(name, value, 1);
    if (name == "--threads") opt.threads = parse_int(name, value, 0, kMaxThreads);
    if (name == "--timings") {
      if (value.empty()) throw UsageError("--timings: expected a file path, got ''");
      opt.timings = value;
    }
  }
  if (opt.help) return opt;
  for (const auto& [flag, value] : {std::pair{"--model", &model}, {"--images", &images}, {"--out", &out}}) {
    if (!*value || (*value)->empty()) throw UsageError(std::string(flag) + ": required");
  }
  opt.model = *model;
  opt.images = *images;
  opt.out = *out;
  model_kind(opt.model);
  return opt;
}

ModelKind model_kind(const std::filesystem::path& model) {
  const std::string suffix = lower(model.extension().string());
  if (suffix == ".pt2") return ModelKind::kAotInductor;
  if (suffix == ".engine" || suffix == ".plan" || suffix == ".trt") return ModelKind::kTensorRT;
  throw UsageError("--model: expected an AOTInductor package (.pt2) or a TensorRT engine (.engine, .plan, .trt), "
                   "got '" + model.string() + "'");
}

}  // namespace qd
