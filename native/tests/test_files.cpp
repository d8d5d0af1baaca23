#include <fstream>

#include "check.h"
#include "files.h"

namespace fs = std::filesystem;
using qd::FolderError;

namespace {
void touch(const fs::path& p) { std::ofstream(p) << "x"; }
}  // namespace

QD_TEST(files, lists_images_sorted_by_name) {
  const fs::path dir = qd::test::scratch_dir("list");
  for (const char* name : {"b.png", "a.JPG", "c.jpeg", ".hidden.png", "notes.txt", "d.png.bak"}) touch(dir / name);
  fs::create_directory(dir / "sub.png");  // a folder is not an image, whatever its name
  const auto images = qd::list_images(dir);
  CHECK_EQ(images.size(), static_cast<size_t>(3));
  CHECK_EQ(images[0].filename().string(), std::string("a.JPG"));
  CHECK_EQ(images[1].filename().string(), std::string("b.png"));
  CHECK_EQ(images[2].filename().string(), std::string("c.jpeg"));
}

QD_TEST(files, a_dangling_link_is_skipped_wherever_it_sorts) {
  const fs::path dir = qd::test::scratch_dir("dangling");
  touch(dir / "b.png");
  // Before and after the real image in directory order: its failed status must not fail the listing.
  fs::create_symlink(dir / "gone-a.png", dir / "a.png");
  fs::create_symlink(dir / "gone-z.png", dir / "z.png");
  const auto images = qd::list_images(dir);
  CHECK_EQ(images.size(), static_cast<size_t>(1));
  CHECK_EQ(images[0].filename().string(), std::string("b.png"));
}

QD_TEST(files, empty_or_missing_folder) {
  const fs::path dir = qd::test::scratch_dir("empty");
  touch(dir / "readme.txt");
  CHECK_THROWS(qd::list_images(dir), FolderError, "--images: no PNG or JPEG images in '" + dir.string() + "'");
  CHECK_THROWS(qd::list_images(dir / "absent"), FolderError, "' does not exist");
  CHECK_THROWS(qd::list_images(dir / "readme.txt"), FolderError, "' is not a folder");
}

QD_TEST(files, output_names) {
  const qd::OutputPaths out = qd::output_paths("out", "in/scene_01.jpg");
  CHECK_EQ(out.labels, fs::path("out/scene_01.png"));
  CHECK_EQ(out.color, fs::path("out/scene_01_color.png"));
}

QD_TEST(files, two_images_one_output) {
  CHECK_THROWS(qd::check_outputs("out", {"in/a.jpg", "in/a.png"}, false), FolderError,
               "'a.jpg' and 'a.png' would both write");
}

QD_TEST(files, existing_output_needs_overwrite) {
  const fs::path dir = qd::test::scratch_dir("existing");
  touch(dir / "a_color.png");
  CHECK_THROWS(qd::check_outputs(dir, {"in/a.png"}, false), FolderError, "exists; pass --overwrite");
  qd::check_outputs(dir, {"in/a.png"}, true);
}
