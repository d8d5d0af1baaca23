// qd_infer: segment a folder of images with a QueryDiff student exported as an AOTInductor package (.pt2) or a
// TensorRT engine. See `qd_infer --help`.
#include <exception>
#include <iostream>
#include <string>
#include <vector>

#include "args.h"
#include "runner.h"

int main(int argc, char** argv) {
  const std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty()) {
    std::cerr << qd::usage();
    return qd::kExitUsage;
  }
  qd::Options options;
  try {
    options = qd::parse_args(args);
  } catch (const qd::UsageError& e) {
    std::cerr << "qd_infer: error: " << e.what() << " (see qd_infer --help)\n";
    return qd::kExitUsage;
  }
  if (options.help) {
    std::cout << qd::usage();
    return qd::kExitOk;
  }
  try {
    return qd::run_infer(options);
  } catch (const std::exception& e) {
    std::cerr << "qd_infer: error: " << e.what() << "\n";
    return qd::kExitFailure;
  }
}
