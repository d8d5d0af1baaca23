#include <png.h>
#include <stdio.h>
// jpeglib.h needs FILE and size_t declared first.
#include <jpeglib.h>

#include <cstdlib>
#include <cstring>
#include <fstream>

#include "check.h"
#include "image_io.h"

namespace fs = std::filesystem;
using qd::ImageError;

namespace {

// A smooth test picture: JPEG keeps gradients nearly intact, so decoding errors stand out.
std::vector<std::uint8_t> gradient(int h, int w) {
  std::vector<std::uint8_t> rgb(static_cast<size_t>(h) * w * 3);
  for (int y = 0; y < h; ++y) {
    for (int x = 0; x < w; ++x) {
      std::uint8_t* p = &rgb[(static_cast<size_t>(y) * w + x) * 3];
      p[0] = static_cast<std::uint8_t>(255 * x / (w - 1));
      p[1] = static_cast<std::uint8_t>(255 * y / (h - 1));
      p[2] = 128;
    }
  }
  return rgb;
}

void write_jpeg(const fs::path& path, const std::uint8_t* pixels, int h, int w, int channels, int quality) {
  FILE* file = std::fopen(path.c_str(), "wb");
  CHECK(file != nullptr);
  jpeg_compress_struct info;
  jpeg_error_mgr errors;
  info.err = jpeg_std_error(&errors);
  jpeg_create_compress(&info);
  jpeg_stdio_dest(&info, file);
  info.image_width = static_cast<JDIMENSION>(w);
  info.image_height = static_cast<JDIMENSION>(h);
  info.input_components = channels;
  // 4 channels: CMYK, stored as CMYK with an Adobe marker (what jpeg_set_defaults picks for it).
  info.in_color_space = channels == 4 ? JCS_CMYK : channels == 3 ? JCS_RGB : JCS_GRAYSCALE;
  jpeg_set_defaults(&info);
  jpeg_set_quality(&info, quality, TRUE);
  jpeg_start_compress(&info, TRUE);
  while (info.next_scanline < info.image_height) {
    JSAMPROW row = const_cast<std::uint8_t*>(&pixels[static_cast<size_t>(info.next_scanline) * w * channels]);
    jpeg_write_scanlines(&info, &row, 1);
  }
  jpeg_finish_compress(&info);
  jpeg_destroy_compress(&info);
  std::fclose(file);
}

void truncate_file(const fs::path& path) { fs::resize_file(path, fs::file_size(path) / 2); }

// A PNG with libpng's low-level writer: any bit depth and colour type, optionally a gAMA chunk. `bytes` holds the
// rows as stored (16-bit samples big-endian).
void write_png_raw(const fs::path& path, int h, int w, int bit_depth, int color_type,
                   const std::vector<std::uint8_t>& bytes, double gamma) {
  FILE* file = std::fopen(path.c_str(), "wb");
  CHECK(file != nullptr);
  png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, nullptr, nullptr, nullptr);
  png_infop info = png_create_info_struct(png);
  png_init_io(png, file);
  png_set_IHDR(png, info, static_cast<png_uint_32>(w), static_cast<png_uint_32>(h), bit_depth, color_type,
               PNG_INTERLACE_NONE, PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
  if (gamma > 0) png_set_gAMA(png, info, gamma);
  png_write_info(png, info);
  const size_t stride = bytes.size() / static_cast<size_t>(h);
  for (int y = 0; y < h; ++y) png_write_row(png, const_cast<std::uint8_t*>(&bytes[y * stride]));
  png_write_end(png, nullptr);
  png_destroy_write_struct(&png, &info);
  std::fclose(file);
}

int max_abs_diff(const std::vector<std::uint8_t>& a, const std::vector<std::uint8_t>& b) {
  int worst = 0;
  for (size_t i = 0; i < a.size(); ++i) worst = std::max(worst, std::abs(int(a[i]) - int(b[i])));
  return worst;
}

}  // namespace

QD_TEST(image_io, png_rgb_round_trip_is_exact) {
  const fs::path path = qd::test::scratch_dir("png_rgb") / "g.png";
  const auto rgb = gradient(5, 7);
  qd::write_png(path, rgb.data(), 5, 7, 3);
  const qd::Image im = qd::read_image(path);
  CHECK_EQ(im.height, 5);
  CHECK_EQ(im.width, 7);
  CHECK(im.rgb == rgb);
  CHECK(!fs::exists(path.string() + ".tmp"));
}

QD_TEST(image_io, png_label_round_trip_is_exact) {
  const fs::path path = qd::test::scratch_dir("png_gray") / "labels.png";
  std::vector<std::uint8_t> labels;
  for (int i = 0; i < 20; ++i) labels.push_back(static_cast<std::uint8_t>(i < 19 ? i : 255));
  qd::write_png(path, labels.data(), 4, 5, 1);
  int h = 0, w = 0;
  CHECK(qd::read_png(path, 1, &h, &w) == labels);
  CHECK_EQ(h, 4);
  CHECK_EQ(w, 5);
  // A grey image read as a picture becomes RGB with equal channels.
  const qd::Image im = qd::read_image(path);
  CHECK_EQ(im.rgb[3 * 7 + 0], 7);
  CHECK_EQ(im.rgb[3 * 7 + 1], 7);
  CHECK_EQ(im.rgb[3 * 7 + 2], 7);
}

QD_TEST(image_io, png_alpha_is_dropped_not_blended) {
  const fs::path path = qd::test::scratch_dir("png_alpha") / "rgba.png";
  const std::uint8_t rgba[8] = {10, 20, 30, 0, 200, 100, 50, 128};
  png_image image;
  std::memset(&image, 0, sizeof image);
  image.version = PNG_IMAGE_VERSION;
  image.width = 2;
  image.height = 1;
  image.format = PNG_FORMAT_RGBA;
  CHECK(png_image_write_to_file(&image, path.c_str(), 0, rgba, 0, nullptr));
  const qd::Image im = qd::read_image(path);
  CHECK(im.rgb == std::vector<std::uint8_t>({10, 20, 30, 200, 100, 50}));
}

QD_TEST(image_io, png_samples_are_read_as_stored_without_colour_correction) {
  // As Pillow reads them: 16-bit samples keep their high byte, and a gAMA chunk changes nothing (libpng's
  // simplified API would turn these mid-greys into 186).
  const fs::path dir = qd::test::scratch_dir("png_stored");
  const std::vector<std::uint8_t> mid16 = {0x80, 0x80};  // 128 · 257, big-endian
  std::vector<std::uint8_t> rgb16, grey16;
  for (int i = 0; i < 2 * 3; ++i) rgb16.insert(rgb16.end(), mid16.begin(), mid16.end());
  for (int i = 0; i < 2; ++i) grey16.insert(grey16.end(), mid16.begin(), mid16.end());
  write_png_raw(dir / "rgb16.png", 1, 2, 16, PNG_COLOR_TYPE_RGB, rgb16, 1.0);
  write_png_raw(dir / "grey16.png", 1, 2, 16, PNG_COLOR_TYPE_GRAY, grey16, 0);
  write_png_raw(dir / "gamma.png", 1, 2, 8, PNG_COLOR_TYPE_RGB, std::vector<std::uint8_t>(6, 128), 1.0);
  for (const char* name : {"rgb16.png", "grey16.png", "gamma.png"}) {
    const qd::Image im = qd::read_image(dir / name);
    CHECK_EQ(im.width, 2);
    CHECK(im.rgb == std::vector<std::uint8_t>(6, 128));
  }
}

QD_TEST(image_io, cmyk_jpeg_converts_as_pillow_does) {
  // Pillow takes a CMYK JPEG's stored values as inverted (Adobe) and converts R = (255-K) - C·(255-K)/255.
  const fs::path path = qd::test::scratch_dir("jpeg_cmyk") / "cmyk.jpg";
  const int h = 16, w = 16;
  std::vector<std::uint8_t> stored;
  for (int i = 0; i < h * w; ++i) stored.insert(stored.end(), {255, 155, 55, 205});  // C 0, M 100, Y 200, K 50
  write_jpeg(path, stored.data(), h, w, 4, 100);
  const qd::Image im = qd::read_image(path);
  CHECK_EQ(im.rgb.size(), static_cast<size_t>(h * w * 3));
  // K = 50: 255-K = 205; R = 205 - 0 = 205, G = 205 - 100·205/255 ≈ 125, B = 205 - 200·205/255 ≈ 44.
  std::vector<std::uint8_t> expected;
  for (int i = 0; i < h * w; ++i) expected.insert(expected.end(), {205, 125, 44});
  CHECK(max_abs_diff(im.rgb, expected) <= 1);
}

QD_TEST(image_io, jpeg_decodes_close_to_its_source) {
  const fs::path path = qd::test::scratch_dir("jpeg") / "g.jpg";
  const auto rgb = gradient(32, 48);
  write_jpeg(path, rgb.data(), 32, 48, 3, 95);
  const qd::Image im = qd::read_image(path);
  CHECK_EQ(im.height, 32);
  CHECK_EQ(im.width, 48);
  // Quality 95 with 4:2:0 chroma subsampling keeps a smooth gradient within a few levels.
  CHECK(max_abs_diff(im.rgb, rgb) <= 8);
}

QD_TEST(image_io, grey_jpeg_becomes_rgb) {
  const fs::path path = qd::test::scratch_dir("jpeg_grey") / "grey.jpeg";
  const std::vector<std::uint8_t> grey(16 * 16, 90);
  write_jpeg(path, grey.data(), 16, 16, 1, 100);
  const qd::Image im = qd::read_image(path);
  CHECK_EQ(im.rgb.size(), static_cast<size_t>(16 * 16 * 3));
  CHECK(max_abs_diff(im.rgb, std::vector<std::uint8_t>(16 * 16 * 3, 90)) <= 1);
}

QD_TEST(image_io, truncated_png_is_an_error) {
  const fs::path path = qd::test::scratch_dir("png_cut") / "cut.png";
  const auto rgb = gradient(64, 64);
  qd::write_png(path, rgb.data(), 64, 64, 3);
  truncate_file(path);
  CHECK_THROWS(qd::read_image(path), ImageError, path.string() + ": damaged PNG data (libpng: ");
}

QD_TEST(image_io, truncated_jpeg_is_an_error) {
  const fs::path path = qd::test::scratch_dir("jpeg_cut") / "cut.jpg";
  const auto rgb = gradient(64, 64);
  write_jpeg(path, rgb.data(), 64, 64, 3, 90);
  truncate_file(path);
  CHECK_THROWS(qd::read_image(path), ImageError, path.string() + ": damaged JPEG data (libjpeg: ");
}

QD_TEST(image_io, other_files_are_errors) {
  const fs::path dir = qd::test::scratch_dir("other");
  std::ofstream(dir / "text.png") << "hello";
  std::ofstream(dir / "empty.jpg");
  CHECK_THROWS(qd::read_image(dir / "text.png"), ImageError, "text.png: not a PNG or JPEG file");
  CHECK_THROWS(qd::read_image(dir / "empty.jpg"), ImageError, "empty.jpg: empty file");
  CHECK_THROWS(qd::read_image(dir / "absent.png"), ImageError, "absent.png: cannot open for reading");
  const std::uint8_t pixel = 0;
  CHECK_THROWS(qd::write_png(dir / "no" / "such" / "x.png", &pixel, 1, 1, 1), ImageError, "cannot write PNG");
}

namespace {

// An APP1 payload holding one IFD0 entry: the orientation, in either byte order.
std::vector<std::uint8_t> exif_payload(bool big_endian, unsigned orientation, unsigned type = 3) {
  std::vector<std::uint8_t> p = {'E', 'x', 'i', 'f', 0, 0};
  auto u16 = [&](unsigned v) {
    if (big_endian) p.insert(p.end(), {static_cast<std::uint8_t>(v >> 8), static_cast<std::uint8_t>(v)});
    else p.insert(p.end(), {static_cast<std::uint8_t>(v), static_cast<std::uint8_t>(v >> 8)});
  };
  auto u32 = [&](unsigned v) {
    if (big_endian) { u16(v >> 16); u16(v & 0xFFFF); } else { u16(v & 0xFFFF); u16(v >> 16); }
  };
  p.insert(p.end(), big_endian ? std::initializer_list<std::uint8_t>{'M', 'M'}
                               : std::initializer_list<std::uint8_t>{'I', 'I'});
  u16(42);
  u32(8);  // IFD0 right after the header
  u16(2);  // two entries: ImageWidth, then Orientation
  u16(0x0100); u16(3); u32(1); u16(640); u16(0);
  u16(0x0112); u16(type); u32(1); u16(orientation); u16(0);
  u32(0);  // no next IFD
  return p;
}

}  // namespace

QD_TEST(image_io, exif_orientation_is_read_in_both_byte_orders) {
  for (bool big : {false, true}) {
    for (unsigned o = 1; o <= 8; ++o) {
      const auto p = exif_payload(big, o);
      CHECK_EQ(qd::exif_orientation(p.data(), p.size()), static_cast<int>(o));
    }
  }
}

QD_TEST(image_io, a_missing_or_malformed_exif_orientation_means_upright) {
  auto p = exif_payload(false, 6);
  CHECK_EQ(qd::exif_orientation(p.data(), p.size() - 10), 1);  // cut inside the orientation entry
  const auto wrong_type = exif_payload(true, 6, 4);           // LONG, not SHORT
  CHECK_EQ(qd::exif_orientation(wrong_type.data(), wrong_type.size()), 1);
  const auto out_of_range = exif_payload(false, 9);
  CHECK_EQ(qd::exif_orientation(out_of_range.data(), out_of_range.size()), 1);
  p[0] = 'X';  // not an EXIF block (an XMP packet also lives in APP1)
  CHECK_EQ(qd::exif_orientation(p.data(), p.size()), 1);
  CHECK_EQ(qd::exif_orientation(p.data(), 3), 1);
}

QD_TEST(image_io, orientations_turn_the_picture_as_pillow_does) {
  // 2 x 3 picture, one distinct value per pixel (all channels equal): a b c / d e f.
  qd::Image in;
  in.height = 2;
  in.width = 3;
  for (std::uint8_t v : {'a', 'b', 'c', 'd', 'e', 'f'}) in.rgb.insert(in.rgb.end(), {v, v, v});
  auto red = [](const qd::Image& im) {
    std::string s;
    for (std::size_t i = 0; i < im.rgb.size(); i += 3) s += static_cast<char>(im.rgb[i]);
    return s;
  };
  // Pillow's exif_transpose: 2 FLIP_LEFT_RIGHT, 3 ROTATE_180, 4 FLIP_TOP_BOTTOM, 5 TRANSPOSE, 6 ROTATE_270,
  // 7 TRANSVERSE, 8 ROTATE_90 (counter-clockwise), rows read top to bottom.
  const char* expected[9] = {"", "abcdef", "cbafed", "fedcba", "defabc", "adbecf", "daebfc", "fcebda", "cfbead"};
  for (int o = 1; o <= 8; ++o) {
    const qd::Image out = qd::apply_orientation(in, o);
    CHECK_EQ(out.height, o >= 5 ? 3 : 2);
    CHECK_EQ(red(out), std::string(expected[o]));
  }
}
