#include "stats.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace qd {

double percentile(std::vector<double> values, double q) {
  if (values.empty()) throw std::invalid_argument("percentile: no values");
  if (!(q >= 0.0 && q <= 100.0)) throw std::invalid_argument("percentile: q must lie in [0, 100]");
  std::sort(values.begin(), values.end());
  const double rank = q / 100.0 * static_cast<double>(values.size() - 1);
  const size_t below = static_cast<size_t>(std::floor(rank));
  const size_t above = std::min(below + 1, values.size() - 1);
  const double t = rank - static_cast<double>(below);
  return values[below] + t * (values[above] - values[below]);
}

}  // namespace qd
