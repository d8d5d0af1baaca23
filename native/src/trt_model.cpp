// TensorRT backend (compiled only when CMake finds TensorRT 10+ and CUDA): deserializes an engine and runs it
// with the name-based I/O API (setInputShape, setTensorAddress, enqueueV3).
#include <NvInfer.h>
#if defined(QD_WITH_TRT_PLUGINS)
#include <NvInferPlugin.h>
#endif
#include <cuda_runtime_api.h>

#include <ATen/ops/empty.h>

#include <fstream>
#include <iterator>
#include <vector>

#include "model.h"

namespace qd {
namespace fs = std::filesystem;

namespace {

std::string quoted(const fs::path& path) { return "'" + path.string() + "'"; }

// TensorRT reports failures through the logger and returns null/false; keep the last error for our message.
// Warnings and information are dropped: qd_infer prints one line per problem.
class Logger final : public nvinfer1::ILogger {
 public:
  void log(Severity severity, nvinfer1::AsciiChar const* message) noexcept override {
    if (severity <= Severity::kERROR && message != nullptr) last_error_ = message;
  }
  std::string take_error() {
    std::string error = last_error_.empty() ? "no details from TensorRT" : last_error_;
    last_error_.clear();
    return error;
  }

 private:
  std::string last_error_;
};

#if defined(QD_WITH_TRT_PLUGINS)
// initLibNvInferPlugins keeps the logger's address for the rest of the process and is meant to be called once, so
// the plugins get a logger that lives as long as the process (not a model's, which dies with it), registered once.
void init_plugins_once() {
  static Logger plugin_logger;
  static const bool registered = initLibNvInferPlugins(&plugin_logger, "");
  (void)registered;
}
#endif

void check_cuda(cudaError_t status, const std::string& what) {
  if (status != cudaSuccess) throw ModelError(what + ": " + cudaGetErrorString(status));
}

struct CudaFree {
  void operator()(void* p) const { cudaFree(p); }
};
using DeviceBuffer = std::unique_ptr<void, CudaFree>;

std::size_t element_size(nvinfer1::DataType type) {
  switch (type) {
    case nvinfer1::DataType::kFLOAT:
    case nvinfer1::DataType::kINT32:
      return 4;
    case nvinfer1::DataType::kHALF:
    case nvinfer1::DataType::kBF16:
      return 2;
    case nvinfer1::DataType::kINT64:
      return 8;
    case nvinfer1::DataType::kINT8:
    case nvinfer1::DataType::kUINT8:
    case nvinfer1::DataType::kBOOL:
      return 1;
    default:
      throw ModelError("the engine has an input or output of a data type qd_infer does not read");
  }
}

at::ScalarType scalar_type(nvinfer1::DataType type) {
  switch (type) {
    case nvinfer1::DataType::kFLOAT:
      return at::kFloat;
    case nvinfer1::DataType::kHALF:
      return at::kHalf;
    case nvinfer1::DataType::kBF16:
      return at::kBFloat16;
    case nvinfer1::DataType::kINT32:
      return at::kInt;
    case nvinfer1::DataType::kINT64:
      return at::kLong;
    case nvinfer1::DataType::kINT8:
      return at::kChar;
    case nvinfer1::DataType::kUINT8:
      return at::kByte;
    case nvinfer1::DataType::kBOOL:
      return at::kBool;
    default:
      throw ModelError("the engine has an input or output of a data type qd_infer does not read");
  }
}

std::string shape_string(const nvinfer1::Dims& dims) {
  std::string s = "(";
  for (int32_t i = 0; i < dims.nbDims; ++i) s += (i ? ", " : "") + std::to_string(dims.d[i]);
  return s + ")";
}

std::int64_t volume(const nvinfer1::Dims& dims) {
  std::int64_t n = 1;
  for (int32_t i = 0; i < dims.nbDims; ++i) n *= dims.d[i];
  return n;
}

struct Binding {
  std::string name;
  nvinfer1::DataType type = nvinfer1::DataType::kFLOAT;
  DeviceBuffer buffer;
};

class TrtModel final : public Model {
 public:
  explicit TrtModel(const fs::path& path) {
    std::error_code error;
    if (!fs::is_regular_file(path, error)) {
      throw ModelError("--model: " + quoted(path) + (fs::exists(path, error) ? " is not a file" : " does not exist"));
    }
    int devices = 0;
    const cudaError_t status = cudaGetDeviceCount(&devices);
    if (status != cudaSuccess || devices == 0) {
      const std::string detail = status != cudaSuccess ? std::string(" (") + cudaGetErrorString(status) + ")" : "";
      throw ModelError(quoted(path) + " is a TensorRT engine, which runs on an NVIDIA GPU, but no CUDA device is "
                       "available" + detail);
    }
    cudaDeviceProp prop{};
    check_cuda(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");

    std::ifstream in(path, std::ios::binary);
    const std::vector<char> blob((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (!in.good() && !in.eof()) throw ModelError("cannot read " + quoted(path));
#if defined(QD_WITH_TRT_PLUGINS)
    // Engines exported with --msda plugin hold MultiscaleDeformableAttnPlugin_TRT layers from this library.
    init_plugins_once();
#endif
    runtime_.reset(nvinfer1::createInferRuntime(logger_));
    if (!runtime_) throw ModelError("cannot create the TensorRT runtime: " + logger_.take_error());
    engine_.reset(runtime_->deserializeCudaEngine(blob.data(), blob.size()));
    if (!engine_) {
      throw ModelError(quoted(path) + " cannot be loaded by TensorRT " + std::to_string(NV_TENSORRT_MAJOR) + "." +
                       std::to_string(NV_TENSORRT_MINOR) + " on " + prop.name + "; an engine only runs with the "
                       "TensorRT version and GPU model that built it (TensorRT: " + logger_.take_error() + ")");
    }
    context_.reset(engine_->createExecutionContext());
    if (!context_) throw ModelError("cannot create a TensorRT execution context: " + logger_.take_error());
    bind(path);
    check_cuda(cudaStreamCreate(&stream_), "cudaStreamCreate");
    info_.description = "TensorRT engine " + path.filename().string() + " on " + prop.name + ", input " +
                        std::to_string(info_.height) + "x" + std::to_string(info_.width) + ", batch " +
                        std::to_string(info_.batch_min) + ".." + std::to_string(info_.batch_max);
  }

  ~TrtModel() override {
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }

  const ModelInfo& info() const override { return info_; }

  Prediction run(const at::Tensor& images) override {
    nvinfer1::Dims shape = input_shape_;
    shape.d[0] = images.size(0);
    if (!context_->setInputShape(input_.name.c_str(), shape)) {
      throw ModelError("TensorRT rejected input shape " + shape_string(shape) + ": " + logger_.take_error());
    }
    const at::Tensor host_in = images.to(scalar_type(input_.type)).contiguous();
    check_cuda(cudaMemcpyAsync(input_.buffer.get(), host_in.data_ptr(), host_in.nbytes(), cudaMemcpyHostToDevice,
                               stream_),
               "copying the images to the GPU");
    if (!context_->enqueueV3(stream_)) throw ModelError("TensorRT inference failed: " + logger_.take_error());
    at::Tensor host_out[2];
    for (int i = 0; i < 2; ++i) {
      const nvinfer1::Dims dims = context_->getTensorShape(outputs_[i].name.c_str());
      host_out[i] = at::empty(std::vector<std::int64_t>(dims.d, dims.d + dims.nbDims), scalar_type(outputs_[i].type));
      check_cuda(cudaMemcpyAsync(host_out[i].data_ptr(), outputs_[i].buffer.get(), host_out[i].nbytes(),
                                 cudaMemcpyDeviceToHost, stream_),
                 "copying the results from the GPU");
    }
    check_cuda(cudaStreamSynchronize(stream_), "TensorRT inference");
    Prediction out;
    out.logits = host_out[logits_index_].to(at::kFloat);
    out.labels = host_out[1 - logits_index_];
    return out;
  }

 private:
  // Finds the image input and the (logits, labels) outputs, reads the input size and batch range (profile 0),
  // and allocates device buffers for the largest batch once, so a run only copies and enqueues.
  void bind(const fs::path& path) {
    std::vector<std::string> inputs, outputs;
    for (int32_t i = 0; i < engine_->getNbIOTensors(); ++i) {
      const char* name = engine_->getIOTensorName(i);
      const nvinfer1::TensorIOMode mode = engine_->getTensorIOMode(name);
      if (mode == nvinfer1::TensorIOMode::kINPUT) inputs.emplace_back(name);
      if (mode == nvinfer1::TensorIOMode::kOUTPUT) outputs.emplace_back(name);
    }
    if (inputs.size() != 1 || outputs.size() != 2) {
      throw ModelError(quoted(path) + " has " + std::to_string(inputs.size()) + " inputs and " +
                       std::to_string(outputs.size()) + " outputs; expected images -> (logits, labels) as "
                       "python -m export builds it");
    }
    input_.name = inputs[0];
    input_.type = engine_->getTensorDataType(input_.name.c_str());
    if (input_.type != nvinfer1::DataType::kFLOAT && input_.type != nvinfer1::DataType::kHALF) {
      throw ModelError(quoted(path) + ": input '" + input_.name + "' should be float32 or float16 RGB");
    }
    input_shape_ = engine_->getTensorShape(input_.name.c_str());
    const nvinfer1::Dims& s = input_shape_;
    if (s.nbDims != 4 || s.d[1] != 3 || s.d[2] <= 0 || s.d[3] <= 0) {
      throw ModelError(quoted(path) + ": input '" + input_.name + "' has shape " + shape_string(s) +
                       "; expected (B, 3, H, W) with a fixed H and W");
    }
    info_.height = s.d[2];
    info_.width = s.d[3];
    if (s.d[0] > 0) {
      info_.batch_min = info_.batch_max = s.d[0];
    } else {
      info_.batch_min = engine_->getProfileShape(input_.name.c_str(), 0, nvinfer1::OptProfileSelector::kMIN).d[0];
      info_.batch_max = engine_->getProfileShape(input_.name.c_str(), 0, nvinfer1::OptProfileSelector::kMAX).d[0];
    }
    nvinfer1::Dims largest = s;
    largest.d[0] = info_.batch_max;
    if (!context_->setInputShape(input_.name.c_str(), largest)) {
      throw ModelError(quoted(path) + ": TensorRT rejected input shape " + shape_string(largest) + ": " +
                       logger_.take_error());
    }
    input_.buffer = allocate(volume(largest) * element_size(input_.type));
    for (int i = 0; i < 2; ++i) {
      outputs_[i].name = outputs[i];
      outputs_[i].type = engine_->getTensorDataType(outputs[i].c_str());
      const nvinfer1::Dims dims = context_->getTensorShape(outputs[i].c_str());
      if (dims.nbDims == 4) logits_index_ = i;
      outputs_[i].buffer = allocate(volume(dims) * element_size(outputs_[i].type));
    }
    const nvinfer1::Dims first = context_->getTensorShape(outputs_[0].name.c_str());
    const nvinfer1::Dims second = context_->getTensorShape(outputs_[1].name.c_str());
    if (first.nbDims + second.nbDims != 7) {
      throw ModelError(quoted(path) + ": outputs have shapes " + shape_string(first) + " and " + shape_string(second) +
                       "; expected logits (B, K, H/4, W/4) and labels (B, H, W)");
    }
    for (Binding* b : {&input_, &outputs_[0], &outputs_[1]}) {
      if (!context_->setTensorAddress(b->name.c_str(), b->buffer.get())) {
        throw ModelError(quoted(path) + ": cannot bind tensor '" + b->name + "': " + logger_.take_error());
      }
    }
  }

  static DeviceBuffer allocate(std::int64_t bytes) {
    void* p = nullptr;
    check_cuda(cudaMalloc(&p, static_cast<std::size_t>(bytes)), "cudaMalloc of " + std::to_string(bytes) + " bytes");
    return DeviceBuffer(p);
  }

  // Declared in destruction order: the logger must outlive everything TensorRT created with it.
  Logger logger_;
  std::unique_ptr<nvinfer1::IRuntime> runtime_;
  std::unique_ptr<nvinfer1::ICudaEngine> engine_;
  std::unique_ptr<nvinfer1::IExecutionContext> context_;
  cudaStream_t stream_ = nullptr;
  Binding input_;
  Binding outputs_[2];
  int logits_index_ = 0;
  nvinfer1::Dims input_shape_{};
  ModelInfo info_;
};

}  // namespace

std::unique_ptr<Model> load_tensorrt_model(const fs::path& path) { return std::make_unique<TrtModel>(path); }

bool tensorrt_available() { return true; }

}  // namespace qd
