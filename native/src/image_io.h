// Reading PNG/JPEG images and writing PNG label maps (libpng, libjpeg).
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <vector>

namespace qd {

// A file that cannot be read or written as an image; what() is "PATH: reason".
class ImageError : public std::runtime_error {
 public:
  ImageError(const std::filesystem::path& path, const std::string& reason);
};

// 8-bit RGB, rows top to bottom, pixels interleaved: rgb[(y * width + x) * 3 + c].
struct Image {
  int height = 0;
  int width = 0;
  std::vector<std::uint8_t> rgb;
};

// Decodes a PNG or JPEG file, chosen by its leading bytes (not its name), to the pixels Pillow's
// Image.open(path).convert("RGB") gives: grey and palette images become RGB; an alpha channel is dropped; 16-bit
// PNGs keep the high byte of each sample; no gamma or colour-profile correction; CMYK/YCCK JPEGs are converted
// with Pillow's formula; a JPEG's EXIF orientation is applied (ImageOps.exif_transpose). Truncated or damaged
// files raise ImageError.
Image read_image(const std::filesystem::path& path);

// The EXIF orientation (1..8; 1, upright, when absent or unreadable) in a JPEG APP1 payload ("Exif\0\0" + TIFF).
int exif_orientation(const std::uint8_t* data, std::size_t size);

// The picture turned upright for an EXIF orientation (1..8), as Pillow's ImageOps.exif_transpose turns it.
Image apply_orientation(const Image& in, int orientation);

// Writes an 8-bit PNG (channels 1: grey, 3: RGB) of height × width pixels, through a temporary file renamed
// into place so that a reader never sees half a file.
void write_png(const std::filesystem::path& path, const std::uint8_t* pixels, int height, int width, int channels);

// Reads a PNG as 8-bit grey (channels 1) or RGB (channels 3); used to check written files.
std::vector<std::uint8_t> read_png(const std::filesystem::path& path, int channels, int* height, int* width);

}  // namespace qd
