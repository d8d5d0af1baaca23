#include "image_io.h"

#include <png.h>
#include <stdio.h>
// jpeglib.h needs FILE and size_t declared first.
#include <jpeglib.h>
#include <jerror.h>  // JWRN_JPEG_EOF

#include <csetjmp>
#include <cstring>
#include <fstream>
#include <memory>

namespace qd {
namespace fs = std::filesystem;

ImageError::ImageError(const fs::path& path, const std::string& reason)
    : std::runtime_error(path.string() + ": " + reason) {}

namespace {

enum class Format { kPng, kJpeg, kUnknown };

Format sniff(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw ImageError(path, "cannot open for reading");
  unsigned char head[8] = {};
  in.read(reinterpret_cast<char*>(head), sizeof head);
  const std::streamsize n = in.gcount();
  if (n == 0) throw ImageError(path, "empty file");
  static const unsigned char kPngSignature[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
  if (n == 8 && std::memcmp(head, kPngSignature, 8) == 0) return Format::kPng;
  if (n >= 3 && head[0] == 0xff && head[1] == 0xd8 && head[2] == 0xff) return Format::kJpeg;
  return Format::kUnknown;
}

std::vector<std::uint8_t> decode_png(const fs::path& path, png_uint_32 format, int* height, int* width) {
  png_image image;
  std::memset(&image, 0, sizeof image);
  image.version = PNG_IMAGE_VERSION;
  if (!png_image_begin_read_from_file(&image, path.c_str())) {
    throw ImageError(path, std::string("not a readable PNG (libpng: ") + image.message + ")");
  }
  image.format = format;
  std::vector<std::uint8_t> pixels(PNG_IMAGE_SIZE(image));
  // With a null background an alpha channel in the file is kept in RGBA output (8-bit output is not
  // premultiplied), so dropping it afterwards gives the stored colours, as Pillow's convert("RGB") does.
  if (!png_image_finish_read(&image, nullptr, pixels.data(), 0, nullptr)) {
    const std::string message = image.message;
    png_image_free(&image);
    throw ImageError(path, "damaged PNG data (libpng: " + message + ")");
  }
  *height = static_cast<int>(image.height);
  *width = static_cast<int>(image.width);
  return pixels;
}

Image read_png_rgb(const fs::path& path) {
  Image out;
  std::vector<std::uint8_t> rgba = decode_png(path, PNG_FORMAT_RGBA, &out.height, &out.width);
  const size_t n = static_cast<size_t>(out.height) * out.width;
  out.rgb.resize(n * 3);
  for (size_t i = 0; i < n; ++i) {
    std::memcpy(&out.rgb[i * 3], &rgba[i * 4], 3);
  }
  return out;
}

// libjpeg reports fatal errors through error_exit, which must not return: jump back to decode_jpeg.
struct JpegErrors {
  jpeg_error_mgr manager;
  std::jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
  bool truncated;
};

void jpeg_fail(j_common_ptr info) {
  auto* errors = reinterpret_cast<JpegErrors*>(info->err);
  info->err->format_message(info, errors->message);
  std::longjmp(errors->jump, 1);
}

void jpeg_note(j_common_ptr info, int level) {
  auto* errors = reinterpret_cast<JpegErrors*>(info->err);
  // A file cut short is only a warning for libjpeg (it pads with grey); treat it as the damage it is.
  // Other warnings (e.g. extraneous bytes before a marker) leave the picture intact and are ignored.
  if (level < 0 && info->err->msg_code == JWRN_JPEG_EOF && !errors->truncated) {
    errors->truncated = true;
    info->err->format_message(info, errors->message);
  }
}

struct FileCloser {
  void operator()(FILE* f) const { std::fclose(f); }
};

// No C++ object with a destructor may be created between setjmp and a longjmp back to it, so everything
// that owns memory lives in the caller.
bool decode_jpeg(FILE* file, jpeg_decompress_struct* info, JpegErrors* errors, Image* out) {
  info->err = jpeg_std_error(&errors->manager);
  errors->manager.error_exit = jpeg_fail;
  errors->manager.emit_message = jpeg_note;
  errors->truncated = false;
  errors->message[0] = '\0';
  if (setjmp(errors->jump)) {
    jpeg_destroy_decompress(info);
    return false;
  }
  jpeg_create_decompress(info);
  jpeg_stdio_src(info, file);
  jpeg_read_header(info, TRUE);
  info->out_color_space = JCS_RGB;  // grey and YCbCr files are converted by the library
  jpeg_start_decompress(info);
  out->height = static_cast<int>(info->output_height);
  out->width = static_cast<int>(info->output_width);
  out->rgb.resize(static_cast<size_t>(out->height) * out->width * 3);
  while (info->output_scanline < info->output_height) {
    JSAMPROW row = &out->rgb[static_cast<size_t>(info->output_scanline) * out->width * 3];
    jpeg_read_scanlines(info, &row, 1);
  }
  jpeg_finish_decompress(info);
  jpeg_destroy_decompress(info);
  return !errors->truncated;
}

Image read_jpeg(const fs::path& path) {
  std::unique_ptr<FILE, FileCloser> file(std::fopen(path.c_str(), "rb"));
  if (!file) throw ImageError(path, "cannot open for reading");
  jpeg_decompress_struct info;
  JpegErrors errors;
  Image out;
  if (!decode_jpeg(file.get(), &info, &errors, &out)) {
    throw ImageError(path, std::string("damaged JPEG data (libjpeg: ") + errors.message + ")");
  }
  return out;
}

}  // namespace

Image read_image(const fs::path& path) {
  switch (sniff(path)) {
    case Format::kPng:
      return read_png_rgb(path);
    case Format::kJpeg:
      return read_jpeg(path);
    case Format::kUnknown:
      break;
  }
  throw ImageError(path, "not a PNG or JPEG file");
}

std::vector<std::uint8_t> read_png(const fs::path& path, int channels, int* height, int* width) {
  if (channels != 1 && channels != 3) throw std::invalid_argument("read_png: channels must be 1 or 3");
  if (sniff(path) != Format::kPng) throw ImageError(path, "not a PNG file");
  return decode_png(path, channels == 1 ? PNG_FORMAT_GRAY : PNG_FORMAT_RGB, height, width);
}

void write_png(const fs::path& path, const std::uint8_t* pixels, int height, int width, int channels) {
  if (channels != 1 && channels != 3) throw std::invalid_argument("write_png: channels must be 1 or 3");
  if (height <= 0 || width <= 0) throw ImageError(path, "cannot write an empty image");
  png_image image;
  std::memset(&image, 0, sizeof image);
  image.version = PNG_IMAGE_VERSION;
  image.width = static_cast<png_uint_32>(width);
  image.height = static_cast<png_uint_32>(height);
  image.format = channels == 1 ? PNG_FORMAT_GRAY : PNG_FORMAT_RGB;
  fs::path tmp = path;
  tmp += ".tmp";
  if (!png_image_write_to_file(&image, tmp.c_str(), 0, pixels, 0, nullptr)) {
    std::error_code ignored;
    fs::remove(tmp, ignored);
    throw ImageError(path, std::string("cannot write PNG (libpng: ") + image.message + ")");
  }
  std::error_code error;
  fs::rename(tmp, path, error);
  if (error) {
    fs::remove(tmp, error);
    throw ImageError(path, "cannot move the written file into place");
  }
}

}  // namespace qd
