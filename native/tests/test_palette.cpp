#include "check.h"
#include "palette.h"

QD_TEST(palette, cityscapes_colours_by_train_id) {
  // Spot checks against cityscapesScripts' labels.py: road, sky, person, bicycle.
  const std::uint8_t ids[4] = {0, 10, 11, 18};
  const std::vector<std::uint8_t> rgb = qd::colorize(ids, 4);
  const std::vector<std::uint8_t> expected = {128, 64, 128, 70, 130, 180, 220, 20, 60, 119, 11, 32};
  CHECK(rgb == expected);
  CHECK_EQ(qd::kCityscapesPalette.size(), static_cast<size_t>(19));
}

QD_TEST(palette, ids_without_colour_are_black) {
  const std::uint8_t ids[2] = {19, 255};
  const std::vector<std::uint8_t> rgb = qd::colorize(ids, 2);
  CHECK(rgb == std::vector<std::uint8_t>(6, 0));
}
