#include "files.h"

#include <algorithm>
#include <cctype>
#include <map>

namespace qd {
namespace fs = std::filesystem;

namespace {

bool is_image_name(const fs::path& p) {
  std::string ext = p.extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return std::tolower(c); });
  return ext == ".png" || ext == ".jpg" || ext == ".jpeg";
}

}  // namespace

std::vector<fs::path> list_images(const fs::path& dir) {
  std::error_code error;
  if (!fs::is_directory(dir, error)) {
    throw FolderError("--images: '" + dir.string() + "' " +
                      (fs::exists(dir, error) ? "is not a folder" : "does not exist"));
  }
  std::vector<fs::path> images;
  for (const auto& entry : fs::directory_iterator(dir, error)) {
    const fs::path& p = entry.path();
    if (p.filename().string().rfind('.', 0) == 0 || !is_image_name(p)) continue;
    // Its own error code: a dangling link's failed status is that entry's, not the listing's (it is skipped).
    std::error_code status_error;
    if (entry.is_regular_file(status_error)) images.push_back(p);
  }
  if (error) throw FolderError("--images: cannot list '" + dir.string() + "': " + error.message());
  if (images.empty()) throw FolderError("--images: no PNG or JPEG images in '" + dir.string() + "'");
  std::sort(images.begin(), images.end());
  return images;
}

OutputPaths output_paths(const fs::path& out_dir, const fs::path& image) {
  const std::string stem = image.stem().string();
  return {out_dir / (stem + ".png"), out_dir / (stem + "_color.png")};
}

void check_outputs(const fs::path& out_dir, const std::vector<fs::path>& images, bool overwrite) {
  std::map<fs::path, fs::path> writer;  // output file → the image that writes it
  for (const fs::path& image : images) {
    const OutputPaths out = output_paths(out_dir, image);
    for (const fs::path& target : {out.labels, out.color}) {
      const auto [it, inserted] = writer.emplace(target, image);
      if (!inserted) {
        throw FolderError("--images: '" + it->second.filename().string() + "' and '" + image.filename().string() +
                          "' would both write '" + target.string() + "'; rename one of them");
      }
      std::error_code error;
      if (!overwrite && fs::exists(target, error)) {
        throw FolderError("--out: '" + target.string() + "' exists; pass --overwrite to replace it");
      }
    }
  }
}

}  // namespace qd
