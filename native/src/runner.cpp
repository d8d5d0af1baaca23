#include "runner.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/upsample_bilinear2d.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include "files.h"
#include "image_io.h"
#include "model.h"
#include "palette.h"
#include "stats.h"

namespace qd {
namespace fs = std::filesystem;

namespace {

struct Decoded {
  fs::path path;
  Image image;
};

struct Timing {
  double batch_ms;
  int images;
};

std::string format_ms(double ms) {
  char text[32];
  std::snprintf(text, sizeof text, "%.3f", ms);
  return text;
}

std::string shape_of(const at::Tensor& t) {
  std::string s = "(";
  for (std::int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + ")";
}

std::unique_ptr<Model> load_model(const fs::path& path) {
  if (model_kind(path) == ModelKind::kTensorRT) return load_tensorrt_model(path);
  return load_aoti_model(path);
}

// (padded, 3, H, W) float RGB: images of another size are resized bilinearly (half-pixel centres, no
// anti-aliasing) on their uint8 pixels, by the same ATen kernel and memory layout as
// qd_core.data.transforms.resize_image, so the model sees the values the Python side (training, evaluation,
// export.infer) gives it; slots past the real images repeat the last one to reach the batch minimum.
at::Tensor make_batch(const std::vector<Decoded>& batch, const ModelInfo& info, std::int64_t padded) {
  at::Tensor x = at::empty({padded, 3, info.height, info.width}, at::kFloat);
  for (std::size_t i = 0; i < batch.size(); ++i) {
    const Image& im = batch[i].image;
    at::Tensor hwc = at::from_blob(const_cast<std::uint8_t*>(im.rgb.data()), {im.height, im.width, 3}, at::kByte);
    // A channels-last view, as in Python: ATen's fixed-point uint8 kernel rounds to whole grey levels like OpenCV.
    at::Tensor chw = hwc.permute({2, 0, 1}).unsqueeze(0);
    if (im.height != info.height || im.width != info.width) {
      chw = at::upsample_bilinear2d(chw, {info.height, info.width}, /*align_corners=*/false);
    }
    x[static_cast<std::int64_t>(i)].copy_(chw[0].to(at::kFloat));
  }
  for (std::int64_t i = static_cast<std::int64_t>(batch.size()); i < padded; ++i) {
    x[i].copy_(x[static_cast<std::int64_t>(batch.size()) - 1]);
  }
  return x;
}

// The source row (or column) of each output one under OpenCV's INTER_NEAREST, as the Python side resizes labels
// (qd_core.data.transforms.nearest_indices): floor(dst · (1 / (out / in))) in double, capped at in − 1. Exact
// integer division and ATen's nearest kernel (a float scale) each differ from it by one row at a few sizes.
std::vector<int> nearest_indices(int in, int out) {
  const double scale = 1.0 / (static_cast<double>(out) / in);
  std::vector<int> index(static_cast<std::size_t>(out));
  for (int i = 0; i < out; ++i) index[i] = std::min(static_cast<int>(std::floor(i * scale)), in - 1);
  return index;
}

// Nearest-neighbour resize of a (in_h, in_w) label map to (out_h, out_w), the labels export.infer writes.
std::vector<std::uint8_t> resize_labels(const std::uint8_t* labels, int in_h, int in_w, int out_h, int out_w) {
  const std::vector<int> rows = nearest_indices(in_h, out_h), cols = nearest_indices(in_w, out_w);
  std::vector<std::uint8_t> out(static_cast<std::size_t>(out_h) * out_w);
  for (int y = 0; y < out_h; ++y) {
    const std::uint8_t* src = labels + static_cast<std::size_t>(rows[y]) * in_w;
    std::uint8_t* dst = out.data() + static_cast<std::size_t>(y) * out_w;
    for (int x = 0; x < out_w; ++x) dst[x] = src[cols[x]];
  }
  return out;
}

class Runner {
 public:
  Runner(const Options& options, Model& model, std::size_t total)
      : options_(options), model_(model), info_(model.info()), total_(total) {}

  // Runs one batch of decoded images `iters` times (after the warm-up, before the first batch) and writes the
  // results of the last run.
  void process(const std::vector<Decoded>& batch) {
    const auto n = static_cast<std::int64_t>(batch.size());
    const at::Tensor x = make_batch(batch, info_, std::max(n, info_.batch_min));
    if (!warmed_up_) {
      for (int i = 0; i < options_.warmup; ++i) model_.run(x);
      warmed_up_ = true;
    }
    Prediction result;
    std::vector<double> runs;
    for (int i = 0; i < options_.iters; ++i) {
      const auto start = std::chrono::steady_clock::now();
      result = model_.run(x);
      const std::chrono::duration<double, std::milli> elapsed = std::chrono::steady_clock::now() - start;
      runs.push_back(elapsed.count());
      timings_.push_back({elapsed.count(), static_cast<int>(n)});
    }
    const double batch_ms = percentile(runs, 50.0);
    const at::Tensor labels = checked_labels(result.labels, x.size(0));
    for (std::int64_t i = 0; i < n; ++i) write(batch[i], labels[i], batch_ms, static_cast<int>(n));
  }

  int failures() const { return failures_; }
  void fail(const std::string& message) {
    std::cerr << "qd_infer: error: " << message << "\n";
    ++failures_;
    ++done_;
  }

  void summary() const {
    const std::size_t written = done_ - failures_;
    std::cout << "wrote " << written << " of " << total_ << " images to " << options_.out.string();
    if (failures_ > 0) std::cout << " (" << failures_ << " failed)";
    std::cout << "\n";
    if (timings_.empty()) return;
    std::vector<double> batch_ms, image_ms;
    double total_ms = 0.0;
    int images = 0;
    for (const Timing& t : timings_) {
      batch_ms.push_back(t.batch_ms);
      image_ms.push_back(t.batch_ms / t.images);
      total_ms += t.batch_ms;
      images += t.images;
    }
    std::cout << "latency per batch p50 " << format_ms(percentile(batch_ms, 50.0)) << " ms p90 "
              << format_ms(percentile(batch_ms, 90.0)) << " ms | per image p50 "
              << format_ms(percentile(image_ms, 50.0)) << " ms p90 " << format_ms(percentile(image_ms, 90.0))
              << " ms | "
              << format_ms(1000.0 * images / total_ms) << " images/s (" << timings_.size()
              << " timed runs, batch " << options_.batch << ", warm-up " << options_.warmup << ")\n";
  }

  // Every timed pass as JSON, through a temporary file renamed into place so a reader never sees half of it.
  void write_timings(const fs::path& path) const {
    const fs::path tmp = path.string() + ".tmp";
    {
      std::ofstream f(tmp);
      f << "{\"batch\": " << options_.batch << ", \"threads\": " << at::get_num_threads()
        << ", \"warmup\": " << options_.warmup << ", \"runs\": [";
      for (std::size_t i = 0; i < timings_.size(); ++i) {
        f << (i ? ", " : "") << "[" << format_ms(timings_[i].batch_ms) << ", " << timings_[i].images << "]";
      }
      f << "]}\n";
      f.close();  // a full disk shows only when the buffer is flushed: check after closing
      if (f.fail()) {
        std::error_code ignored;
        fs::remove(tmp, ignored);
        throw FolderError("--timings: cannot write '" + tmp.string() + "'");
      }
    }
    std::error_code error;
    fs::rename(tmp, path, error);
    if (error) {
      std::error_code ignored;
      fs::remove(tmp, ignored);
      throw FolderError("--timings: cannot write '" + path.string() + "': " + error.message());
    }
  }

 private:
  at::Tensor checked_labels(const at::Tensor& labels, std::int64_t batch) const {
    if (labels.dim() != 3 || labels.size(0) != batch || labels.size(1) != info_.height ||
        labels.size(2) != info_.width) {
      throw ModelError("the model returned labels of shape " + shape_of(labels) + "; expected (" +
                       std::to_string(batch) + ", " + std::to_string(info_.height) + ", " +
                       std::to_string(info_.width) + ")");
    }
    // Train ids are stored as 8-bit PNG; the 19 classes are far below the limit, but a foreign model might not be.
    if (labels.numel() > 0 && (labels.min().item<std::int64_t>() < 0 || labels.max().item<std::int64_t>() > 255)) {
      throw ModelError("the model returned label ids outside 0..255, which an 8-bit label PNG cannot hold");
    }
    return labels.to(at::kByte).contiguous();
  }

  void write(const Decoded& item, const at::Tensor& labels, double batch_ms, int batch_size) {
    const Image& im = item.image;
    const auto* data = labels.data_ptr<std::uint8_t>();
    std::vector<std::uint8_t> resized;
    if (im.height != info_.height || im.width != info_.width) {
      resized = resize_labels(data, static_cast<int>(info_.height), static_cast<int>(info_.width), im.height, im.width);
      data = resized.data();
    }
    const OutputPaths out = output_paths(options_.out, item.path);
    try {
      write_png(out.labels, data, im.height, im.width, 1);
      const std::vector<std::uint8_t> rgb = colorize(data, static_cast<std::size_t>(im.height) * im.width);
      write_png(out.color, rgb.data(), im.height, im.width, 3);
    } catch (const ImageError& e) {
      fail(e.what());
      return;
    }
    ++done_;
    std::cout << "[" << done_ << "/" << total_ << "] " << item.path.filename().string() << " " << im.height << "x"
              << im.width << " -> " << out.labels.filename().string() << "  " << format_ms(batch_ms)
              << " ms (batch of " << batch_size << ")\n";
  }

  const Options& options_;
  Model& model_;
  const ModelInfo& info_;
  std::size_t total_;
  std::size_t done_ = 0;
  int failures_ = 0;
  bool warmed_up_ = false;
  std::vector<Timing> timings_;
};

}  // namespace

int run_infer(const Options& options) {
  // The cheap checks come first, so that a wrong folder is reported before the model loads.
  std::error_code error;
  if (!fs::is_regular_file(options.model, error)) {
    throw ModelError("--model: '" + options.model.string() + "' " +
                     (fs::exists(options.model, error) ? "is not a file" : "does not exist"));
  }
  const std::vector<fs::path> images = list_images(options.images);
  check_outputs(options.out, images, options.overwrite);
  if (options.threads > 0) at::set_num_threads(options.threads);

  std::unique_ptr<Model> model = load_model(options.model);
  const ModelInfo& info = model->info();
  if (options.batch < info.batch_min || options.batch > info.batch_max) {
    throw ModelError("--batch " + std::to_string(options.batch) + ": the model takes batches of " +
                     std::to_string(info.batch_min) + " to " + std::to_string(info.batch_max) + " images");
  }
  fs::create_directories(options.out, error);
  if (error) throw FolderError("--out: cannot create '" + options.out.string() + "': " + error.message());
  std::cout << info.description << "; " << images.size() << " images, batch " << options.batch << "\n";

  Runner runner(options, *model, images.size());
  std::vector<Decoded> pending;
  for (std::size_t i = 0; i < images.size(); ++i) {
    try {
      pending.push_back({images[i], read_image(images[i])});
    } catch (const ImageError& e) {
      runner.fail(e.what());
    }
    if (static_cast<int>(pending.size()) == options.batch || (i + 1 == images.size() && !pending.empty())) {
      runner.process(pending);
      pending.clear();
    }
  }
  runner.summary();
  if (!options.timings.empty()) runner.write_timings(options.timings);
  return runner.failures() == 0 ? kExitOk : kExitFailure;
}

}  // namespace qd
