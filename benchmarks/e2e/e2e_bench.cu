// e2e-bench: end-to-end generation with the CUDA engine of examples/llama_cuda
// on models of LLaMA shapes with RANDOM fp16 weights (throughput and memory
// only; the tokens mean nothing). One JSON line per run on stdout.
//
//   e2e-bench SHAPE POLICY BATCH PROMPT GEN [--comp-share] [--device-trigger]
//     SHAPE  llama2-7b | llama2-13b | llama3-8b
//     POLICY full | pyramid (paper defaults) | pyramid45 (the settings the
//            planner found to keep <= 45% of the KV at 512 + 256: 10% window,
//            min_context 16, cosine final ratio 0.3, decode keeps
//            floor(16 * 0.5 * cosine_0.1(l)) of every 16; the same numbers as
//            examples/generate/policies.hpp's Pyramid45)
//     BATCH  a number, or "fit": the largest batch whose weights + work
//            buffers + KV pages + compressor state fit in 80% of the card
//     --comp-share      a third run with CUDA events around the compression calls
//     --device-trigger  the CUDA compressor's device trigger mode (the chain
//                       launches every step) instead of the host-tracked default
//     --no-graph        decode steps launched eagerly (no CUDA graph replay)
//     --page-size N     tokens per KV page (default 16; a power of two >= every
//                       sequence's length is the contiguous special case: one
//                       page per layer and sequence)
//     --profile P       P = prefill or decode: one warm-up run only, with
//                       cudaProfilerStart/Stop around its prefill, or around
//                       its decode step 128 (for `ncu --profile-from-start off`);
//                       prints no JSON
//
//   e2e-bench attn-floor [I]
//     The paged decode attention alone against its HBM floor (attn_floor.cuh);
//     I: only the I-th shape of its list (for a profiler).
//
//   e2e-bench selfcheck
//     On random data: the engine's prefill attention (tensor-core, over the
//     chunk's packed K/V) and decode attention (split, over a paged cache:
//     page sizes 1/16/64, NHD/HND/interleaved pools, shuffled pages, bad
//     device state) against a plain fp32 reference (ragged sequences, sparse
//     original positions, GQA, head dims 64 and 128), and a small pyramid
//     model decoded with and without CUDA graphs (logits must agree). Prints
//     one line per check and exits 1 if any fails.
#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <chrono>
#include <ctime>
#include <random>
#include <cstdio>
#include <cstring>
#include <cuda_profiler_api.h>
#include <string>

#define PYRAMIDINFER_LLAMA_CUDA_NO_GGUF
#include "llama_cuda/llama_cuda.cuh"
#include "attn_floor.cuh"

using namespace pyramidinfer;
using namespace pyramidinfer::llama_cuda;
using Clock = std::chrono::steady_clock;

static LlamaShape shape_of(const std::string& n) { return named_shape(n); }

static std::size_t used_bytes() {
  std::size_t f = 0, t = 0;
  cudaMemGetInfo(&f, &t);
  return t - f;
}

template <class Engine>
void run(const char* shape, const char* policy, const CudaModel& model, Engine& e, int batch, int prompt, int gen,
         bool comp_share, double final_ratio, const std::string& profile) {
  const LlamaShape& s = model.shape();
  std::vector<std::vector<std::int32_t>> prompts(static_cast<std::size_t>(batch), std::vector<std::int32_t>(static_cast<std::size_t>(prompt)));
  for (int b = 0; b < batch; ++b)
    for (int i = 0; i < prompt; ++i) prompts[std::size_t(b)][std::size_t(i)] = std::int32_t((b * 7919ll + i * 104729ll) % s.vocab);
  DBuf<std::int32_t> ids(static_cast<std::size_t>(batch));
  auto once = [&](double& prefill_s, double& decode_s) {
    LC_CUDA(cudaDeviceSynchronize());
    const auto t0 = Clock::now();
    if (profile == "prefill") LC_CUDA(cudaProfilerStart());
    e.prefill(prompts, gen, false);
    e.argmax_to(ids.get());
    LC_CUDA(cudaStreamSynchronize(e.stream()));
    if (profile == "prefill") LC_CUDA(cudaProfilerStop());
    const auto t1 = Clock::now();
    for (int step = 1; step < gen; ++step) {  // the first token comes from prefill
      const bool prof = profile == "decode" && step == std::min(128, gen - 1);
      if (prof) LC_CUDA(cudaProfilerStart());
      e.decode_device(ids.get());
      e.argmax_to(ids.get());
      if (prof) {
        LC_CUDA(cudaStreamSynchronize(e.stream()));
        LC_CUDA(cudaProfilerStop());
      }
    }
    LC_CUDA(cudaStreamSynchronize(e.stream()));
    const auto t2 = Clock::now();
    prefill_s = std::chrono::duration<double>(t1 - t0).count();
    decode_s = std::chrono::duration<double>(t2 - t1).count();
  };
  double pf = 0, dc = 0;
  once(pf, dc);  // warm-up (cuBLAS heuristics, allocations)
  if (!profile.empty()) return;
  once(pf, dc);
  e.check();
  const std::size_t peak = used_bytes();
  const long long launches = e.compressor().evict_launches();
  std::fprintf(stderr, "%s %s b%d: eviction chain launched %lld times in %d decode steps x %d layers (%s trigger)\n",
               shape, policy, batch, launches, gen - 1, s.n_layers, decode_trigger_name(e.compressor().decode_trigger()));
  double comp_pf = -1, comp_dc = -1, pf2 = 0, dc2 = 0;
  if (comp_share) {  // a third run with events around every compression call (adds syncs)
    e.set_time_compression(true);
    e.reset_compression_ms();
    once(pf2, dc2);
    comp_pf = e.prefill_compression_ms() / (pf2 * 1e3);
    comp_dc = (e.compression_ms() - e.prefill_compression_ms()) / (dc2 * 1e3);
    e.set_time_compression(false);
  }
  const auto& plan = e.plan();
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  std::string per_layer;
  for (int l = 0; l < plan.shape.num_layers; ++l)
    per_layer += (l ? "," : "") + std::to_string(std::size_t(plan.layer_pages[std::size_t(l)]) * plan.page_bytes);
  const double steps = gen - 1;
  char date[32];
  const std::time_t now = std::time(nullptr);
  std::strftime(date, sizeof date, "%Y-%m-%dT%H:%MZ", std::gmtime(&now));
  std::printf(
      "{\"engine\":\"ours\",\"shape\":\"%s\",\"policy\":\"%s\",\"final_ratio\":%.4f,\"batch\":%d,\"prompt\":%d,\"gen\":%d,"
      "\"kv_bytes\":%zu,\"kv_full_bytes\":%zu,\"kv_ratio\":%.4f,\"weight_bytes\":%zu,\"peak_device_bytes\":%zu,"
      "\"prefill_s\":%.4f,\"decode_ms_step\":%.3f,\"gen_tok_s\":%.1f,\"total_tok_s\":%.1f,"
      "\"comp_share_prefill\":%.4f,\"comp_share_decode\":%.4f,\"trigger\":\"%s\",\"graph\":%s,\"evict_launches\":%lld,"
      "\"page_size\":%d,\"device\":\"%s\",\"date\":\"%s\",\"kv_layer_bytes\":[%s]}\n",
      shape, policy, final_ratio, batch, prompt, gen, plan.total_bytes, plan.full_bytes, plan.ratio_to_full,
      model.weight_bytes(), peak, pf, dc / steps * 1e3, batch * double(gen) / (pf + dc),
      batch * double(prompt + gen) / (pf + dc), comp_pf, comp_dc, decode_trigger_name(e.compressor().decode_trigger()),
      e.options().decode_graph ? "true" : "false", launches, e.options().page_size, prop.name, date, per_layer.c_str());
  std::fflush(stdout);
}

// ---- selfcheck ---------------------------------------------------------------

template <class T>
static DBuf<T> to_device(const std::vector<T>& h) {
  DBuf<T> d(h.size());
  LC_CUDA(cudaMemcpy(d.get(), h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}
template <class T>
static std::vector<T> to_host(const DBuf<T>& d, std::size_t n) {
  std::vector<T> h(n);
  LC_CUDA(cudaMemcpy(h.data(), d.get(), n * sizeof(T), cudaMemcpyDeviceToHost));
  return h;
}

/// Largest |a - b| over fp16 arrays and over fp32 arrays (-inf == -inf counts as equal; a NaN, such as a
/// poisoned value a kernel left unwritten, counts as 1e30).
static double max_err(const std::vector<__half>& a, const std::vector<__half>& b) {
  double e = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double d = std::fabs(double(__half2float(a[i])) - double(__half2float(b[i])));
    e = std::max(e, std::isfinite(d) ? d : 1e30);
  }
  return e;
}
static double max_err(const std::vector<float>& a, const std::vector<float>& b) {
  double e = 0;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (!(a[i] == b[i])) e = std::max(e, std::isfinite(a[i] - b[i]) ? double(std::fabs(a[i] - b[i])) : 1e30);
  return e;
}

/// All bytes 0xFF: NaN in fp16 and fp32, so whatever a kernel leaves unwritten fails the comparison.
template <class T>
static void poison(DBuf<T>& d) {
  LC_CUDA(cudaMemset(d.get(), 0xFF, d.size() * sizeof(T)));
}

static std::vector<__half> random_halves(std::mt19937& rng, std::size_t n, float amp) {
  std::uniform_real_distribution<float> uni(-1.f, 1.f);
  std::vector<__half> v(n);
  for (auto& x : v) x = __float2half(uni(rng) * amp);
  return v;
}

/// n ascending positions with gaps of 1-3 from a random start: what token dropping leaves.
static std::vector<std::int32_t> gapped_positions(std::mt19937& rng, int n) {
  std::vector<std::int32_t> p(std::size_t(std::max(n, 0)));
  int x = int(rng() % 5);
  for (auto& v : p) v = x, x += 1 + int(rng() % 3);
  return p;
}

/// Prefill attention against the packed reference: ragged sequences (1 row, partial and full 64-row tiles),
/// gapped positions (causality by position, not row), K/V in the engine's [rows, Hkv, d] or head-major.
static bool check_prefill(int D, int H, int Hkv, bool head_major, std::uint32_t seed) {
  std::mt19937 rng(seed);
  const std::vector<int> rows_of = {1, 70, 200, 64};
  const int nb = int(rows_of.size());
  std::vector<std::int32_t> off{0}, qpos;
  for (int n : rows_of) {
    off.push_back(off.back() + n);
    const std::vector<std::int32_t> p = gapped_positions(rng, n);
    qpos.insert(qpos.end(), p.begin(), p.end());
  }
  const int rows = off.back();
  const DBuf<__half> q = to_device(random_halves(rng, std::size_t(rows) * H * D, 3.f));  // peaked: masking matters
  const DBuf<__half> k = to_device(random_halves(rng, std::size_t(rows) * Hkv * D, 1.f));
  const DBuf<__half> v = to_device(random_halves(rng, std::size_t(rows) * Hkv * D, 1.f));
  const DBuf<std::int32_t> dqpos = to_device(qpos), doff = to_device(off);
  const attn::PackedKV kv{k.get(), v.get(), head_major ? D : std::int64_t(Hkv) * D,
                          head_major ? std::int64_t(rows) * D : D, Hkv};
  const float scale = 1.f / std::sqrt(float(D));
  const std::size_t no = std::size_t(rows) * H * D, nl = std::size_t(rows) * H;
  DBuf<__half> out(no), ref(no);
  DBuf<float> lse(nl), lse_ref(nl);
  poison(out), poison(ref), poison(lse), poison(lse_ref);
  attn::prefill_attention(q.get(), dqpos.get(), doff.get(), nb, *std::max_element(rows_of.begin(), rows_of.end()), kv,
                          H, D, scale, out.get(), lse.get(), 0);
  attn::reference_attention(q.get(), dqpos.get(), doff.get(), nb, rows, kv, H, D, scale, ref.get(), lse_ref.get(), 0);
  LC_CUDA(cudaDeviceSynchronize());
  const double eo = max_err(to_host(out, no), to_host(ref, no)), el = max_err(to_host(lse, nl), to_host(lse_ref, nl));
  const bool ok = eo < 1e-2 && el < 2e-3;
  std::printf("selfcheck prefill attention d=%d H=%d Hkv=%d rows=%d %s: max|out-ref| %.2e, max|lse-ref| %.2e %s\n", D,
              H, Hkv, rows, head_major ? "head-major" : "[rows,Hkv,d]", eo, el, ok ? "OK" : "FAIL");
  return ok;
}

/// A random paged cache on the device (2 layers x 8 slots; the check reads layer 1, layer 0 holds other
/// tokens so a wrong layer offset shows). Every sequence's pages come from a shuffled pool with spare pages
/// of random data; table entries past a sequence's pages hold invalid ids (-1, num_pages + 3). Slot 6 has
/// a device length past its table row (clamped: read through its one valid page, then invalid ids), slot 7
/// a negative length (empty).
struct TestPaged {
  DBuf<__half> k, v;
  DBuf<std::int32_t> table, length, positions;
  PagedKV<half_t> kv;
  std::vector<std::vector<std::int32_t>> pos1;  // layer 1, per slot: head 0's positions of the valid tokens
  int max_len = 0;                              // the longest valid length in layer 1 (decode's host bound)
};

static TestPaged make_test_paged(std::mt19937& rng, int D, int Hkv, int page, PageLayout layout, bool interleaved,
                                 int pos_heads) {
  constexpr int kLayers = 2, kSlots = 8, kMaxLen = 320;
  const std::vector<std::vector<int>> valid = {{33, 250, 5, 128, 0, 17, 9, 9}, {70, 1, 300, 0, 64, 200, 40, 0}};
  int shift = 0;
  while ((1 << shift) < page) ++shift;
  const int max_pages = (kMaxLen + page - 1) / page;
  int used = 0;
  for (const auto& layer : valid)
    for (int n : layer) used += (n + page - 1) / page;
  const int num_pages = used + 7;  // spare pages of random data
  std::vector<std::int32_t> ids(static_cast<std::size_t>(num_pages));
  for (int i = 0; i < num_pages; ++i) ids[std::size_t(i)] = i;
  std::shuffle(ids.begin(), ids.end(), rng);
  std::vector<std::int32_t> table(std::size_t(kLayers) * kSlots * max_pages), length(std::size_t(kLayers) * kSlots);
  for (std::size_t i = 0; i < table.size(); ++i) table[i] = i % 2 ? -1 : num_pages + 3;
  std::uniform_int_distribution<std::int32_t> junk(0, 999);
  std::vector<std::int32_t> positions(std::size_t(num_pages) * page * pos_heads);
  for (auto& p : positions) p = junk(rng);  // slots no sequence holds
  TestPaged t;
  t.pos1.resize(kSlots);
  int next = 0;
  for (int l = 0; l < kLayers; ++l)
    for (int s = 0; s < kSlots; ++s) {
      const int n = valid[std::size_t(l)][std::size_t(s)];
      std::int32_t* row = table.data() + (std::size_t(l) * kSlots + s) * max_pages;
      for (int i = 0; i < (n + page - 1) / page; ++i) row[i] = ids[std::size_t(next++)];
      for (int hp = 0; hp < pos_heads; ++hp) {  // per-head selection: each head keeps its own positions
        const std::vector<std::int32_t> p = gapped_positions(rng, n);
        for (int j = 0; j < n; ++j)
          positions[((std::size_t(row[j >> shift]) << shift) + (j & (page - 1))) * pos_heads + hp] = p[std::size_t(j)];
        if (l == 1 && hp == 0) t.pos1[std::size_t(s)] = p;
      }
      length[std::size_t(l) * kSlots + s] = n;
      if (l == 1 && s < 6) t.max_len = std::max(t.max_len, n);
    }
  length[kSlots + 6] = 1 << 30, length[kSlots + 7] = -5;
  const std::size_t pool = std::size_t(num_pages) * page * Hkv * D;
  t.k = to_device(random_halves(rng, interleaved ? 2 * pool : pool, 1.f));
  if (!interleaved) t.v = to_device(random_halves(rng, pool, 1.f));
  t.table = to_device(table), t.length = to_device(length), t.positions = to_device(positions);
  half_t* k = reinterpret_cast<half_t*>(t.k.get());
  t.kv.pool = interleaved ? make_interleaved_page_pool(k, layout, num_pages, page, Hkv, D)
                          : make_page_pool(k, reinterpret_cast<half_t*>(t.v.get()), layout, num_pages, page, Hkv, D);
  t.kv.table = t.table.get(), t.kv.length = t.length.get(), t.kv.positions = t.positions.get();
  t.kv.num_layers = kLayers, t.kv.max_seqs = kSlots, t.kv.max_pages = max_pages, t.kv.pos_heads = pos_heads;
  t.kv.page_shift = shift;
  return t;
}

/// Decode attention over a random paged cache against the paged reference, for 1, 3 and 8 key splits. The
/// batch is a permuted subset of slots plus an empty one, both bad-state slots and a slot id out of range; the
/// queries sit at a sequence's last position, inside it (later keys masked) or between two kept positions.
static bool check_decode(int D, int H, int Hkv, int page, PageLayout layout, bool interleaved, int pos_heads,
                         std::uint32_t seed) {
  std::mt19937 rng(seed);
  const TestPaged t = make_test_paged(rng, D, Hkv, page, layout, interleaved, pos_heads);
  const std::vector<std::int32_t> seqs = {4, 0, 5, 2, 1, 3, 6, 7, 99};
  const int B = int(seqs.size());
  std::vector<std::int32_t> qpos(std::size_t(B), 0);
  for (int b = 0; b < B; ++b) {
    const int s = seqs[std::size_t(b)];
    if (s >= int(t.pos1.size()) || t.pos1[std::size_t(s)].empty()) continue;
    const std::vector<std::int32_t>& p = t.pos1[std::size_t(s)];
    const int n = int(p.size());
    qpos[std::size_t(b)] = b % 3 == 0 ? p.back() : p[std::size_t(2 * n / 3)] + b % 3 - 1;
  }
  const DBuf<__half> q = to_device(random_halves(rng, std::size_t(B) * H * D, 3.f));
  const DBuf<std::int32_t> dqpos = to_device(qpos), dseqs = to_device(seqs);
  const attn::PagedLayer c{t.kv, 1, dseqs.get()};
  const float scale = 1.f / std::sqrt(float(D));
  const std::size_t no = std::size_t(B) * H * D, nl = std::size_t(B) * H;
  DBuf<__half> out(no), ref(no);
  DBuf<float> lse(nl), lse_ref(nl), part(std::size_t(B) * H * 8 * (D + 2));
  poison(ref), poison(lse_ref);
  attn::reference_attention(q.get(), dqpos.get(), B, c, H, D, scale, ref.get(), lse_ref.get(), 0);
  LC_CUDA(cudaDeviceSynchronize());
  const std::vector<__half> href = to_host(ref, no);
  const std::vector<float> hlse_ref = to_host(lse_ref, nl);
  double eo = 0, el = 0;
  const bool group = attn::decode_group(H, Hkv) > 1;  // tensor cores take GQA groups only
  for (attn::DecodeMath math : {attn::DecodeMath::cuda_cores, attn::DecodeMath::tensor_cores})
    for (int splits : {1, 3, 8}) {
      if (math == attn::DecodeMath::tensor_cores && !group) continue;
      poison(out), poison(lse), poison(part);
      attn::decode_attention(q.get(), dqpos.get(), B, c, t.max_len, H, D, scale, splits, part.get(), out.get(),
                             lse.get(), 0, math);
      LC_CUDA(cudaDeviceSynchronize());
      eo = std::max(eo, max_err(to_host(out, no), href)), el = std::max(el, max_err(to_host(lse, nl), hlse_ref));
    }
  const bool ok = eo < 1e-2 && el < 2e-3;
  std::printf("selfcheck decode attention d=%d H=%d Hkv=%d page=%d %s%s pos_heads=%d splits=1,3,8, %s: max|out-ref| %.2e, "
              "max|lse-ref| %.2e %s\n",
              D, H, Hkv, page, page_layout_name(layout), interleaved ? " interleaved" : "", pos_heads,
              group ? "CUDA and tensor cores" : "CUDA cores", eo, el,
              ok ? "OK" : "FAIL");
  return ok;
}

/// Prefill (packed rows) and decode (paged cache: page sizes 1, 16, 64, NHD and HND, separate and
/// interleaved pools, shared and per-head positions) against the fp32 references.
static bool check_attention(int D, int H, int Hkv, std::uint32_t seed) {
  bool ok = check_prefill(D, H, Hkv, seed % 2 == 0, seed);
  ok &= check_decode(D, H, Hkv, 1, PageLayout::nhd, false, 1, seed * 16 + 1);
  ok &= check_decode(D, H, Hkv, 16, PageLayout::nhd, false, 1, seed * 16 + 2);
  ok &= check_decode(D, H, Hkv, 16, PageLayout::hnd, true, Hkv, seed * 16 + 3);
  ok &= check_decode(D, H, Hkv, 64, PageLayout::hnd, false, 1, seed * 16 + 4);
  return ok;
}

/// A small pyramid45-style model decoded with and without CUDA graphs: the logits must agree.
static bool check_decode_graph() {
  const LlamaShape s = named_shape("tiny");
  const CudaModel model = CudaModel::random(s, 7);
  std::vector<std::vector<std::int32_t>> prompts;
  for (int n : {96, 160, 200, 128}) {
    std::vector<std::int32_t> p(static_cast<std::size_t>(n));
    for (int i = 0; i < n; ++i) p[std::size_t(i)] = (i * 37 + n * 11) % s.vocab;
    prompts.push_back(p);
  }
  const int gen = 48;
  auto make = [&](bool graph) {
    EngineOptions o;
    o.recent_ratio = 0.1, o.selection.min_context = 16, o.decode_graph = graph;
    return std::make_unique<CudaEngine<CosineSchedule>>(model, o, CosineSchedule{0.3},
                                                        DecodeSchedule<CosineSchedule>{16, 0.5, CosineSchedule{0.1}});
  };
  auto eager = make(false), graph = make(true);
  std::vector<float> la = eager->prefill(prompts, gen), lb = graph->prefill(prompts, gen);
  double err = max_err(la, lb);
  for (int step = 0; step < gen; ++step) {
    std::vector<std::int32_t> tok(prompts.size());
    for (std::size_t b = 0; b < prompts.size(); ++b)
      tok[b] = std::int32_t(std::max_element(la.begin() + std::int64_t(b) * s.vocab, la.begin() + std::int64_t(b + 1) * s.vocab) -
                            (la.begin() + std::int64_t(b) * s.vocab));
    la = eager->decode(tok), lb = graph->decode(tok);
    err = std::max(err, max_err(la, lb));
  }
  eager->check(), graph->check();
  const bool ok = err <= 1e-4 && eager->compressor().evict_launches() == graph->compressor().evict_launches();
  std::printf("selfcheck decode graph vs eager (tiny pyramid45, %d steps, %lld evictions): max|logit diff| %.2e %s\n", gen,
              graph->compressor().evict_launches(), err, ok ? "OK" : "FAIL");
  return ok;
}

static int selfcheck() {
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  std::printf("selfcheck on %s\n", prop.name);
  bool ok = true;
  ok &= check_attention(128, 32, 32, 1);
  ok &= check_attention(128, 32, 8, 2);
  ok &= check_attention(64, 8, 2, 3);
  ok &= check_attention(128, 8, 2, 4);
  // Decode blocks take a whole GQA group of 2, 4 or 8 query heads; other groups one head.
  ok &= check_attention(128, 16, 8, 5);
  ok &= check_attention(64, 16, 2, 6);
  ok &= check_attention(64, 9, 3, 7);
  ok &= check_decode_graph();
  std::printf("selfcheck %s\n", ok ? "PASSED" : "FAILED");
  return ok ? 0 : 1;
}

/// A whole decimal number in [lo, hi] from the command line, or an error naming `what` and the text.
static int parse_int_arg(const char* text, const char* what, long lo, long hi) {
  char* end = nullptr;
  errno = 0;
  const long v = std::strtol(text, &end, 10);
  if (end == text || *end != '\0' || errno != 0 || v < lo || v > hi)
    throw std::invalid_argument(std::string(what) + " '" + text + "': a whole number in [" + std::to_string(lo) + ", " +
                                std::to_string(hi) + "]");
  return int(v);
}

int main(int argc, char** argv) {
  if (argc == 2 && std::strcmp(argv[1], "selfcheck") == 0) {
    try {
      return selfcheck();
    } catch (const std::exception& ex) {
      std::fprintf(stderr, "e2e-bench selfcheck: %s\n", ex.what());
      return 1;
    }
  }
  if ((argc == 2 || argc == 3) && std::strcmp(argv[1], "attn-floor") == 0) {
    try {
      return attn_floor::run(argc == 3 ? parse_int_arg(argv[2], "attn-floor shape index", 0, 1000) : -1);
    } catch (const std::exception& ex) {
      std::fprintf(stderr, "e2e-bench attn-floor: %s\n", ex.what());
      return 1;
    }
  }
  if (argc < 6) {
    std::fprintf(stderr,
                 "usage: e2e-bench SHAPE full|pyramid|pyramid45 BATCH|fit PROMPT GEN [--comp-share] [--device-trigger] "
                 "[--no-graph] [--page-size N] [--profile prefill|decode]\n       e2e-bench selfcheck | attn-floor\n");
    return 2;
  }
  try {
    const std::string shape = argv[1], policy = argv[2], batch_arg = argv[3];
    const int prompt = parse_int_arg(argv[4], "PROMPT", 1, 1 << 20), gen = parse_int_arg(argv[5], "GEN", 1, 1 << 20);
    bool comp = false, device_trigger = false, graph = true;
    int page_size = EngineOptions{}.page_size;
    std::string profile;
    for (int i = 6; i < argc; ++i) {
      if (std::strcmp(argv[i], "--comp-share") == 0) comp = true;
      else if (std::strcmp(argv[i], "--profile") == 0 && i + 1 < argc) profile = argv[++i];
      else if (std::strcmp(argv[i], "--device-trigger") == 0) device_trigger = true;
      else if (std::strcmp(argv[i], "--no-graph") == 0) graph = false;
      else if (std::strcmp(argv[i], "--page-size") == 0 && i + 1 < argc)
        page_size = parse_int_arg(argv[++i], "--page-size", 1, 1 << 20);
      else throw std::runtime_error(std::string("unknown flag ") + argv[i]);
    }
    if (!profile.empty() && profile != "prefill" && profile != "decode")
      throw std::runtime_error("--profile must be prefill or decode, got '" + profile + "'");
    const int fixed_batch = batch_arg == "fit" ? 0 : parse_int_arg(batch_arg.c_str(), "BATCH (or fit)", 1, 1 << 20);
    const LlamaShape s = shape_of(shape);
    const CudaModel model = CudaModel::random(s, 42);
    auto go = [&](auto& e, double r) {
      int batch = 0;
      if (batch_arg == "fit") {
        std::size_t f = 0, t = 0;
        cudaMemGetInfo(&f, &t);
        const KvPlan one = e.plan_for({prompt}, gen);
        // 80% of the card: weights + prefill work buffers (one chunk) + 1 GiB (cuBLAS, CUDA context) fixed;
        // per sequence the planned KV bytes + the compressor arena + decode buffers
        const std::size_t budget = std::size_t(0.8 * double(t));
        const std::size_t fixed = model.weight_bytes() + e.work_bytes(std::max(EngineOptions{}.prefill_chunk_rows, prompt)) +
                                  (std::size_t(1) << 30);
        const std::size_t per = one.total_bytes + e.extra_bytes_per_sequence(prompt, gen);
        batch = budget > fixed ? int((budget - fixed) / per) : 0;
        std::fprintf(stderr, "fit: budget %zu, fixed %zu, %zu KV + %zu other bytes per sequence -> batch %d\n", budget,
                     fixed, one.total_bytes, per - one.total_bytes, batch);
      } else {
        batch = fixed_batch;
      }
      run(shape.c_str(), policy.c_str(), model, e, batch, prompt, gen, comp, r, profile);
    };
    EngineOptions base;
    if (device_trigger) base.decode_trigger = DecodeTrigger::device;
    base.decode_graph = graph;
    base.page_size = page_size;
    if (policy == "full") {
      EngineOptions o = base;
      o.compress_decode = false, o.compress_prefill = false;
      CudaEngine<UniformSchedule> e(model, o, UniformSchedule{1.0});
      go(e, 1.0);
    } else if (policy == "pyramid") {
      CudaEngine<CosineSchedule> e(model, base, CosineSchedule{0.9});
      go(e, 0.9);
    } else if (policy == "pyramid45") {
      // Planner-found (see the top); the plan's ratio is printed in kv_ratio.
      EngineOptions o = base;
      o.recent_ratio = 0.1;
      o.selection.min_context = 16;
      CudaEngine<CosineSchedule> e(model, o, CosineSchedule{0.3},
                                   DecodeSchedule<CosineSchedule>{16, 0.5, CosineSchedule{0.1}});
      go(e, 0.3);
    } else {
      throw std::runtime_error("policy must be full, pyramid or pyramid45");
    }
    return 0;
  } catch (const std::exception& ex) {
    std::fprintf(stderr, "e2e-bench: %s\n", ex.what());
    return 1;
  }
}
