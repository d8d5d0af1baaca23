// Latency summaries.
#pragma once

#include <vector>

namespace qd {

// The q-th percentile (0 ≤ q ≤ 100) with linear interpolation between the closest ranks, as numpy.percentile
// computes it by default. Throws std::invalid_argument for no values or q outside [0, 100].
double percentile(std::vector<double> values, double q);

}  // namespace qd
