#include "image_io.h"

#include <png.h>
#include <stdio.h>
// jpeglib.h needs FILE and size_t declared first.
#include <jpeglib.h>
#include <jerror.h>  // JWRN_JPEG_EOF

#include <algorithm>
#include <csetjmp>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>

namespace qd {
namespace fs = std::filesystem;

ImageError::ImageError(const fs::path& path, const std::string& reason)
    : std::runtime_error(path.string() + ": " + reason) {}

namespace {

struct FileCloser {
  void operator()(FILE* f) const { std::fclose(f); }
};

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

// Photos are read with libpng's low-level API, as Pillow reads them: stored values, no colour management. (The
// simplified API converts 16-bit data as linear light to sRGB and applies a file's gAMA chunk: 128 read as 186.)
struct PngErrors {
  char message[256];
};

void png_fail(png_structp png, png_const_charp message) {
  auto* errors = static_cast<PngErrors*>(png_get_error_ptr(png));
  std::snprintf(errors->message, sizeof errors->message, "%s", message);
  png_longjmp(png, 1);
}

void png_ignore_warning(png_structp, png_const_charp) {}

// A picture's decoded bytes are capped well below what a size_t holds, so the row arithmetic cannot overflow.
constexpr std::uint64_t kMaxPngBytes = std::uint64_t{1} << 32;

// No C++ object with a destructor may be created between setjmp and a longjmp back to it: the buffers live in
// the caller. Returns false with errors->message set on damaged data.
bool decode_png_photo(FILE* file, png_structp png, png_infop info, PngErrors* errors,
                      std::vector<std::uint8_t>* pixels, std::vector<png_bytep>* rows, int* height, int* width,
                      int* channels) {
  if (setjmp(png_jmpbuf(png))) return false;
  png_init_io(png, file);
  png_read_info(png, info);
  png_set_strip_16(png);  // the high byte, as Pillow reads 16-bit RGB, RGBA and grey+alpha
  png_set_packing(png);
  png_set_palette_to_rgb(png);
  png_set_expand_gray_1_2_4_to_8(png);
  png_set_gray_to_rgb(png);
  png_set_interlace_handling(png);
  png_read_update_info(png, info);
  const png_uint_32 h = png_get_image_height(png, info);
  const png_uint_32 w = png_get_image_width(png, info);
  const std::size_t stride = png_get_rowbytes(png, info);
  if (static_cast<std::uint64_t>(stride) * h > kMaxPngBytes) {
    std::snprintf(errors->message, sizeof errors->message, "image too large (%u x %u)", w, h);
    return false;
  }
  pixels->resize(stride * h);
  rows->resize(h);
  for (png_uint_32 y = 0; y < h; ++y) (*rows)[y] = pixels->data() + y * stride;
  png_read_image(png, rows->data());
  png_read_end(png, nullptr);
  *height = static_cast<int>(h);
  *width = static_cast<int>(w);
  *channels = png_get_channels(png, info);  // 3, or 4 where the file has alpha or a transparency chunk
  return true;
}

Image read_png_rgb(const fs::path& path) {
  std::unique_ptr<FILE, FileCloser> file(std::fopen(path.c_str(), "rb"));
  if (!file) throw ImageError(path, "cannot open for reading");
  PngErrors errors;
  errors.message[0] = '\0';
  png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &errors, png_fail, png_ignore_warning);
  png_infop info = png ? png_create_info_struct(png) : nullptr;
  if (!info) {
    png_destroy_read_struct(&png, nullptr, nullptr);
    throw ImageError(path, "cannot set up libpng");
  }
  std::vector<std::uint8_t> pixels;
  std::vector<png_bytep> rows;
  int channels = 0;
  Image out;
  const bool ok = decode_png_photo(file.get(), png, info, &errors, &pixels, &rows, &out.height, &out.width,
                                   &channels);
  png_destroy_read_struct(&png, &info, nullptr);
  if (!ok) throw ImageError(path, std::string("damaged PNG data (libpng: ") + errors.message + ")");
  out.rgb.resize(static_cast<std::size_t>(out.height) * out.width * 3);
  for (int y = 0; y < out.height; ++y) {
    const png_bytep row = rows[static_cast<std::size_t>(y)];
    std::uint8_t* dst = &out.rgb[static_cast<std::size_t>(y) * out.width * 3];
    // Alpha is dropped as Pillow's convert("RGB") drops it, leaving the stored colours.
    for (int x = 0; x < out.width; ++x) std::memcpy(dst + x * 3, row + static_cast<std::size_t>(x) * channels, 3);
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

}  // namespace

int exif_orientation(const std::uint8_t* data, std::size_t size) {
  // APP1 payload: "Exif\0\0", then a TIFF header (byte order, 42, offset of IFD0) and IFD0's 12-byte entries.
  static const std::uint8_t kExif[6] = {'E', 'x', 'i', 'f', 0, 0};
  if (size < 6 + 8 || std::memcmp(data, kExif, 6) != 0) return 1;
  const std::uint8_t* tiff = data + 6;
  const std::size_t n = size - 6;
  const bool little = tiff[0] == 'I' && tiff[1] == 'I';
  if (!little && !(tiff[0] == 'M' && tiff[1] == 'M')) return 1;
  auto u16 = [&](std::size_t at) -> unsigned {
    return little ? tiff[at] | (tiff[at + 1] << 8) : (tiff[at] << 8) | tiff[at + 1];
  };
  auto u32 = [&](std::size_t at) -> std::uint64_t {
    return little ? std::uint64_t{u16(at)} | (std::uint64_t{u16(at + 2)} << 16)
                  : (std::uint64_t{u16(at)} << 16) | std::uint64_t{u16(at + 2)};
  };
  if (u16(2) != 42) return 1;
  const std::uint64_t ifd = u32(4);
  if (ifd + 2 > n) return 1;
  const unsigned entries = u16(static_cast<std::size_t>(ifd));
  for (unsigned i = 0; i < entries; ++i) {
    const std::uint64_t entry = ifd + 2 + 12 * std::uint64_t{i};
    if (entry + 12 > n) return 1;
    const auto at = static_cast<std::size_t>(entry);
    if (u16(at) == 0x0112) {  // Orientation: SHORT, one value, held in the entry itself
      const unsigned value = u16(at + 2) == 3 ? u16(at + 8) : 0;
      return value >= 1 && value <= 8 ? static_cast<int>(value) : 1;
    }
  }
  return 1;
}

Image apply_orientation(const Image& in, int orientation) {
  if (orientation <= 1 || orientation > 8) return in;
  const bool swap = orientation >= 5;  // 5..8 turn the picture a quarter: height and width trade places
  Image out;
  out.height = swap ? in.width : in.height;
  out.width = swap ? in.height : in.width;
  out.rgb.resize(in.rgb.size());
  const int h = in.height, w = in.width;
  for (int y = 0; y < out.height; ++y) {
    for (int x = 0; x < out.width; ++x) {
      // The source pixel (sy, sx) of output pixel (y, x), as Pillow's ImageOps.exif_transpose turns it.
      int sy = y, sx = x;
      switch (orientation) {
        case 2: sx = w - 1 - x; break;                      // mirrored left-right
        case 3: sy = h - 1 - y; sx = w - 1 - x; break;      // turned 180°
        case 4: sy = h - 1 - y; break;                      // mirrored top-bottom
        case 5: sy = x; sx = y; break;                      // transposed
        case 6: sy = h - 1 - x; sx = y; break;              // turned 90° clockwise to display
        case 7: sy = h - 1 - x; sx = w - 1 - y; break;      // transversed
        case 8: sy = x; sx = w - 1 - y; break;              // turned 90° counter-clockwise to display
        default: break;
      }
      const std::uint8_t* src = &in.rgb[(static_cast<std::size_t>(sy) * w + sx) * 3];
      std::copy(src, src + 3, &out.rgb[(static_cast<std::size_t>(y) * out.width + x) * 3]);
    }
  }
  return out;
}

namespace {

// No C++ object with a destructor may be created between setjmp and a longjmp back to it, so everything
// that owns memory lives in the caller.
bool decode_jpeg(FILE* file, jpeg_decompress_struct* info, JpegErrors* errors, Image* out,
                 std::vector<std::uint8_t>* cmyk, int* orientation) {
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
  jpeg_save_markers(info, JPEG_APP0 + 1, 0xFFFF);  // APP1: the EXIF block with the orientation tag
  jpeg_read_header(info, TRUE);
  *orientation = 1;
  for (jpeg_saved_marker_ptr m = info->marker_list; m != nullptr; m = m->next) {
    if (m->marker == JPEG_APP0 + 1) {
      const int found = exif_orientation(m->data, m->data_length);
      if (found != 1) {
        *orientation = found;
        break;
      }
    }
  }
  // Grey and YCbCr files are converted to RGB by the library; CMYK and YCCK ones (which it cannot convert) are
  // read as CMYK and converted below.
  const bool four_channels = info->jpeg_color_space == JCS_CMYK || info->jpeg_color_space == JCS_YCCK;
  info->out_color_space = four_channels ? JCS_CMYK : JCS_RGB;
  jpeg_start_decompress(info);
  out->height = static_cast<int>(info->output_height);
  out->width = static_cast<int>(info->output_width);
  const size_t n = static_cast<size_t>(out->height) * out->width;
  const int channels = four_channels ? 4 : 3;
  std::vector<std::uint8_t>& target = four_channels ? *cmyk : out->rgb;
  target.resize(n * channels);
  while (info->output_scanline < info->output_height) {
    JSAMPROW row = &target[static_cast<size_t>(info->output_scanline) * out->width * channels];
    jpeg_read_scanlines(info, &row, 1);
  }
  jpeg_finish_decompress(info);
  jpeg_destroy_decompress(info);
  return !errors->truncated;
}

// CMYK as Pillow converts it: stored values taken as inverted (Adobe's polarity, which Pillow always assumes),
// then R = (255 - K) - (C · (255 - K)) / 255 per colour, with its rounding of the division.
void cmyk_to_rgb(const std::vector<std::uint8_t>& cmyk, std::vector<std::uint8_t>* rgb) {
  const size_t n = cmyk.size() / 4;
  rgb->resize(n * 3);
  for (size_t i = 0; i < n; ++i) {
    const int not_k = cmyk[i * 4 + 3];  // 255 - K, with K = 255 - stored
    for (int c = 0; c < 3; ++c) {
      const int ink = 255 - cmyk[i * 4 + c];
      const int t = ink * not_k + 128;
      (*rgb)[i * 3 + c] = static_cast<std::uint8_t>(std::clamp(not_k - (((t >> 8) + t) >> 8), 0, 255));
    }
  }
}

Image read_jpeg(const fs::path& path) {
  std::unique_ptr<FILE, FileCloser> file(std::fopen(path.c_str(), "rb"));
  if (!file) throw ImageError(path, "cannot open for reading");
  jpeg_decompress_struct info;
  JpegErrors errors;
  Image out;
  std::vector<std::uint8_t> cmyk;
  int orientation = 1;
  if (!decode_jpeg(file.get(), &info, &errors, &out, &cmyk, &orientation)) {
    throw ImageError(path, std::string("damaged JPEG data (libjpeg: ") + errors.message + ")");
  }
  if (!cmyk.empty()) cmyk_to_rgb(cmyk, &out.rgb);
  // Stored sideways by a camera: turned upright as the EXIF orientation says (as OpenCV's and the Python side's
  // readers do), so the picture is segmented the way it is seen.
  return apply_orientation(out, orientation);
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
