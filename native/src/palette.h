// The Cityscapes colours of the 19 evaluation classes (train ids), as in qd_core/classes.py.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace qd {

inline constexpr std::array<std::array<std::uint8_t, 3>, 19> kCityscapesPalette = {{
    {128, 64, 128}, {244, 35, 232}, {70, 70, 70},    {102, 102, 156}, {190, 153, 153},
    {153, 153, 153}, {250, 170, 30}, {220, 220, 0},   {107, 142, 35},  {152, 251, 152},
    {70, 130, 180},  {220, 20, 60},  {255, 0, 0},     {0, 0, 142},     {0, 0, 70},
    {0, 60, 100},    {0, 80, 100},   {0, 0, 230},     {119, 11, 32},
}};

// Train ids (n pixels) → interleaved RGB (3n bytes); ids without a colour (255 = ignore) are black.
std::vector<std::uint8_t> colorize(const std::uint8_t* labels, std::size_t n);

}  // namespace qd
