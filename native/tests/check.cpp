#include "check.h"

#include <unistd.h>

#include <iostream>
#include <vector>

namespace qd::test {

namespace {
std::vector<Case>& all_cases() {
  static std::vector<Case> cases;
  return cases;
}
}  // namespace

void add_case(const char* group, const char* name, void (*body)()) { all_cases().push_back({group, name, body}); }

std::filesystem::path scratch_dir(const std::string& name) {
  const auto dir = std::filesystem::temp_directory_path() /
                   ("qd_native_tests_" + std::to_string(::getpid())) / name;
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

}  // namespace qd::test

int main(int argc, char** argv) {
  const std::string group = argc > 1 ? argv[1] : "";
  int run = 0, failed = 0;
  for (const auto& c : qd::test::all_cases()) {
    if (!group.empty() && c.group != group) continue;
    ++run;
    try {
      c.body();
      std::cout << "PASS " << c.group << "." << c.name << "\n";
    } catch (const std::exception& e) {
      ++failed;
      std::cout << "FAIL " << c.group << "." << c.name << ": " << e.what() << "\n";
    }
  }
  std::filesystem::remove_all(std::filesystem::temp_directory_path() /
                              ("qd_native_tests_" + std::to_string(::getpid())));
  if (run == 0) {
    std::cout << "no test case in group '" << group << "'\n";
    return 1;
  }
  std::cout << run - failed << " of " << run << " passed\n";
  return failed == 0 ? 0 : 1;
}
