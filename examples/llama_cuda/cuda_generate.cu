// The CUDA paths of pyramid-generate (greedy decoding) and pyramid-eval
// (teacher-forced NLL and greedy lookups, every passage in one batch).
#include <chrono>
#include <cmath>
#include <stdexcept>
#include <string>

#include "llama_cuda/cuda_generate.hpp"
#include "llama_cuda/policy_engine.cuh"

namespace pyramidinfer::llama_cuda {

namespace {
template <class Engine>
GenerateResult drive(Engine& e, const GenerateRequest& r, const std::function<void(std::int32_t)>& on_token) {
  using Clock = std::chrono::steady_clock;
  GenerateResult out;
  const auto t0 = Clock::now();
  std::vector<float> logits = e.prefill({r.prompt}, r.max_tokens);
  out.prefill_s = std::chrono::duration<double>(Clock::now() - t0).count();
  const auto t1 = Clock::now();
  for (; out.generated < r.max_tokens; ++out.generated) {
    std::int32_t next = 0;
    for (std::size_t i = 1; i < logits.size(); ++i)
      if (logits[i] > logits[std::size_t(next)]) next = std::int32_t(i);
    if (next == r.stop) break;
    on_token(next);
    if (out.generated + 1 < r.max_tokens) logits = e.decode({next});
  }
  out.decode_s = std::chrono::duration<double>(Clock::now() - t1).count();
  e.check();
  const auto& plan = e.plan();
  for (int l = 0; l < plan.shape.num_layers; ++l) {
    out.layer_bytes.push_back(std::size_t(plan.layer_pages[std::size_t(l)]) * plan.page_bytes);
    out.layer_cap.push_back(plan.layer_cap[std::size_t(l)]);
    out.layer_len.push_back(e.length_sync(l, 0));
  }
  out.total_bytes = plan.total_bytes, out.full_bytes = plan.full_bytes, out.ratio_to_full = plan.ratio_to_full;
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  out.device = prop.name;
  return out;
}
}  // namespace

GenerateResult generate(const GenerateRequest& r, const std::function<void(std::int32_t)>& on_token) {
  const CudaModel model = CudaModel::from_gguf(llama::GgufFile::open(r.model_path));
  GenerateResult out;
  with_cuda_engine(model, EngineOptions{}, r.policy, [&](auto& e) { out = drive(e, r, on_token); });
  return out;
}

// ------------------------------------------------------------------ eval

namespace {
constexpr int kNllThreads = 256;

/// acc[b] += -log softmax(logits[b])[target[b]], one block per row (double
/// sums: 49K-entry rows, compared across policies to a few 1e-4).
__global__ void add_nll_kernel(const float* logits, int vocab, const std::int32_t* target, double* acc) {
  const float* row = logits + std::size_t(blockIdx.x) * std::size_t(vocab);
  __shared__ double part[kNllThreads];
  float m = -INFINITY;
  for (int i = threadIdx.x; i < vocab; i += kNllThreads) m = fmaxf(m, row[i]);
  part[threadIdx.x] = m;
  __syncthreads();
  for (int s = kNllThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) part[threadIdx.x] = fmax(part[threadIdx.x], part[threadIdx.x + s]);
    __syncthreads();
  }
  const double mx = part[0];
  __syncthreads();
  double sum = 0;
  for (int i = threadIdx.x; i < vocab; i += kNllThreads) sum += exp(double(row[i]) - mx);
  part[threadIdx.x] = sum;
  __syncthreads();
  for (int s = kNllThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) part[threadIdx.x] += part[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) acc[blockIdx.x] += log(part[0]) - (double(row[target[blockIdx.x]]) - mx);
}

/// e.check(), naming the phase whose paged ops refused work.
template <class Engine>
void check_after(Engine& e, const char* phase) {
  try {
    e.check();
  } catch (const std::exception& x) {
    throw std::runtime_error(std::string(x.what()) + " (" + phase + ")");
  }
}

/// Slots every sequence holds now, summed over layers (synchronises).
template <class Engine>
std::vector<double> held_slots(const Engine& e, int batch) {
  std::vector<double> out(std::size_t(batch), 0.0);
  for (int l = 0; l < e.plan().shape.num_layers; ++l)
    for (int b = 0; b < batch; ++b) out[std::size_t(b)] += e.length_sync(l, b);
  return out;
}
}  // namespace

struct Evaluator::Impl {
  CudaModel model;
};

Evaluator::Evaluator(const std::string& model_path)
    : impl_(new Impl{CudaModel::from_gguf(llama::GgufFile::open(model_path))}) {}
Evaluator::~Evaluator() = default;

std::string Evaluator::device() const {
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  return prop.name;
}

Evaluator::Continuation Evaluator::continuation(const llama::PolicyOptions& policy,
                                                const std::vector<std::vector<std::int32_t>>& seqs, int n, int m) {
  const int B = int(seqs.size()), vocab = impl_->model.shape().vocab;
  if (B == 0 || n < 1 || m < 1) throw std::invalid_argument("Evaluator::continuation: empty batch, n or m");
  std::vector<std::vector<std::int32_t>> prompts;
  std::vector<std::int32_t> targets(std::size_t(m) * std::size_t(B));  // step-major
  for (int b = 0; b < B; ++b) {
    if (int(seqs[std::size_t(b)].size()) != n + m)
      throw std::invalid_argument("Evaluator::continuation: sequence " + std::to_string(b) + " has " +
                                  std::to_string(seqs[std::size_t(b)].size()) + " tokens, not n + m = " +
                                  std::to_string(n + m));
    prompts.emplace_back(seqs[std::size_t(b)].begin(), seqs[std::size_t(b)].begin() + n);
    for (int t = 0; t < m; ++t) {
      const std::int32_t id = seqs[std::size_t(b)][std::size_t(n + t)];
      if (id < 0 || id >= vocab) throw std::invalid_argument("Evaluator::continuation: token id " + std::to_string(id));
      targets[std::size_t(t) * std::size_t(B) + std::size_t(b)] = id;
    }
  }
  Continuation out;
  with_cuda_engine(impl_->model, EngineOptions{}, policy, [&](auto& e) {
    DBuf<std::int32_t> dtargets(targets.size());
    DBuf<double> acc(static_cast<std::size_t>(B));
    dtargets.upload(targets.data(), targets.size(), e.stream());
    LC_CUDA(cudaMemsetAsync(acc.get(), 0, std::size_t(B) * sizeof(double), e.stream()));
    e.prefill(prompts, m, /*want_logits=*/false);
    check_after(e, "after the prefill");
    out.kv_prefill = held_slots(e, B);
    for (double& x : out.kv_prefill) x /= double(e.plan().shape.num_layers) * n;
    for (int t = 0; t < m; ++t) {
      if (t > 0) {
        const std::vector<std::int32_t> fed(targets.begin() + std::ptrdiff_t(t - 1) * B,
                                            targets.begin() + std::ptrdiff_t(t) * B);
        e.decode(fed, /*want_logits=*/false);
      }
      add_nll_kernel<<<B, kNllThreads, 0, e.stream()>>>(e.device_logits(), vocab,
                                                        dtargets.get() + std::size_t(t) * std::size_t(B), acc.get());
      LC_CUDA(cudaGetLastError());
    }
    check_after(e, "after the decode steps");
    out.kv_end = held_slots(e, B);
    for (double& x : out.kv_end) x /= double(e.plan().shape.num_layers) * double(n + m - 1);
    out.nll.resize(std::size_t(B));
    LC_CUDA(cudaMemcpy(out.nll.data(), acc.get(), std::size_t(B) * sizeof(double), cudaMemcpyDeviceToHost));
  });
  return out;
}

std::vector<std::vector<std::int32_t>> Evaluator::greedy(const llama::PolicyOptions& policy,
                                                         const std::vector<std::vector<std::int32_t>>& prompts,
                                                         int steps) {
  const int B = int(prompts.size());
  const std::size_t vocab = std::size_t(impl_->model.shape().vocab);
  std::vector<std::vector<std::int32_t>> out(static_cast<std::size_t>(B));
  if (B == 0 || steps < 1) return out;
  with_cuda_engine(impl_->model, EngineOptions{}, policy, [&](auto& e) {
    std::vector<float> logits = e.prefill(prompts, steps);
    for (int t = 0; t < steps; ++t) {
      std::vector<std::int32_t> next(static_cast<std::size_t>(B));
      for (int b = 0; b < B; ++b) {
        const float* row = logits.data() + std::size_t(b) * vocab;
        std::size_t best = 0;
        for (std::size_t i = 1; i < vocab; ++i)
          if (row[i] > row[best]) best = i;
        next[std::size_t(b)] = std::int32_t(best);
        out[std::size_t(b)].push_back(std::int32_t(best));
      }
      if (t + 1 < steps) logits = e.decode(next);
    }
    check_after(e, "after the lookups' decode steps");
  });
  return out;
}

}  // namespace pyramidinfer::llama_cuda
