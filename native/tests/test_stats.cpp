#include <cmath>
#include <stdexcept>

#include "check.h"
#include "stats.h"

QD_TEST(stats, percentile_interpolates_like_numpy) {
  // numpy.percentile([4, 1, 3, 2], q) for q = 0, 50, 90, 100.
  const std::vector<double> v = {4.0, 1.0, 3.0, 2.0};
  CHECK(std::abs(qd::percentile(v, 0.0) - 1.0) < 1e-12);
  CHECK(std::abs(qd::percentile(v, 50.0) - 2.5) < 1e-12);
  CHECK(std::abs(qd::percentile(v, 90.0) - 3.7) < 1e-12);
  CHECK(std::abs(qd::percentile(v, 100.0) - 4.0) < 1e-12);
  CHECK(std::abs(qd::percentile({7.0}, 90.0) - 7.0) < 1e-12);
}

QD_TEST(stats, percentile_rejects_bad_input) {
  CHECK_THROWS(qd::percentile({}, 50.0), std::invalid_argument, "no values");
  CHECK_THROWS(qd::percentile({1.0}, 101.0), std::invalid_argument, "q must lie in [0, 100]");
}
