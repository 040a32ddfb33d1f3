// Benchmark driver: device ceilings (copy bandwidth, cuBLAS fp16 GEMM) and the
// pyramidinfer CUDA kernels on LLaMA-2-13B and Llama-3-8B shapes (and the paged
// compaction on a LLaMA-2-7B layer), one process.
// Prints one CSV line per measurement:  ours,<case>,<median ms>,<floor ms>,<note>
#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <pyramidinfer/pyramidinfer_cuda.cuh>

namespace pi = pyramidinfer;
namespace pcu = pyramidinfer::cuda;
#define CK PYRAMIDINFER_CUDA_CHECK

static double g_bw = 0, g_flops = 0;  // bytes/s (read+write), FLOP/s
static const char* g_filter = nullptr;  // run only cases whose name contains this
static bool wanted(const std::string& name) { return !g_filter || name.find(g_filter) != std::string::npos; }

template <class T>
struct Buf {
  T* p = nullptr;
  size_t n;
  explicit Buf(size_t n_) : n(n_) { CK(cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(T))); }
  ~Buf() { cudaFree(p); }
};

// Timing harness. Every repetition runs, in stream order: the optional
// `setup` (e.g. restoring an in-place kernel's input), an L2 flush that READS
// a buffer of 4x the L2 size (so the previous repetition's dirty lines are
// written back there, and the timed work starts from a clean, cold L2), then
// a spin kernel that holds the stream while the host enqueues the start
// event, the work and the stop event. The events then time the GPU work
// alone, not the host's launch latency (nvbench's "blocking kernel" idea).
// torch_peer.py times the peer the same way.
struct Flush {
  uint4* p = nullptr;
  size_t n = 0;
  unsigned* sink = nullptr;
};
static Flush g_flush;

__global__ void l2_flush_kernel(const uint4* p, size_t n, unsigned* sink) {
  unsigned acc = 0;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    const uint4 v = __ldcg(p + i);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x9e3779b9u) *sink = acc;  // keeps the loads; (almost) never stores
}
__global__ void spin_kernel(unsigned long long ns) {
  unsigned long long t0, t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  do asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); while (t - t0 < ns);
}

static void flush_init() {
  int dev = 0, l2 = 0;
  CK(cudaGetDevice(&dev));
  CK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev));
  g_flush.n = std::max<size_t>(size_t(4) * l2, size_t(64) << 20) / sizeof(uint4);
  CK(cudaMalloc(&g_flush.p, g_flush.n * sizeof(uint4)));
  CK(cudaMalloc(&g_flush.sink, sizeof(unsigned)));
  CK(cudaMemset(g_flush.p, 0x5a, g_flush.n * sizeof(uint4)));
}

static float median_ms(const std::function<void()>& f, int reps, cudaStream_t s,
                       const std::function<void()>& setup = nullptr) {
  if (setup) setup();
  f();  // warm-up
  CK(cudaStreamSynchronize(s));
  std::vector<float> t;
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  for (int i = 0; i < reps; ++i) {
    if (setup) setup();
    l2_flush_kernel<<<1024, 256, 0, s>>>(g_flush.p, g_flush.n, g_flush.sink);
    spin_kernel<<<1, 1, 0, s>>>(100000);  // 100 us: the host enqueues the rest meanwhile
    CK(cudaGetLastError());
    CK(cudaEventRecord(a, s));
    f();
    CK(cudaEventRecord(b, s));
    CK(cudaEventSynchronize(b));
    float ms;
    CK(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

__global__ void fill_rand(unsigned short* x, size_t n, unsigned seed, float sd) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    unsigned h = unsigned(i) * 2654435761u ^ seed;
    h ^= h >> 13; h *= 0x5bd1e995u; h ^= h >> 15;
    const float u = (h & 0xffffff) / 16777216.0f - 0.5f;
    x[i] = __half_as_ushort(__float2half(u * sd));
  }
}
__global__ void fill_randf(float* x, size_t n, unsigned seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    unsigned h = unsigned(i) * 2654435761u ^ seed;
    h ^= h >> 13; h *= 0x5bd1e995u; h ^= h >> 15;
    x[i] = (h & 0xffffff) / 16777216.0f;
  }
}
// Inputs are a fixed hash of (element index, seed), reproduced bit for bit by
// benchmarks/torch_peer.py (hash_fill), so both sides time the same tensors.
template <class T>
void frand(Buf<T>& b, unsigned seed, float sd = 2.0f) {
  if constexpr (std::is_same<T, float>::value) fill_randf<<<1024, 256>>>(b.p, b.n, seed);
  else fill_rand<<<1024, 256>>>(reinterpret_cast<unsigned short*>(b.p), b.n, seed, sd);
  CK(cudaGetLastError());
}
static unsigned host_hash(unsigned i, unsigned seed) {
  unsigned h = i * 2654435761u ^ seed;
  h ^= h >> 13; h *= 0x5bd1e995u; h ^= h >> 15;
  return h;
}
template <class T>
static double checksum(const T* d, size_t n) {
  std::vector<T> h(n);
  CK(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
  double s = 0;
  for (const T& x : h) s += double(x);
  return s;
}

static void report(const std::string& name, float ms, double floor_ms, const std::string& note = "") {
  std::printf("ours,%s,%.4f,%.4f,%s\n", name.c_str(), ms, floor_ms, note.c_str());
  std::fflush(stdout);
}

static void ceilings(cudaStream_t s) {
  const size_t bytes = size_t(2) << 30;
  Buf<char> a(bytes), b(bytes);
  CK(cudaMemset(a.p, 1, bytes));
  float ms = median_ms([&] { CK(cudaMemcpyAsync(b.p, a.p, bytes, cudaMemcpyDeviceToDevice, s)); }, 10, s);
  g_bw = 2.0 * bytes / (ms * 1e-3);
  report("copy_d2d_2GiB", ms, 0, "bandwidth_GBps=" + std::to_string(g_bw / 1e9));
  const int N = 8192;
  Buf<pi::half_t> A(size_t(N) * N), B(size_t(N) * N), C(size_t(N) * N);
  frand(A, 1); frand(B, 2);
  cublasHandle_t h;
  cublasCreate(&h);
  cublasSetStream(h, s);
  const float one = 1, zero = 0;
  ms = median_ms([&] {
    cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, N, N, N, &one, A.p, CUDA_R_16F, N, B.p, CUDA_R_16F, N, &zero, C.p,
                 CUDA_R_16F, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  }, 10, s);
  g_flops = 2.0 * N * N * double(N) / (ms * 1e-3);
  report("cublas_fp16_gemm_8192", ms, 0, "TFLOPs=" + std::to_string(g_flops / 1e12));
  cublasDestroy(h);
}

// Scoring: B sequences, Hq query heads, Hkv kv heads, n keys, window 20%.
// Shared granularity (one score per key, summed over heads) when Hq == Hkv or
// `shared` (the engine's compressor on GQA models), else one per KV head.
static void bench_scoring(const char* tag, int B, int Hq, int Hkv, int n, int d, bool given_lse, int reps,
                          cudaStream_t s, bool shared = false) {
  if (!wanted(std::string("score_") + tag + (given_lse ? "_lse_given" : "_lse_computed"))) return;
  const int w = 1 + int(0.2 * n), cap = w;
  Buf<pi::half_t> K(size_t(B) * Hkv * n * d), Q(size_t(B) * Hq * cap * d);
  frand(K, 11); frand(Q, 12);
  Buf<float> lse(size_t(B) * Hq * cap);
  std::vector<int> hlen(size_t(B) * Hkv, n), hzero(B, 0), hw(B, w), hbeg(size_t(B) * Hkv, 0), hcnt(size_t(B) * Hkv, n - w);
  Buf<int> len(hlen.size()), ring(B), win(B), beg(hbeg.size()), cnt(hcnt.size());
  CK(cudaMemcpy(len.p, hlen.data(), hlen.size() * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(ring.p, hzero.data(), B * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(win.p, hw.data(), B * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(beg.p, hbeg.data(), hbeg.size() * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(cnt.p, hcnt.data(), hcnt.size() * 4, cudaMemcpyHostToDevice));
  pi::ScoreProblem<pi::half_t> p;
  p.keys = pi::make_hnd<const pi::half_t>(K.p, B, Hkv, n, d);
  p.kv_len = pi::make_contiguous<const int>(len.p, B, Hkv);
  p.queries = pi::make_contiguous<const pi::half_t>(Q.p, B, Hq, cap, d);
  p.ring_start = ring.p;
  p.window_len = win.p;
  p.score_begin = pi::make_contiguous<const int>(beg.p, B, Hkv);
  p.score_count = pi::make_contiguous<const int>(cnt.p, B, Hkv);
  p.scale = 1.0f / std::sqrt(float(d));
  const pi::Granularity g = Hkv == Hq || shared ? pi::Granularity::shared : pi::Granularity::per_kv_head;
  const int groups = g == pi::Granularity::shared ? 1 : Hkv;
  Buf<float> out(size_t(B) * groups * n);
  if (given_lse) {
    pcu::window_query_lse(p, 0, pi::make_contiguous(lse.p, B, Hq, cap), s);
    p.lse = pi::make_contiguous<const float>(lse.p, B, Hq, cap);
  }
  const size_t wsb = pcu::window_attention_scores_workspace_bytes(p, g);
  Buf<char> ws(wsb);
  const float ms = median_ms([&] {
    pcu::window_attention_scores(p, g, 2.0f, pi::make_contiguous(out.p, B, groups, n), ws.p, wsb, s);
  }, reps, s);
  double cs = 0;  // sum of all scores (the peer prints the same sum)
  {
    std::vector<float> h(out.n);
    CK(cudaMemcpy(h.data(), out.p, out.n * 4, cudaMemcpyDeviceToHost));
    for (int bb = 0; bb < B; ++bb)
      for (int gg = 0; gg < groups; ++gg)
        for (int j = 0; j < n - w; ++j) cs += h[(size_t(bb) * groups + gg) * n + j];
  }
  // FLOPs: scoring pass over (n - w) keys; LSE pass causal over ~n - w/2 keys.
  double fl = 2.0 * B * Hq * double(w) * (n - w) * d;
  if (!given_lse) fl += 2.0 * B * Hq * double(w) * (n - w / 2.0) * d;
  const double bytes = 2.0 * (K.n + Q.n) + 4.0 * B * groups * (n - w);
  const double floor_ms = std::max(fl / g_flops, bytes / g_bw) * 1e3;
  report(std::string("score_") + tag + (given_lse ? "_lse_given" : "_lse_computed"), ms, floor_ms,
         "TFLOPs=" + std::to_string(fl / (ms * 1e-3) / 1e12) + " frac_floor=" + std::to_string(floor_ms / ms) +
             " sum=" + std::to_string(cs));
}

static void bench_topk(const char* tag, int rows, int n, int k, cudaStream_t s) {
  if (!wanted(std::string("topk_") + tag)) return;
  Buf<float> sc(size_t(rows) * n);
  frand(sc, 21);
  std::vector<int> hn(rows, n), hk(rows, k);
  Buf<int> dn(rows), dk(rows), out(size_t(rows) * k);
  CK(cudaMemcpy(dn.p, hn.data(), rows * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dk.p, hk.data(), rows * 4, cudaMemcpyHostToDevice));
  const size_t wsb = pcu::topk_indices_workspace_bytes(rows, n);
  Buf<char> ws(wsb);
  const float ms = median_ms([&] {
    pcu::topk_indices(pi::make_contiguous<const float>(sc.p, rows, 1, n), pi::make_contiguous<const int>(dn.p, rows, 1),
                      pi::make_contiguous<const int>(dk.p, rows, 1), 4, pi::make_contiguous(out.p, rows, 1, k), ws.p,
                      wsb, s);
  }, 20, s);
  const double bytes = 4.0 * rows * n + 4.0 * rows * k;
  const double idx_sum = checksum(out.p, out.n);  // the peer prints the same sum (forced sinks aside, see peer)
  report(std::string("topk_") + tag, ms, bytes / g_bw * 1e3,
         std::string(wsb ? "multiblock" : "oneblock") + " idx_sum=" + std::to_string((long long)idx_sum));
}

static void bench_compact(const char* tag, int B, int H, int n, int d, int keep, cudaStream_t s) {
  if (!wanted(std::string("compact_gather_") + tag) && !wanted(std::string("compact_inplace_") + tag)) return;
  const size_t elems = size_t(B) * H * n * d;
  Buf<pi::half_t> K(elems), V(elems), K2(elems), V2(elems);
  frand(K, 11); frand(V, 13);
  // kept(r, i) = 2i + (hash & 1): one of every pair of rows, ascending (the
  // peer builds the same lists).
  std::vector<int> kept(size_t(B) * H * n), cnt(size_t(B) * H, keep);
  for (int r = 0; r < B * H; ++r)
    for (int i = 0; i < keep; ++i)
      kept[size_t(r) * n + i] = 2 * i + int(host_hash(unsigned(size_t(r) * keep + i), 31u) & 1u);
  Buf<int> dk(kept.size()), dc(cnt.size()), dcnt2(cnt.size());
  CK(cudaMemcpy(dk.p, kept.data(), kept.size() * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dc.p, cnt.data(), cnt.size() * 4, cudaMemcpyHostToDevice));
  auto kv = pi::make_contiguous<const int>(dk.p, B, H, n);
  auto cv = pi::make_contiguous<const int>(dc.p, B, H);
  const double bytes = 2.0 * 2.0 * double(B) * H * keep * d * 2;  // K and V, read + write
  float ms = median_ms([&] {
    pcu::gather_kv_rows<pi::half_t>(pi::make_hnd<const pi::half_t>(K.p, B, H, n, d),
                                    pi::make_hnd<const pi::half_t>(V.p, B, H, n, d), kv, cv,
                                    pi::make_hnd(K2.p, B, H, n, d), pi::make_hnd(V2.p, B, H, n, d), s);
  }, 20, s);
  report(std::string("compact_gather_") + tag, ms, bytes / g_bw * 1e3,
         "frac_copy_bw=" + std::to_string(bytes / g_bw * 1e3 / ms));
  // A plain copy of the same byte count (half read, half written) under the
  // same harness: what the copy engine reaches at this size.
  const float copy_ms = median_ms([&] {
    CK(cudaMemcpyAsync(K2.p, K.p, size_t(bytes / 2), cudaMemcpyDeviceToDevice, s));
  }, 20, s);
  report(std::string("copy_same_size_") + tag, copy_ms, bytes / g_bw * 1e3,
         "frac_copy_bw=" + std::to_string(bytes / g_bw * 1e3 / copy_ms));
  // In place: the same kept lists applied to a fresh copy each time (the
  // copy is the harness's untimed setup).
  const size_t wsb = pcu::compact_kv_inplace_workspace_bytes<pi::half_t>(B, H, n, d);
  Buf<char> ws(wsb);
  auto reset = [&] {
    CK(cudaMemcpyAsync(K2.p, K.p, elems * 2, cudaMemcpyDeviceToDevice, s));
    CK(cudaMemcpyAsync(V2.p, V.p, elems * 2, cudaMemcpyDeviceToDevice, s));
  };
  ms = median_ms([&] {
    pcu::compact_kv_inplace<pi::half_t>(pi::make_hnd(K2.p, B, H, n, d), pi::make_hnd(V2.p, B, H, n, d), {}, {}, kv, cv,
                                        ws.p, wsb, s);
  }, 20, s, reset);
  report(std::string("compact_inplace_") + tag, ms, bytes / g_bw * 1e3,
         "frac_copy_bw=" + std::to_string(bytes / g_bw * 1e3 / ms));
}

// The paged compaction's former mover (before the tiled, persistent one), kept
// here only to time the two in one process: one block per (sequence, KV
// head) walks the kept list in ascending chunks, loads, barrier, stores.
template <class T, class V>
__global__ void __launch_bounds__(pcu::detail::kPagedMoveThreads)
    former_paged_move_kernel(pi::PagedKV<T> c, int layer, pi::TensorView<const int, 3> kept, pcu::detail::PagedPlan p,
                             int vecs) {
  namespace d = pcu::detail;
  constexpr int U = d::kPagedMoveItems, kChunk = U * d::kPagedMoveThreads;
  const int i = blockIdx.x / c.pool.kv_heads, h = blockIdx.x % c.pool.kv_heads;
  if (p.bits[i] != 0) return;
  const int keep = p.count[i], mask = c.pool.page_size - 1;
  const int* table = c.pages(layer, p.slot[i]);
  if (h == 0) {
    const int first = c.pages_for(keep);
    for (long long x = threadIdx.x; x < p.pages[i]; x += blockDim.x) c.free.pages[p.start[i] + x] = table[first + x];
  }
  const int hp = c.pos_heads > 1 ? h : 0;
  const bool move_pos = h < c.pos_heads;
  const long long total = (long long)keep * vecs;
  for (long long e0 = 0; e0 < total; e0 += kChunk) {
    V kx[U], vx[U];
    int px[U], dst[U], col[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      dst[u] = -1, col[u] = 0, px[u] = 0;
      const long long e = e0 + u * d::kPagedMoveThreads + threadIdx.x;
      if (e >= total) continue;
      const int j = int(e / vecs), v = int(e - (long long)j * vecs);
      const int from = kept(i, hp, j);
      if (from == j) continue;
      const int sp = table[from >> c.page_shift];
      if (!d::paged_page_ok(sp, c.pool.num_pages)) continue;
      const int so = from & mask;
      kx[u] = *d::paged_vec<V>(c.pool.k_at(sp, so, h), v);
      vx[u] = *d::paged_vec<V>(c.pool.v_at(sp, so, h), v);
      if (move_pos && v == 0) px[u] = *d::paged_pos(c, sp, so, hp);
      dst[u] = j, col[u] = v;
    }
    __syncthreads();
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (dst[u] < 0) continue;
      const int dp = table[dst[u] >> c.page_shift];
      if (!d::paged_page_ok(dp, c.pool.num_pages)) continue;
      const int doff = dst[u] & mask;
      *d::paged_vec<V>(c.pool.k_at(dp, doff, h), col[u]) = kx[u];
      *d::paged_vec<V>(c.pool.v_at(dp, doff, h), col[u]) = vx[u];
      if (move_pos && col[u] == 0) *d::paged_pos(c, dp, doff, hp) = px[u];
    }
  }
}

// Paged in-place compaction (cuda::paged_compact): one sequence of n slots in
// a LLaMA-2-7B layer (32 KV heads, d 128, fp16) on pages of `page` slots,
// scattered over the pool (a shuffled page table, as after continuous
// batching), keeping about keep_pct% of its slots (hash-chosen, ascending;
// the peer of nothing: this case rates us against the copy engine only).
// Timed: the whole op (check, plan, move) on a fresh copy of the pool and
// state each time (the untimed setup). Reported against a cudaMemcpyAsync of
// the same byte count (the K and V bytes that change place: read once,
// written once, as the copy does) under the same harness, in this process.
static void bench_paged_compact(const char* tag, int n, int heads, int d, int page, int keep_pct,
                                pi::PageLayout layout, cudaStream_t s) {
  const std::string name = std::string("paged_compact_") + tag + "_" + (layout == pi::PageLayout::nhd ? "nhd" : "hnd");
  if (!wanted(name)) return;
  pi::PagedCacheShape sh;
  sh.num_layers = 1;
  sh.kv_heads = heads;
  sh.head_dim = d;
  sh.dtype = pi::DType::f16;
  sh.granularity = pi::Granularity::shared;
  sh.page_size = page;
  sh.max_seqs = 1;
  sh.max_seq_len = n;
  const int held = (n + page - 1) / page;
  sh.num_pages = held + held / 16 + 1;  // some free pages besides the sequence's
  const size_t page_elems = size_t(page) * heads * d, half_elems = size_t(sh.num_pages) * page_elems;
  Buf<pi::half_t> kv(2 * half_elems), kv0(2 * half_elems);
  frand(kv0, 41);
  const size_t state_bytes = sh.state_bytes();
  Buf<char> state(state_bytes), state0(state_bytes);
  Buf<int> freep(size_t(sh.num_pages)), freep0(size_t(sh.num_pages)), freec(1), freec0(1);
  const pi::PagePool<pi::half_t> pool =
      pi::make_page_pool(kv.p, kv.p + half_elems, layout, sh.num_pages, page, heads, d);
  const pi::PagedKVCache<pi::half_t, pi::CudaBackend> cache(sh, pool, pi::FreePageList{freep.p, freec.p, sh.num_pages},
                                                            state.p, state_bytes);
  // The state's host image: the table row (shuffled pages), length n,
  // positions = slot index, status 0; the other pages on the free list.
  std::vector<int> hstate(state_bytes / 4, 0), perm(size_t(sh.num_pages));
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), std::mt19937(7));
  const pi::PagedCacheShape::Offsets o = sh.offsets("bench_paged_compact");
  for (int p = 0; p < held; ++p) hstate[size_t(o.table + p)] = perm[size_t(p)];
  hstate[size_t(o.length)] = n;
  for (int t = 0; t < n; ++t) hstate[size_t(o.positions) + size_t(perm[size_t(t / page)]) * page + t % page] = t;
  const std::vector<int> hfree(perm.begin() + held, perm.end()), hcount{sh.num_pages - held};
  CK(cudaMemcpy(state0.p, hstate.data(), state_bytes, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(freep0.p, hfree.data(), hfree.size() * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(freec0.p, hcount.data(), 4, cudaMemcpyHostToDevice));
  std::vector<int> kept;
  for (int j = 0; j < n; ++j)
    if (int(host_hash(unsigned(j), 77u) % 100u) < keep_pct) kept.push_back(j);
  const int count = int(kept.size());
  long long moved_rows = 0;
  for (int j = 0; j < count; ++j) moved_rows += kept[size_t(j)] != j;
  const std::vector<int> hseq{0}, hcnt{count};
  Buf<int> dkept(kept.size()), dseq(1), dcnt(1);
  CK(cudaMemcpy(dkept.p, kept.data(), kept.size() * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dseq.p, hseq.data(), 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dcnt.p, hcnt.data(), 4, cudaMemcpyHostToDevice));
  const pi::SeqList list{dseq.p, 1};
  const auto kv_kept = pi::make_contiguous<const int>(dkept.p, 1, 1, count);
  const size_t wsb = pcu::paged_compact_workspace_bytes(cache.kv(), 0, list, kv_kept, dcnt.p);
  Buf<char> ws(wsb);
  auto reset = [&] {
    CK(cudaMemcpyAsync(kv.p, kv0.p, kv.n * sizeof(pi::half_t), cudaMemcpyDeviceToDevice, s));
    CK(cudaMemcpyAsync(state.p, state0.p, state_bytes, cudaMemcpyDeviceToDevice, s));
    CK(cudaMemcpyAsync(freep.p, freep0.p, freep.n * 4, cudaMemcpyDeviceToDevice, s));
    CK(cudaMemcpyAsync(freec.p, freec0.p, 4, cudaMemcpyDeviceToDevice, s));
  };
  const float ms = median_ms([&] { pcu::paged_compact(cache.kv(), 0, list, kv_kept, dcnt.p, ws.p, wsb, s); }, 20, s,
                             reset);
  // The op went ahead: status 0, length count, the tail pages on the free list.
  int status = -1, len = -1, fcount = -1;
  CK(cudaStreamSynchronize(s));
  CK(cudaMemcpy(&status, cache.kv().status, 4, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(&len, cache.kv().length, 4, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(&fcount, freec.p, 4, cudaMemcpyDeviceToHost));
  const int expect_free = sh.num_pages - (count + page - 1) / page;
  const double bytes = double(moved_rows) * heads * d * sizeof(pi::half_t) * 2;  // K and V
  const float copy_ms = median_ms([&] {
    CK(cudaMemcpyAsync(kv.p, kv0.p, size_t(bytes), cudaMemcpyDeviceToDevice, s));
  }, 20, s);
  report(name, ms, copy_ms,
         "moved_MB=" + std::to_string(bytes / 1e6) + " GBps=" + std::to_string(bytes / (ms * 1e-3) / 1e9) +
             " copy_GBps=" + std::to_string(bytes / (copy_ms * 1e-3) / 1e9) +
             " frac_copy_bw=" + std::to_string(copy_ms / ms) + " ws_bytes=" + std::to_string(wsb) +
             ((status == 0 && len == count && fcount == expect_free) ? " check=ok" : " check=FAILED"));
  // The former mover alone (its check and plan are the untimed setup, made by
  // the current kernels, which leave it the same plan entries it read).
  {
    namespace dd = pcu::detail;
    pi::WorkspaceCarver carver(ws.p, wsb);
    const dd::PagedPlan plan = dd::carve_paged_plan(carver, 1);
    const dd::PagedCompactScratch scratch =
        dd::carve_paged_compact(carver, 1, heads, cache.kv().pos_heads, dd::paged_compact_width(cache.kv(), kv_kept),
                                dd::paged_compact_flag_tiles(cache.kv(), kv_kept));
    const int vecs = dd::paged_move_vecs(cache.kv().pool);
    const bool vec = dd::paged_pool_vectorizable(cache.kv().pool);
    auto plan_setup = [&] {
      reset();
      dd::paged_compact_check_kernel<pi::half_t><<<dim3(1, unsigned(scratch.chunks)), dd::kPagedCheckThreads, 0, s>>>(
          cache.kv(), 0, dseq.p, kv_kept, dcnt.p, plan, scratch, vecs);
      dd::paged_push_plan_kernel<pi::half_t><<<1, dd::kPagedPlanThreads, 0, s>>>(
          cache.kv(), 0, dseq.p, 1, plan, vecs, scratch.ticket, scratch.verdict, scratch.first, scratch.chunks);
      CK(cudaGetLastError());
    };
    const float old_ms = median_ms([&] {
      if (vec)
        former_paged_move_kernel<pi::half_t, uint4>
            <<<heads, dd::kPagedMoveThreads, 0, s>>>(cache.kv(), 0, kv_kept, plan, vecs);
      else
        former_paged_move_kernel<pi::half_t, pi::half_t>
            <<<heads, dd::kPagedMoveThreads, 0, s>>>(cache.kv(), 0, kv_kept, plan, vecs);
      CK(cudaGetLastError());
    }, 10, s, plan_setup);
    report(name + "_former_mover", old_ms, copy_ms,
           "GBps=" + std::to_string(bytes / (old_ms * 1e-3) / 1e9) + " frac_copy_bw=" +
               std::to_string(copy_ms / old_ms) + " new_op_speedup=" + std::to_string(old_ms / ms));
  }
}

int main(int argc, char** argv) {
  int dev = 0;
  if (cudaGetDeviceCount(&dev) != cudaSuccess || dev == 0) {
    std::printf("SKIPPED: no CUDA device\n");
    return 0;
  }
  // Usage: pyramidinfer_bench [--quick] [case-substring]
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--quick") == 0) quick = true;
    else g_filter = argv[i];
  }
  cudaDeviceProp prop{};
  CK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device,%s,sm_%d%d,%d SMs\n", prop.name, prop.major, prop.minor, prop.multiProcessorCount);
  cudaStream_t s;
  CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  flush_init();
  ceilings(s);
  // LLaMA-2-13B: 40 heads, d 128, batch 32.
  for (int n : {512, 4096}) {
    const std::string t = "l2_13b_b32_n" + std::to_string(n);
    bench_scoring(t.c_str(), 32, 40, 40, n, 128, true, n > 1000 ? 3 : 10, s);
    bench_scoring(t.c_str(), 32, 40, 40, n, 128, false, n > 1000 ? 3 : 10, s);
    const int ctx = n - (1 + int(0.2 * n));
    bench_topk((t + "_shared").c_str(), 32, ctx, ctx / 2, s);
    bench_topk((t + "_perhead").c_str(), 32 * 40, ctx, ctx / 2, s);
    bench_compact(t.c_str(), 32, 40, n, 128, n / 2, s);
  }
  // Llama-3-8B: 32 q / 8 kv heads, d 128.
  for (int n : {32768, 131072}) {
    for (int B : {1, 4}) {
      const std::string t = "l3_8b_b" + std::to_string(B) + "_n" + std::to_string(n);
      const int ctx = n - (1 + int(0.2 * n));
      bench_topk((t + "_shared").c_str(), B, ctx, ctx / 2, s);
      bench_topk((t + "_perhead").c_str(), B * 8, ctx, ctx / 2, s);
      bench_compact(t.c_str(), B, 8, n, 128, n / 2, s);
    }
  }
  // Paged in-place compaction of one 32K prompt keeping 60%: LLaMA-2-7B layer
  // (32 KV heads, d 128, fp16), pages of 16, both pool layouts.
  for (pi::PageLayout layout : {pi::PageLayout::nhd, pi::PageLayout::hnd})
    bench_paged_compact("l2_7b_n32768_keep60_p16", 32768, 32, 128, 16, 60, layout, s);
  // Llama-3-8B per-KV-head scoring, batch 1 and 4, 32K and 128K slots.
  if (!quick)
    for (int n : {32768, 131072})
      for (int B : {1, 4}) {
        const std::string t = "l3_8b_b" + std::to_string(B) + "_n" + std::to_string(n);
        bench_scoring(t.c_str(), B, 32, 8, n, 128, true, 3, s);
        bench_scoring(t.c_str(), B, 32, 8, n, 128, false, 3, s);
      }
  // The engine's prefill shapes: one or four prompts, shared selection over
  // the GQA heads (n 8192 at layer 0, fewer slots deeper).
  if (!quick)
    for (int B : {1, 4})
      for (int n : {4096, 8192}) {
        const std::string t = "l3_8b_b" + std::to_string(B) + "_n" + std::to_string(n) + "_shared";
        bench_scoring(t.c_str(), B, 32, 8, n, 128, true, 10, s, true);
      }
  CK(cudaStreamDestroy(s));
  return 0;
}
