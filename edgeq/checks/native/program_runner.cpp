// edgeq's program runner for ExecuTorch's C++ runtime (built by `edgeq setup arm64` for aarch64).
// Runs a program's forward on COUNT input sets and writes every output, so that edgeq can compare
// the Arm kernels' results with the x86 runtime's on the same inputs.
//
//   program_runner model.pte COUNT OUT_PREFIX IN_0 [IN_1 ...]
//
// IN_i holds COUNT consecutive values of input i, each in the program's shape and dtype (float32,
// int64 or int32, little-endian). Output j of every run is appended to OUT_PREFIX.j as raw bytes.
#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

using executorch::aten::ScalarType;
using executorch::extension::Module;
using executorch::extension::TensorPtr;
using executorch::extension::from_blob;
using executorch::runtime::EValue;

namespace {

int fail(const std::string& message) {
  std::cerr << "program_runner: " << message << std::endl;
  return 1;
}

size_t element_size(ScalarType type) {
  switch (type) {
    case ScalarType::Float: return 4;
    case ScalarType::Long: return 8;
    case ScalarType::Int: return 4;
    default: return 0;
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 5) return fail("usage: program_runner model.pte COUNT OUT_PREFIX IN_0 [IN_1 ...]");
  const long count = std::stol(argv[2]);
  const std::string out_prefix = argv[3];
  Module module(argv[1]);
  auto meta = module.method_meta("forward");
  if (!meta.ok()) return fail(std::string("cannot load forward from ") + argv[1]);
  const size_t inputs = meta->num_inputs();
  if (static_cast<size_t>(argc - 4) != inputs) {
    return fail("the program takes " + std::to_string(inputs) + " inputs, " + std::to_string(argc - 4) + " given");
  }
  std::vector<std::vector<char>> data(inputs);
  std::vector<std::vector<executorch::aten::SizesType>> sizes(inputs);
  std::vector<ScalarType> types(inputs);
  std::vector<size_t> bytes(inputs);
  for (size_t i = 0; i < inputs; ++i) {
    auto tensor_meta = meta->input_tensor_meta(i);
    if (!tensor_meta.ok()) return fail("input " + std::to_string(i) + " is not a tensor");
    types[i] = tensor_meta->scalar_type();
    const size_t size = element_size(types[i]);
    if (size == 0) return fail("input " + std::to_string(i) + " has a dtype this runner does not feed");
    size_t numel = 1;
    for (auto d : tensor_meta->sizes()) {
      sizes[i].push_back(d);
      numel *= d;
    }
    bytes[i] = numel * size;
    std::ifstream in(argv[4 + i], std::ios::binary);
    data[i].resize(bytes[i] * count);
    if (!in.read(data[i].data(), data[i].size()) || in.peek() != EOF) {
      return fail(std::string(argv[4 + i]) + " does not hold " + std::to_string(count) + " inputs of " +
                  std::to_string(bytes[i]) + " bytes");
    }
  }
  std::vector<std::ofstream> outs;
  for (long n = 0; n < count; ++n) {
    std::vector<TensorPtr> tensors;
    std::vector<EValue> values;
    for (size_t i = 0; i < inputs; ++i) {
      tensors.push_back(from_blob(data[i].data() + n * bytes[i], sizes[i], types[i]));
      values.emplace_back(tensors.back());
    }
    auto result = module.forward(values);
    if (!result.ok()) return fail("forward failed (error " + std::to_string(static_cast<int>(result.error())) + ")");
    if (outs.empty()) {
      for (size_t j = 0; j < result->size(); ++j) outs.emplace_back(out_prefix + "." + std::to_string(j), std::ios::binary);
    }
    for (size_t j = 0; j < result->size(); ++j) {
      const auto& tensor = result->at(j).toTensor();
      outs[j].write(static_cast<const char*>(tensor.const_data_ptr()), tensor.nbytes());
    }
  }
  return 0;
}
