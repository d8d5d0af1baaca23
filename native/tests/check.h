// A minimal test harness for the native unit tests: QD_TEST(group, name) defines a case, CHECK* macros throw on
// the first failed expectation, and `qd_native_tests GROUP` runs the cases of one group (ctest runs each group).
#pragma once

#include <filesystem>
#include <sstream>
#include <stdexcept>
#include <string>

namespace qd::test {

class Failure : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct Case {
  std::string group;
  std::string name;
  void (*body)();
};

void add_case(const char* group, const char* name, void (*body)());

// An empty folder for one test case, below the system temp folder.
std::filesystem::path scratch_dir(const std::string& name);

template <typename A, typename B>
void check_eq(const A& a, const B& b, const char* expr_a, const char* expr_b, const char* file, int line) {
  if (!(a == b)) {
    std::ostringstream s;
    s << file << ":" << line << ": CHECK_EQ(" << expr_a << ", " << expr_b << ") failed: " << a << " != " << b;
    throw Failure(s.str());
  }
}

}  // namespace qd::test

#define QD_TEST(group, name)                                                    \
  static void qd_test_##group##_##name();                                       \
  static const bool qd_test_added_##group##_##name =                            \
      (qd::test::add_case(#group, #name, &qd_test_##group##_##name), true);     \
  static void qd_test_##group##_##name()

#define CHECK(cond)                                                                                  \
  do {                                                                                               \
    if (!(cond)) throw qd::test::Failure(std::string(__FILE__) + ":" + std::to_string(__LINE__) +    \
                                         ": CHECK(" #cond ") failed");                               \
  } while (0)

#define CHECK_EQ(a, b) qd::test::check_eq((a), (b), #a, #b, __FILE__, __LINE__)

// Checks that `expr` throws `Type` whose what() contains `text`.
#define CHECK_THROWS(expr, Type, text)                                                                     \
  do {                                                                                                     \
    bool qd_thrown = false;                                                                                \
    try {                                                                                                  \
      (void)(expr);                                                                                        \
    } catch (const Type& e) {                                                                              \
      qd_thrown = true;                                                                                    \
      if (std::string(e.what()).find(text) == std::string::npos) {                                         \
        throw qd::test::Failure(std::string(__FILE__) + ":" + std::to_string(__LINE__) + ": " #expr        \
                                " threw '" + e.what() + "', expected it to mention '" + (text) + "'");      \
      }                                                                                                    \
    }                                                                                                      \
    if (!qd_thrown) {                                                                                      \
      throw qd::test::Failure(std::string(__FILE__) + ":" + std::to_string(__LINE__) + ": " #expr          \
                              " did not throw " #Type);                                                    \
    }                                                                                                      \
  } while (0)
