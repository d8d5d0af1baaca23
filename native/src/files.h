// The input folder listing and the output names derived from it.
#pragma once

#include <filesystem>
#include <stdexcept>
#include <string>
#include <vector>

namespace qd {

// A problem with the input or output folder; what() names the folder or file.
class FolderError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The .png, .jpg and .jpeg files (any letter case) directly in `dir`, sorted by name; hidden files are skipped.
// Throws FolderError when `dir` is not a folder or holds no such file.
std::vector<std::filesystem::path> list_images(const std::filesystem::path& dir);

struct OutputPaths {
  std::filesystem::path labels;  // OUT/NAME.png, train ids
  std::filesystem::path color;   // OUT/NAME_color.png, Cityscapes colours
};

OutputPaths output_paths(const std::filesystem::path& out_dir, const std::filesystem::path& image);

// Throws FolderError when two images would write the same output (a.png and a.jpg) or, unless `overwrite`,
// when an output file already exists.
void check_outputs(const std::filesystem::path& out_dir, const std::vector<std::filesystem::path>& images,
                   bool overwrite);

}  // namespace qd
