// cuda_generate.hpp - the entry points pyramid-generate and pyramid-eval
// call for `--device cuda` (defined in cuda_generate.cu, linked only in CUDA
// builds, where PYRAMIDINFER_HAVE_CUDA_ENGINE is defined).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "generate/policies.hpp"

namespace pyramidinfer::llama_cuda {

struct GenerateRequest {
  std::string model_path;
  std::vector<std::int32_t> prompt;
  std::int32_t stop = -1;
  int max_tokens = 96;
  llama::PolicyOptions policy;
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

/// pyramid-eval's engine: the model is loaded once, and each call runs one
/// policy over a batch of sequences with a fresh cache.
class Evaluator {
 public:
  explicit Evaluator(const std::string& model_path);
  ~Evaluator();
  Evaluator(const Evaluator&) = delete;
  Evaluator& operator=(const Evaluator&) = delete;

  struct Continuation {
    std::vector<double> nll;         ///< per sequence: the summed NLL of its m scored tokens
    std::vector<double> kv_prefill;  ///< per sequence: slots held after prefill / (layers x n)
    std::vector<double> kv_end;      ///< slots held after the last step / (layers x (n + m - 1))
  };
  /// Teacher forcing: sequence b is n prompt tokens, then m tokens scored one
  /// decode step at a time (the last one is scored, not fed).
  Continuation continuation(const llama::PolicyOptions& policy, const std::vector<std::vector<std::int32_t>>& seqs,
                            int n, int m);
  /// Greedy decoding: `steps` tokens after each prompt.
  std::vector<std::vector<std::int32_t>> greedy(const llama::PolicyOptions& policy,
                                                const std::vector<std::vector<std::int32_t>>& prompts, int steps);
  std::string device() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace pyramidinfer::llama_cuda
