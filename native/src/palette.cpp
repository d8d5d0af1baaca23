#include "palette.h"

namespace qd {

std::vector<std::uint8_t> colorize(const std::uint8_t* labels, std::size_t n) {
  std::vector<std::uint8_t> rgb(n * 3, 0);
  for (std::size_t i = 0; i < n; ++i) {
    if (labels[i] < kCityscapesPalette.size()) {
      const auto& colour = kCityscapesPalette[labels[i]];
      rgb[i * 3 + 0] = colour[0];
      rgb[i * 3 + 1] = colour[1];
      rgb[i * 3 + 2] = colour[2];
    }
  }
  return rgb;
}

}  // namespace qd
