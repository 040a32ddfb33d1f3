// cuda_generate.hpp - the entry point pyramid-generate calls for
// `--device cuda` (defined in cuda_generate.cu, linked only in CUDA builds,
// where PYRAMIDINFER_HAVE_CUDA_ENGINE is defined).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace pyramidinfer::llama_cuda {

struct GenerateRequest {
  std::string model_path;
  std::vector<std::int32_t> prompt;
  std::int32_t stop = -1;
  int max_tokens = 96;
  std::string policy = "pyramid";  ///< a name of examples/generate/policies.hpp
  double ratio = 0.9;              ///< the policy's ratio (PolicyOptions::ratio)
  double recent_ratio = 0.2;
};

struct GenerateResult {
  double prefill_s = 0, decode_s = 0;
  int generated = 0;
  std::vector<std::size_t> layer_bytes;
  std::vector<int> layer_len;  ///< slots held now, per layer
  std::vector<int> layer_cap;
  std::size_t total_bytes = 0, full_bytes = 0;
  double ratio_to_full = 1;
  std::string device;
};

GenerateResult generate(const GenerateRequest& r, const std::function<void(std::int32_t)>& on_token);

}  // namespace pyramidinfer::llama_cuda
