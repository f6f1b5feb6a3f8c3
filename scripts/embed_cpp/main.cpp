// embed_image: load a TorchScript module written by scripts/export.py and embed one image.
//
//   embed_image MODEL.pt IMAGE.ppm [cpu|cuda]
//
// IMAGE is a binary PPM (P6, RGB) or PGM (P5, grey), 8 bits per channel: the formats that
// need no image library (convert with `python -c "from PIL import Image; Image.open('x.jpg')
// .convert('RGB').save('x.ppm')"` or ImageMagick's `convert x.jpg x.ppm`). The module does
// the resizing, centre crop and normalisation itself; this program only hands it a uint8
// (1, C, H, W) tensor. Prints the uncertainty |sigma|^2 on one line and the L2-normalised
// embedding on the next (space-separated, full float precision).
#include <torch/script.h>

#include <cctype>
#include <cstdint>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

// Next header token of a PNM file, skipping whitespace and '#' comments.
std::string next_token(std::istream& in) {
  std::string token;
  char c;
  while (in.get(c)) {
    if (c == '#') {
      in.ignore(std::numeric_limits<std::streamsize>::max(), '\n');
    } else if (std::isspace(static_cast<unsigned char>(c))) {
      if (!token.empty()) return token;
    } else {
      token += c;
    }
  }
  return token;
}

// uint8 tensor (1, C, H, W) of a binary PPM (C = 3) or PGM (C = 1).
torch::Tensor read_pnm(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  const std::string magic = next_token(in);
  if (magic != "P6" && magic != "P5")
    throw std::runtime_error(path + ": expected a binary PPM (P6) or PGM (P5) image, got magic '" + magic + "'");
  const int64_t channels = magic == "P6" ? 3 : 1;
  const int64_t width = std::stoll(next_token(in));
  const int64_t height = std::stoll(next_token(in));
  const int64_t max_value = std::stoll(next_token(in));  // next_token consumed the single whitespace after it
  if (max_value != 255) throw std::runtime_error(path + ": expected 8-bit samples (maxval 255)");
  std::vector<uint8_t> pixels(static_cast<size_t>(width * height * channels));
  in.read(reinterpret_cast<char*>(pixels.data()), static_cast<std::streamsize>(pixels.size()));
  if (in.gcount() != static_cast<std::streamsize>(pixels.size()))
    throw std::runtime_error(path + ": truncated pixel data");
  // H x W x C (interleaved) -> 1 x C x H x W.
  return torch::from_blob(pixels.data(), {height, width, channels}, torch::kUInt8)
      .permute({2, 0, 1})
      .unsqueeze(0)
      .contiguous();  // copies out of `pixels`
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3 || argc > 4) {
    std::cerr << "usage: " << argv[0] << " MODEL.pt IMAGE.ppm [cpu|cuda]\n";
    return 2;
  }
  try {
    const torch::Device device(argc == 4 ? argv[3] : "cpu");
    torch::jit::script::Module module = torch::jit::load(argv[1], device);
    module.eval();
    torch::NoGradGuard no_grad;
    const torch::Tensor image = read_pnm(argv[2]).to(device);
    const auto outputs = module.forward({image}).toTuple();
    const torch::Tensor embedding = outputs->elements()[0].toTensor().to(torch::kCPU).contiguous();
    const torch::Tensor uncertainty = outputs->elements()[1].toTensor().to(torch::kCPU).contiguous();
    std::cout << std::setprecision(9) << "uncertainty " << uncertainty[0].item<float>() << "\nembedding";
    const float* values = embedding.data_ptr<float>();
    for (int64_t i = 0; i < embedding.size(1); ++i) std::cout << ' ' << values[i];
    std::cout << '\n';
  } catch (const std::exception& error) {
    std::cerr << "error: " << error.what() << '\n';
    return 1;
  }
  return 0;
}
