#include "args.h"
#include "check.h"

using qd::ModelKind;
using qd::parse_args;
using qd::UsageError;

QD_TEST(args, required_options_and_defaults) {
  const qd::Options o = parse_args({"--model", "m.pt2", "--images", "in", "--out", "out"});
  CHECK_EQ(o.model.string(), std::string("m.pt2"));
  CHECK_EQ(o.images.string(), std::string("in"));
  CHECK_EQ(o.out.string(), std::string("out"));
  CHECK_EQ(o.batch, 1);
  CHECK_EQ(o.warmup, 1);
  CHECK_EQ(o.iters, 1);
  CHECK_EQ(o.threads, 0);
  CHECK(o.timings.empty());
  CHECK(!o.overwrite);
}

QD_TEST(args, timings_file) {
  const qd::Options o = parse_args({"--model", "m.pt2", "--images", "in", "--out", "o", "--timings", "t.json"});
  CHECK_EQ(o.timings.string(), std::string("t.json"));
  CHECK_THROWS(parse_args({"--model", "m.pt2", "--images", "in", "--out", "o", "--timings="}), UsageError,
               "--timings: expected a file path");
}

QD_TEST(args, every_option_in_both_spellings) {
  const qd::Options o = parse_args({"--model=m.engine", "--images", "in", "--out=out", "--batch", "3", "--warmup=0",
                                    "--iters", "5", "--threads=2", "--overwrite"});
  CHECK_EQ(o.model.string(), std::string("m.engine"));
  CHECK_EQ(o.out.string(), std::string("out"));
  CHECK_EQ(o.batch, 3);
  CHECK_EQ(o.warmup, 0);
  CHECK_EQ(o.iters, 5);
  CHECK_EQ(o.threads, 2);
  CHECK(o.overwrite);
}

QD_TEST(args, unknown_option) {
  CHECK_THROWS(parse_args({"--model", "m.pt2", "--bogus", "1"}), UsageError, "unknown option '--bogus'");
  CHECK_THROWS(parse_args({"stray"}), UsageError, "unexpected argument 'stray'");
}

QD_TEST(args, missing_value) {
  CHECK_THROWS(parse_args({"--images", "in", "--out", "o", "--model"}), UsageError, "--model: missing value");
}

QD_TEST(args, a_flag_is_not_taken_for_a_value) {
  CHECK_THROWS(parse_args({"--model", "m.pt2", "--images", "in", "--out", "--overwrite"}), UsageError,
               "--out: missing value");
  CHECK_THROWS(parse_args({"--model", "m.pt2", "--images", "--out", "o"}), UsageError, "--images: missing value");
  // A value that does start with two dashes is still possible in the --name=value spelling.
  CHECK_EQ(parse_args({"--model", "m.pt2", "--images", "in", "--out=--odd"}).out.string(), std::string("--odd"));
}

QD_TEST(args, threads_are_capped) {
  const std::vector<std::string> base = {"--model", "m.pt2", "--images", "in", "--out", "o", "--threads"};
  auto with = [&](const std::string& value) {
    std::vector<std::string> a = base;
    a.push_back(value);
    return parse_args(a);
  };
  CHECK_EQ(with("1024").threads, 1024);
  CHECK_THROWS(with("1025"), UsageError, "--threads: expected a non-negative integer and <= 1024, got '1025'");
}

QD_TEST(args, integers_are_validated) {
  const std::vector<std::string> base = {"--model", "m.pt2", "--images", "in", "--out", "o"};
  auto with = [&](const std::string& flag, const std::string& value) {
    std::vector<std::string> a = base;
    a.push_back(flag);
    a.push_back(value);
    return parse_args(a);
  };
  CHECK_THROWS(with("--batch", "0"), UsageError, "--batch: expected an integer >= 1, got '0'");
  CHECK_THROWS(with("--batch", "2x"), UsageError, "--batch: expected an integer >= 1, got '2x'");
  CHECK_THROWS(with("--iters", ""), UsageError, "--iters: expected an integer >= 1, got ''");
  CHECK_THROWS(with("--warmup", "-1"), UsageError, "--warmup: expected a non-negative integer, got '-1'");
  CHECK_THROWS(with("--threads", "99999999999"), UsageError, "--threads: expected a non-negative integer");
  CHECK_EQ(with("--warmup", "0").warmup, 0);
}

QD_TEST(args, required_options) {
  CHECK_THROWS(parse_args({"--images", "in", "--out", "o"}), UsageError, "--model: required");
  CHECK_THROWS(parse_args({"--model", "m.pt2", "--out", "o"}), UsageError, "--images: required");
  CHECK_THROWS(parse_args({"--model", "m.pt2", "--images", "in"}), UsageError, "--out: required");
  CHECK_THROWS(parse_args({"--model=", "--images", "in", "--out", "o"}), UsageError, "--model: required");
}

QD_TEST(args, help_needs_nothing_else) { CHECK(parse_args({"--help"}).help); }

QD_TEST(args, flag_takes_no_value) {
  CHECK_THROWS(parse_args({"--overwrite=yes"}), UsageError, "--overwrite: takes no value");
}

QD_TEST(args, model_kind_from_suffix) {
  CHECK(qd::model_kind("a/student.pt2") == ModelKind::kAotInductor);
  CHECK(qd::model_kind("student.PT2") == ModelKind::kAotInductor);
  CHECK(qd::model_kind("student.engine") == ModelKind::kTensorRT);
  CHECK(qd::model_kind("student.plan") == ModelKind::kTensorRT);
  CHECK(qd::model_kind("student.trt") == ModelKind::kTensorRT);
  CHECK_THROWS(qd::model_kind("student.onnx"), UsageError, "got 'student.onnx'");
  CHECK_THROWS(parse_args({"--model", "m", "--images", "in", "--out", "o"}), UsageError, "--model: expected");
}
