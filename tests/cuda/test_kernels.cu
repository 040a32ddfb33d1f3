// CUDA kernels against the host reference kernels, on fresh random inputs.
#include "test_util.cuh"

#include <algorithm>
#include <cmath>
#include <limits>

using namespace pyramidinfer;
using test::DeviceBuffer;
namespace pcu = pyramidinfer::cuda;

// ---------------------------------------------------------------- top-k ----

namespace {

/// Each row r of `out` (stride max_k) holds the host's top-k of scores row r
/// (stride row_stride) in its first k[r] slots and poison after them.
void expect_topk_rows(const std::vector<std::int32_t>& out, const std::vector<float>& s,
                      const std::vector<std::int32_t>& n, const std::vector<std::int32_t>& k, int row_stride, int max_k,
                      int forced) {
  for (std::size_t r = 0; r < n.size(); ++r) {
    std::vector<std::int32_t> ref(std::size_t(std::max(k[r], 1)));
    host::topk_indices(s.data() + r * std::size_t(row_stride), n[r], k[r], forced, ref.data());
    for (int i = 0; i < max_k; ++i) {
      const std::int32_t got = out[r * std::size_t(max_k) + std::size_t(i)];
      if (i < k[r]) {
        if (got != ref[std::size_t(i)]) {
          INFO("row " << r << " n " << n[r] << " k " << k[r] << " forced " << forced << " slot " << i);
          REQUIRE(got == ref[std::size_t(i)]);
        }
      } else if (!test::is_poison(got)) {
        INFO("row " << r << " wrote past k at " << i);
        REQUIRE(test::is_poison(got));
      }
    }
  }
}

void run_topk_case(const std::vector<int>& lens, int max_n, int groups, int forced, bool ties, bool nans,
                   cudaStream_t stream, bool use_ws = false) {
  const int batch = int(lens.size()) / groups;
  std::vector<float> s(std::size_t(batch) * groups * std::max(max_n, 1), std::numeric_limits<float>::quiet_NaN());
  std::vector<std::int32_t> n(lens.begin(), lens.end()), k(lens.size());
  int max_k = 1;
  for (std::size_t r = 0; r < lens.size(); ++r) {
    const int len = lens[r];
    const int kk = len == 0 ? 0 : (test::rand_int(0, 3) == 0 ? len : test::rand_int(0, len));
    k[r] = kk;
    max_k = std::max(max_k, kk);
    for (int j = 0; j < len; ++j) {
      float v = test::rand_normal();
      if (ties) v = std::round(v * 4.f) / 4.f;
      if (nans) {
        const int c = test::rand_int(0, 40);
        if (c == 0) v = std::numeric_limits<float>::quiet_NaN();
        if (c == 1) v = -std::numeric_limits<float>::infinity();
        if (c == 2) v = std::numeric_limits<float>::infinity();
        if (c == 3) v = -0.0f;
        if (c == 4) v = 0.0f;
      }
      s[r * std::size_t(std::max(max_n, 1)) + j] = v;
    }
  }
  DeviceBuffer<float> ds(s);
  DeviceBuffer<std::int32_t> dn(n), dk(k);
  DeviceBuffer<std::int32_t> dout(std::size_t(batch) * groups * max_k);
  if (use_ws) {
    const std::size_t wsb = pcu::topk_indices_workspace_bytes(batch * groups, std::max(max_n, 1));
    if (max_n >= 16384 && batch * groups <= 16) REQUIRE(wsb > 0);  // really takes the multi-block path
    DeviceBuffer<unsigned char> ws(std::max<std::size_t>(wsb, 1));  // poisoned: the path must not rely on contents
    pcu::topk_indices(make_contiguous<const float>(ds.ptr, batch, groups, std::max(max_n, 1)),
                      make_contiguous<const std::int32_t>(dn.ptr, batch, groups),
                      make_contiguous<const std::int32_t>(dk.ptr, batch, groups), forced,
                      make_contiguous(dout.ptr, batch, groups, max_k), wsb ? ws.ptr : nullptr, wsb, stream);
    PYRAMIDINFER_CUDA_CHECK(cudaStreamSynchronize(stream));
  } else {
    pcu::topk_indices(make_contiguous<const float>(ds.ptr, batch, groups, std::max(max_n, 1)),
                      make_contiguous<const std::int32_t>(dn.ptr, batch, groups),
                      make_contiguous<const std::int32_t>(dk.ptr, batch, groups), forced,
                      make_contiguous(dout.ptr, batch, groups, max_k), stream);
  }
  PYRAMIDINFER_CUDA_CHECK(cudaStreamSynchronize(stream));
  expect_topk_rows(dout.download(), s, n, k, std::max(max_n, 1), max_k, forced);
}

}  // namespace

TEST_CASE("topk_indices matches host::topk_indices on ragged rows", "[cuda][topk]") {
  test::Stream st;
  for (int rep = 0; rep < 6; ++rep) {
    const int groups = test::rand_int(1, 3), batch = test::rand_int(1, 6);
    const int max_n = rep < 3 ? test::rand_int(64, 4096) : test::rand_int(4097, 20000);
    std::vector<int> lens(std::size_t(batch * groups));
    for (auto& l : lens) {
      const int c = test::rand_int(0, 5);
      l = c == 0 ? 0 : c == 1 ? 1 : c == 2 ? max_n : test::rand_int(0, max_n);
    }
    const int forced = test::rand_int(0, 2) == 0 ? 0 : test::rand_int(0, 8);
    run_topk_case(lens, max_n, groups, forced, rep % 2 == 0, rep % 3 != 2, st.s);
  }
}

TEST_CASE("topk_indices: all ties, all NaN, k = n, 128K rows", "[cuda][topk][big]") {
  test::Stream st;
  // Heavy ties (few distinct values) and NaN everywhere.
  run_topk_case({300, 1, 0, 4096}, 4096, 1, 4, true, true, st.s);
  {
    const int n = 5000;
    std::vector<float> s(n, std::numeric_limits<float>::quiet_NaN());
    for (int j = 0; j < n; j += 7) s[std::size_t(j)] = 1.0f;
    DeviceBuffer<float> ds(s);
    const std::vector<std::int32_t> nv{n}, kv{2000};
    DeviceBuffer<std::int32_t> dn(nv);
    DeviceBuffer<std::int32_t> dk(kv);
    DeviceBuffer<std::int32_t> dout(2000);
    pcu::topk_indices(make_contiguous<const float>(ds.ptr, 1, 1, n), make_contiguous<const std::int32_t>(dn.ptr, 1, 1),
                       make_contiguous<const std::int32_t>(dk.ptr, 1, 1), 3, make_contiguous(dout.ptr, 1, 1, 2000),
                       st.s);
    st.sync();
    std::vector<std::int32_t> ref(2000);
    host::topk_indices(s.data(), n, 2000, 3, ref.data());
    REQUIRE(dout.download() == ref);
  }
  std::vector<int> big{131072, 131072 - test::rand_int(0, 1000)};
  run_topk_case(big, 131072, 1, 4, false, false, st.s);
  run_topk_case(big, 131072, 2, 0, true, true, st.s);
}

TEST_CASE("topk_indices multi-block path (workspace overload) matches the host on long rows",
          "[cuda][topk][multiblock]") {
  test::Stream st;
  for (int rep = 0; rep < 6; ++rep) {
    const int groups = test::rand_int(1, 3), batch = test::rand_int(1, 3);
    const int max_n = test::rand_int(16384, 40000);
    std::vector<int> lens(std::size_t(batch * groups));
    for (auto& l : lens) {
      const int c = test::rand_int(0, 6);
      l = c == 0 ? 0 : c == 1 ? 1 : c == 2 ? test::rand_int(2, 3000) : c == 3 ? max_n : test::rand_int(0, max_n);
    }
    const int forced = rep == 5 ? 5000 : (test::rand_int(0, 2) == 0 ? 0 : test::rand_int(0, 8));
    INFO("rep " << rep << " max_n " << max_n << " forced " << forced);
    run_topk_case(lens, max_n, groups, forced, rep % 2 == 0, rep % 3 != 2, st.s, true);
  }
  // Few distinct values (ties straddling the threshold), NaN/+-inf/+-0 mixed in.
  run_topk_case({40000, 39999, 17000, 0}, 40000, 2, 4, true, true, st.s, true);
  // Short rows in a long view: the multi-block path must still match.
  run_topk_case({100, 7, 1}, 20000, 1, 2, false, true, st.s, true);
  // Short views: the workspace overload falls back to one block per row (no scratch).
  REQUIRE(pcu::topk_indices_workspace_bytes(4, 4096) == 0);
  run_topk_case({4096, 300}, 4096, 1, 3, true, true, st.s, true);
}

namespace {

// Explicit rows (one per (b, g) with groups = 1) through the workspace overload;
// output beyond k must stay poisoned.
void run_topk_rows(const std::vector<std::vector<float>>& rows, const std::vector<int>& ks, int forced,
                   cudaStream_t stream) {
  const int R = int(rows.size());
  int max_n = 1, max_k = 1;
  for (const auto& r : rows) max_n = std::max(max_n, int(r.size()));
  for (int k : ks) max_k = std::max(max_k, k);
  std::vector<float> s(std::size_t(R) * max_n, std::numeric_limits<float>::quiet_NaN());
  std::vector<std::int32_t> n(static_cast<std::size_t>(R)), k(ks.begin(), ks.end());
  for (int r = 0; r < R; ++r) {
    n[std::size_t(r)] = int(rows[std::size_t(r)].size());
    std::copy(rows[std::size_t(r)].begin(), rows[std::size_t(r)].end(), s.begin() + std::ptrdiff_t(r) * max_n);
  }
  DeviceBuffer<float> ds(s);
  DeviceBuffer<std::int32_t> dn(n), dk(k), dout(std::size_t(R) * max_k);
  const std::size_t wsb = pcu::topk_indices_workspace_bytes(R, max_n);
  DeviceBuffer<unsigned char> ws(std::max<std::size_t>(wsb, 1));
  pcu::topk_indices(make_contiguous<const float>(ds.ptr, R, 1, max_n), make_contiguous<const std::int32_t>(dn.ptr, R, 1),
                    make_contiguous<const std::int32_t>(dk.ptr, R, 1), forced, make_contiguous(dout.ptr, R, 1, max_k),
                    wsb ? ws.ptr : nullptr, wsb, stream);
  PYRAMIDINFER_CUDA_CHECK(cudaStreamSynchronize(stream));
  expect_topk_rows(dout.download(), s, n, k, max_n, max_k, forced);
}

}  // namespace

TEST_CASE("topk_indices multi-block: many rows, adversarial keys", "[cuda][topk][multiblock]") {
  test::Stream st;
  // 17..48 rows of 16K..30K: multi-block now (one block per row before).
  {
    const int rows = test::rand_int(17, 48), max_n = test::rand_int(16384, 30000);
    REQUIRE(pcu::topk_indices_workspace_bytes(rows, max_n) > 0);
    std::vector<int> lens(static_cast<std::size_t>(rows));
    for (auto& l : lens) l = test::rand_int(0, 3) == 0 ? test::rand_int(0, max_n) : max_n;
    run_topk_case(lens, max_n, 1, 4, false, false, st.s, true);
    run_topk_case(lens, max_n, 1, 0, true, true, st.s, true);
  }
  const int n = 40000;
  std::vector<std::vector<float>> rows;
  std::vector<int> ks;
  // All equal: every pass lands in one bin, `need` = t.
  rows.emplace_back(std::size_t(n), 1.0f);
  ks.push_back(12345);
  // All NaN.
  rows.emplace_back(std::size_t(n), std::numeric_limits<float>::quiet_NaN());
  ks.push_back(777);
  // Keys that share their top 22 bits and differ only in the last 10 (pass 2
  // decides), with duplicates straddling the threshold.
  {
    std::vector<float> r(static_cast<std::size_t>(n));
    for (auto& x : r) {
      std::uint32_t u = 0x3f800000u + std::uint32_t(test::rand_int(0, 1023));
      std::memcpy(&x, &u, 4);
    }
    rows.push_back(r);
    ks.push_back(n / 2 + 3);
  }
  // Keys that differ only in the middle digit, plus +-0, +-inf.
  {
    std::vector<float> r(static_cast<std::size_t>(n));
    for (auto& x : r) {
      const int c = test::rand_int(0, 20);
      if (c == 0) x = 0.0f;
      else if (c == 1) x = -0.0f;
      else if (c == 2) x = -std::numeric_limits<float>::infinity();
      else if (c == 3) x = std::numeric_limits<float>::infinity();
      else {
        std::uint32_t u = 0xbf800000u + (std::uint32_t(test::rand_int(0, 2047)) << 10);
        std::memcpy(&x, &u, 4);
      }
    }
    rows.push_back(r);
    ks.push_back(test::rand_int(1, n - 1));
  }
  // k = 1, k = n - 1, k = n, tiny and empty rows in a long view.
  {
    std::vector<float> r(static_cast<std::size_t>(n));
    for (auto& x : r) x = test::rand_normal();
    rows.push_back(r);
    ks.push_back(1);
    rows.push_back(r);
    ks.push_back(n - 1);
    rows.push_back(r);
    ks.push_back(n);
    rows.emplace_back(std::vector<float>(5, 2.0f));
    ks.push_back(3);
    rows.emplace_back();
    ks.push_back(0);
  }
  run_topk_rows(rows, ks, 0, st.s);
  run_topk_rows(rows, ks, 3, st.s);
}

TEST_CASE("topk_indices multi-block path on 128K rows", "[cuda][topk][multiblock][big]") {
  test::Stream st;
  std::vector<int> big{131072, 131072 - test::rand_int(0, 1000)};
  run_topk_case(big, 131072, 1, 4, false, false, st.s, true);
  run_topk_case(big, 131072, 2, 0, true, true, st.s, true);
}

TEST_CASE("topk_indices multi-block: 1-3 blocks per row, digit boundaries, workspace reuse",
          "[cuda][topk][multiblock]") {
  test::Stream st;
  // Many rows: the grid is one wave of resident blocks, so each row gets only
  // 1-3 of them (on a 132-SM card); with one block per row of 30K-40K keys the
  // slice outgrows the block's shared-memory key cache (the rest is re-read).
  for (int rows : {test::rand_int(67, 132), test::rand_int(133, 256)}) {
    const int max_n = rows <= 132 ? test::rand_int(16384, 17000) : test::rand_int(30000, 40000);
    REQUIRE(pcu::topk_indices_workspace_bytes(rows, max_n) > 0);
    std::vector<int> lens(static_cast<std::size_t>(rows));
    for (auto& l : lens) l = test::rand_int(0, 4) == 0 ? test::rand_int(0, max_n) : max_n;
    run_topk_case(lens, max_n, 1, 4, rows % 2 == 0, true, st.s, true);
  }
  // Keys that differ only in bits 7..0 (the last digit decides) or only in
  // bits 19..8 (the middle one), with duplicates straddling the threshold.
  {
    const int n = 30000;
    std::vector<std::vector<float>> rows;
    std::vector<int> ks;
    for (int which = 0; which < 2; ++which) {
      std::vector<float> r(static_cast<std::size_t>(n));
      for (auto& x : r) {
        const std::uint32_t u = which == 0 ? 0x3f800000u + std::uint32_t(test::rand_int(0, 255))
                                           : 0x42000000u + (std::uint32_t(test::rand_int(0, 4095)) << 8);
        std::memcpy(&x, &u, 4);
      }
      rows.push_back(r);
      ks.push_back(test::rand_int(1, n - 1));
    }
    run_topk_rows(rows, ks, 2, st.s);
  }
  // One workspace, two calls in a row: the second must not see the first's state.
  {
    const int R = 3, len = 40000, max_k = len - 5;
    const std::size_t wsb = pcu::topk_indices_workspace_bytes(R, len);
    REQUIRE(wsb > 0);
    DeviceBuffer<unsigned char> ws(wsb);
    for (int call = 0; call < 2; ++call) {
      std::vector<float> s(std::size_t(R) * len);
      for (auto& v : s) v = test::rand_normal();
      const std::vector<std::int32_t> n(std::size_t(R), len), k{len / 2, 1 + call, max_k};
      DeviceBuffer<float> ds(s);
      DeviceBuffer<std::int32_t> dn(n), dk(k), dout(std::size_t(R) * max_k);
      pcu::topk_indices(make_contiguous<const float>(ds.ptr, R, 1, len),
                        make_contiguous<const std::int32_t>(dn.ptr, R, 1),
                        make_contiguous<const std::int32_t>(dk.ptr, R, 1), 4, make_contiguous(dout.ptr, R, 1, max_k),
                        ws.ptr, wsb, st.s);
      st.sync();
      expect_topk_rows(dout.download(), s, n, k, len, max_k, 4);
    }
  }
}

// An engine captures its decode step, eviction included, in a CUDA graph; at
// long contexts the eviction's top-k takes the cooperative multi-block path
// (a memset plus one cooperative launch). Captured once, replayed on new
// scores, lengths and k written into the same buffers.
TEST_CASE("topk_indices multi-block path replays from a CUDA graph", "[cuda][topk][multiblock][graph]") {
  test::Stream st;
  const int R = 3, len = 40000, max_k = len - 5;
  const std::size_t wsb = pcu::topk_indices_workspace_bytes(R, len);
  REQUIRE(wsb > 0);
  DeviceBuffer<unsigned char> ws(wsb);
  DeviceBuffer<float> ds(std::size_t(R) * len);
  DeviceBuffer<std::int32_t> dn{std::size_t(R)}, dk{std::size_t(R)}, dout{std::size_t(R) * max_k};
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  PYRAMIDINFER_CUDA_CHECK(cudaStreamBeginCapture(st.s, cudaStreamCaptureModeGlobal));
  pcu::topk_indices(make_contiguous<const float>(ds.ptr, R, 1, len), make_contiguous<const std::int32_t>(dn.ptr, R, 1),
                    make_contiguous<const std::int32_t>(dk.ptr, R, 1), 4, make_contiguous(dout.ptr, R, 1, max_k),
                    ws.ptr, wsb, st.s);
  PYRAMIDINFER_CUDA_CHECK(cudaStreamEndCapture(st.s, &graph));
  PYRAMIDINFER_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  for (int replay = 0; replay < 3; ++replay) {
    std::vector<float> s(std::size_t(R) * len);
    for (auto& v : s) v = replay == 1 ? std::round(test::rand_normal() * 4.f) / 4.f : test::rand_normal();
    const std::vector<std::int32_t> n{len, test::rand_int(16384, len), test::rand_int(0, len)};
    std::vector<std::int32_t> k(static_cast<std::size_t>(R));
    for (int r = 0; r < R; ++r) k[std::size_t(r)] = std::min(max_k, test::rand_int(0, n[std::size_t(r)]));
    ds.upload(s);
    dn.upload(n);
    dk.upload(k);
    dout.poison();
    PYRAMIDINFER_CUDA_CHECK(cudaGraphLaunch(exec, st.s));
    st.sync();
    INFO("replay " << replay);
    expect_topk_rows(dout.download(), s, n, k, len, max_k, 4);
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
}

TEST_CASE("topk_indices rejects bad arguments before launching", "[cuda][topk][args]") {
  DeviceBuffer<float> s(16);
  DeviceBuffer<std::int32_t> n(1), k(1), out(16);
  REQUIRE_THROWS_AS(pcu::topk_indices(make_contiguous<const float>(s.ptr, 1, 1, 16),
                                       make_contiguous<const std::int32_t>(n.ptr, 1, 1),
                                       make_contiguous<const std::int32_t>(k.ptr, 1, 1), -1,
                                       make_contiguous(out.ptr, 1, 1, 16), nullptr),
                    Error);
  REQUIRE_THROWS_WITH(pcu::topk_indices(make_contiguous<const float>(s.ptr, 1, 1, 16),
                                         make_contiguous<const std::int32_t>(nullptr, 1, 1),
                                         make_contiguous<const std::int32_t>(k.ptr, 1, 1), 0,
                                         make_contiguous(out.ptr, 1, 1, 16), nullptr),
                      Catch::Contains("'n'"));
}

// ----------------------------------------------------------- compaction ----

namespace {

std::vector<std::int32_t> random_kept(int n, int count) {
  std::vector<std::int32_t> all(static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i) all[std::size_t(i)] = i;
  std::shuffle(all.begin(), all.end(), test::rng());
  all.resize(std::size_t(count));
  std::sort(all.begin(), all.end());
  return all;
}

// How a compaction case picks each row's length n and kept list.
enum class Kept {
  random,       // random n, random count; sometimes identity with the tail moved
  half,         // n = cap, one of every pair of rows (the benchmark's lists)
  nearly_all,   // n = cap, all but 1-3 rows (first or last among the dropped ones)
  nearly_none,  // n = cap, 1-3 rows, the last row always among them
  ends,         // n = cap, the first and last rows plus a sparse random middle
  sinks_half,   // n = cap, a random kept prefix (rows that stay), then one of every pair
};

std::vector<std::int32_t> make_kept(Kept mode, int cap, int& n) {
  n = cap;
  std::vector<std::int32_t> kk;
  switch (mode) {
    case Kept::random: {
      n = test::rand_int(0, 4) == 0 ? cap : test::rand_int(0, cap);
      const int c = test::rand_int(0, 3) == 0 ? n : test::rand_int(0, n);
      if (test::rand_int(0, 4) == 0) {  // mostly identity with a tail moved
        for (int i = 0; i < c; ++i) kk.push_back(i);
        if (c > 0 && c < n) kk.back() = n - 1;
      } else {
        kk = random_kept(n, c);
      }
      break;
    }
    case Kept::half:
      for (int i = 0; 2 * i + 1 < cap; ++i) kk.push_back(2 * i + test::rand_int(0, 1));
      break;
    case Kept::nearly_all: {
      std::vector<int> drop = {test::rand_int(0, 1) ? 0 : cap - 1};
      for (int j = test::rand_int(0, 2); j > 0; --j) drop.push_back(test::rand_int(0, cap - 1));
      for (int i = 0; i < cap; ++i)
        if (std::find(drop.begin(), drop.end(), i) == drop.end()) kk.push_back(i);
      break;
    }
    case Kept::nearly_none: {
      kk = random_kept(cap - 1, std::min(cap - 1, test::rand_int(0, 2)));
      kk.push_back(cap - 1);
      break;
    }
    case Kept::ends: {
      kk = random_kept(cap, std::min(cap, 2 + cap / 50));
      kk.front() = 0;
      kk.back() = cap - 1;
      kk.erase(std::unique(kk.begin(), kk.end()), kk.end());
      break;
    }
    case Kept::sinks_half: {
      const int sinks = test::rand_int(0, cap / 2);
      for (int i = 0; i < sinks; ++i) kk.push_back(i);
      for (int i = 0; sinks + 2 * i + 1 < cap; ++i) kk.push_back(sinks + 2 * i + test::rand_int(0, 1));
      break;
    }
  }
  return kk;
}

template <class T>
void run_compact_case(int batch, int heads, int cap, int d, bool shared, bool nhd, cudaStream_t stream,
                      Kept mode = Kept::random) {
  const std::size_t elems = std::size_t(batch) * heads * cap * d;
  std::vector<T> k(elems), v(elems);
  for (auto& x : k) x = test::rand_value<T>();
  for (auto& x : v) x = test::rand_value<T>();
  const int ph = shared ? 1 : heads;
  std::vector<std::int32_t> pos(std::size_t(batch) * ph * cap);
  for (auto& p : pos) p = test::rand_int(0, 1 << 20);
  std::vector<std::int32_t> len(std::size_t(batch) * ph), cnt(std::size_t(batch) * ph);
  std::vector<std::int32_t> kept(std::size_t(batch) * ph * cap, -7);
  for (int r = 0; r < batch * ph; ++r) {
    int n = 0;
    const std::vector<std::int32_t> kk = make_kept(mode, cap, n);
    len[std::size_t(r)] = n;
    cnt[std::size_t(r)] = int(kk.size());
    std::copy(kk.begin(), kk.end(), kept.begin() + std::ptrdiff_t(r) * cap);
  }
  DeviceBuffer<T> dk(k), dv(v);
  DeviceBuffer<std::int32_t> dpos(pos), dlen(len), dcnt(cnt), dkept(kept);
  auto view = [&](T* p) { return nhd ? make_nhd(p, batch, cap, heads, d) : make_hnd(p, batch, heads, cap, d); };
  auto hk = view(k.data()), hv = view(v.data());
  TensorView<std::int32_t, 3> hpos = make_contiguous(pos.data(), batch, ph, cap);
  TensorView<std::int32_t, 2> hlen = make_contiguous(len.data(), batch, ph);
  auto kept_v = make_contiguous<const std::int32_t>(dkept.ptr, batch, ph, cap);
  auto cnt_v = make_contiguous<const std::int32_t>(dcnt.ptr, batch, ph);
  auto dpos_v = make_contiguous(dpos.ptr, batch, ph, cap);
  auto dlen_v = make_contiguous(dlen.ptr, batch, ph);
  if (shared) {
    kept_v.shape[1] = heads, kept_v.stride[1] = 0;
    cnt_v.shape[1] = heads, cnt_v.stride[1] = 0;
    dpos_v.shape[1] = heads, dpos_v.stride[1] = 0;
    dlen_v.shape[1] = heads, dlen_v.stride[1] = 0;
  }
  const std::size_t ws_bytes = pcu::compact_kv_inplace_workspace_bytes<T>(batch, heads, cap, d);
  DeviceBuffer<unsigned char> ws(ws_bytes);
  pcu::compact_kv_inplace<T>(view(dk.ptr), view(dv.ptr), dpos_v, dlen_v, kept_v, cnt_v, ws.ptr, ws_bytes, stream);
  PYRAMIDINFER_CUDA_CHECK(cudaStreamSynchronize(stream));
  for (int b = 0; b < batch; ++b)
    for (int h = 0; h < heads; ++h) {
      const int r = b * ph + (shared ? 0 : h);
      const std::int32_t* kk = kept.data() + std::size_t(r) * cap;
      host::compact_rows(hk, b, h, kk, cnt[std::size_t(r)], len[std::size_t(r)]);
      host::compact_rows(hv, b, h, kk, cnt[std::size_t(r)], len[std::size_t(r)]);
      if (!shared || h == 0) host::compact_positions(hpos, b, shared ? 0 : h, kk, cnt[std::size_t(r)]);
    }
  for (int r = 0; r < batch * ph; ++r) hlen.data[r] = cnt[std::size_t(r)];
  const auto gk = dk.download(), gv = dv.download();
  INFO("compact case: batch " << batch << " heads " << heads << " cap " << cap << " d " << d << " shared " << shared
                              << " nhd " << nhd << " kept mode " << int(mode) << " dtype bytes " << sizeof(T));
  REQUIRE(std::memcmp(gk.data(), k.data(), elems * sizeof(T)) == 0);
  REQUIRE(std::memcmp(gv.data(), v.data(), elems * sizeof(T)) == 0);
  REQUIRE(dpos.download() == pos);
  REQUIRE(dlen.download() == len);
}

}  // namespace

TEMPLATE_TEST_CASE("compact_kv_inplace matches host::compact_rows", "[cuda][compact]", half_t, bfloat16_t, float) {
  test::Stream st;
  for (int rep = 0; rep < 4; ++rep) {
    const int d = rep == 3 ? 24 : (rep % 2 ? 64 : 128);
    run_compact_case<TestType>(test::rand_int(1, 3), test::rand_int(1, 4), test::rand_int(1, 3000), d, rep % 2 == 0,
                               rep == 2, st.s);
  }
  run_compact_case<TestType>(1, 2, 1, 128, false, false, st.s);
  run_compact_case<TestType>(2, 1, 20000, 128, true, false, st.s);
  // Many tiles per (b, h), per-head lists.
  run_compact_case<TestType>(1, 3, 30000, 64, false, false, st.s);
  // More (b, h) than resident blocks: the register-staged kernel.
  run_compact_case<TestType>(2, 300, 100, 64, false, false, st.s);
  run_compact_case<TestType>(4, 150, 80, 128, true, false, st.s);
  // Rows that are not a multiple of 16 bytes (element-wise path for 2-byte types).
  run_compact_case<TestType>(2, 2, 1500, 20, false, test::rand_int(0, 1) == 1, st.s);
  // Rows of more than 1024 16-byte vectors: a row spans several tiles.
  run_compact_case<TestType>(1, 2, 40, (16384 + 256) / int(sizeof(TestType)), false, false, st.s);
  // A kept prefix (rows that stay in place) before moved rows, over many tiles.
  run_compact_case<TestType>(1, 2, 20000, 128, test::rand_int(0, 1) == 1, false, st.s, Kept::sinks_half);
}

TEMPLATE_TEST_CASE("compact_kv_inplace: few (b, h) with many tiles, extreme kept lists", "[cuda][compact]", half_t,
                   bfloat16_t, float) {
  // One or two (b, h) over thousands of tiles: many tiles of one (b, h) run at
  // once and wait on each other's "read done". Every list shape, both layouts,
  // head dims 64/128 and an unaligned row (element-wise tiles).
  test::Stream st;
  const Kept modes[] = {Kept::half, Kept::nearly_all, Kept::nearly_none, Kept::ends, Kept::random};
  for (const Kept mode : modes) {
    for (const int d : {128, 64, 20}) {
      const bool nhd = test::rand_int(0, 1) == 1;
      run_compact_case<TestType>(1, 1, 65536 + test::rand_int(0, 100), d, false, nhd, st.s, mode);
      run_compact_case<TestType>(1, 2, 20000, d, true, nhd, st.s, mode);
    }
    // Tiny capacities: first and last rows in one tile.
    run_compact_case<TestType>(2, 3, test::rand_int(1, 5), 128, false, false, st.s, mode);
    // Many (b, h), few tiles each.
    run_compact_case<TestType>(4, 150, 300, 128, false, false, st.s, mode);
  }
  // Rows spanning several tiles (a tile boundary inside a row).
  run_compact_case<TestType>(1, 1, 3000, 1000, false, false, st.s, Kept::half);
  run_compact_case<TestType>(1, 1, 3000, 1000, false, false, st.s, Kept::nearly_all);
}

TEMPLATE_TEST_CASE("gather_kv_rows and gather_rows match the host gather", "[cuda][compact]", half_t, bfloat16_t,
                   float) {
  test::Stream st;
  const int batch = test::rand_int(1, 3), heads = test::rand_int(1, 4), n = test::rand_int(1, 2000);
  const int d = test::rand_int(0, 1) ? 128 : 40;
  std::vector<TestType> src(std::size_t(batch) * heads * n * d);
  for (auto& x : src) x = test::rand_value<TestType>();
  std::vector<std::int32_t> cnt(std::size_t(batch) * heads), kept(std::size_t(batch) * heads * n);
  for (int r = 0; r < batch * heads; ++r) {
    cnt[std::size_t(r)] = test::rand_int(0, n);
    const auto kk = random_kept(n, cnt[std::size_t(r)]);
    std::copy(kk.begin(), kk.end(), kept.begin() + std::ptrdiff_t(r) * n);
  }
  DeviceBuffer<TestType> dsrc(src), ddst(src.size());
  DeviceBuffer<std::int32_t> dkept(kept), dcnt(cnt);
  const bool nhd = test::rand_int(0, 1) == 1;
  auto view = [&](TestType* p) { return nhd ? make_nhd(p, batch, n, heads, d) : make_hnd(p, batch, heads, n, d); };
  pcu::gather_kv_rows<TestType>(view(dsrc.ptr), make_contiguous<const std::int32_t>(dkept.ptr, batch, heads, n),
                                 make_contiguous<const std::int32_t>(dcnt.ptr, batch, heads), view(ddst.ptr), st.s);
  st.sync();
  // got(b, h, i) == source(b, h, kept(b, h, i)) for i < count, poison after.
  const auto expect_gathered = [&](std::vector<TestType>& source, const std::vector<TestType>& got) {
    auto hs = view(source.data());
    auto hg = view(const_cast<TestType*>(got.data()));
    for (int b = 0; b < batch; ++b)
      for (int h = 0; h < heads; ++h) {
        const int r = b * heads + h;
        for (int i = 0; i < n; ++i)
          for (int e = 0; e < d; ++e) {
            if (i < cnt[std::size_t(r)]) {
              REQUIRE(std::memcmp(&hg(b, h, i, e), &hs(b, h, kept[std::size_t(r) * n + i], e), sizeof(TestType)) == 0);
            } else {
              REQUIRE(test::is_poison(hg(b, h, i, e)));
            }
          }
      }
  };
  const auto got = ddst.download();
  expect_gathered(src, got);
  {
    // Fused K/V overload (one launch) on the same lists: K = src, V = src
    // shifted by one element; both must equal the host gather.
    std::vector<TestType> src_v(src.size());
    for (std::size_t i = 0; i < src.size(); ++i) src_v[i] = src[(i + 1) % src.size()];
    DeviceBuffer<TestType> dsrc_v(src_v), dk2(src.size()), dv2(src.size());
    pcu::gather_kv_rows<TestType>(view(dsrc.ptr), view(dsrc_v.ptr),
                                  make_contiguous<const std::int32_t>(dkept.ptr, batch, heads, n),
                                  make_contiguous<const std::int32_t>(dcnt.ptr, batch, heads), view(dk2.ptr),
                                  view(dv2.ptr), st.s);
    st.sync();
    const auto gk = dk2.download(), gv = dv2.download();
    REQUIRE(std::memcmp(gk.data(), got.data(), got.size() * sizeof(TestType)) == 0);
    expect_gathered(src_v, gv);
  }
  // Hidden states [tokens, hidden].
  const int tokens = test::rand_int(1, 3000), hidden = test::rand_int(0, 1) ? 512 : 77;
  std::vector<TestType> hsrc(std::size_t(tokens) * hidden);
  for (auto& x : hsrc) x = test::rand_value<TestType>();
  const int count = test::rand_int(0, tokens);
  const auto idx = random_kept(tokens, count);
  DeviceBuffer<TestType> dh(hsrc), dd(std::size_t(count + 3) * hidden);
  DeviceBuffer<std::int32_t> didx(std::max<std::size_t>(1, idx.size()));
  if (count) didx.upload(idx);
  pcu::gather_rows<TestType>(make_contiguous<const TestType>(dh.ptr, tokens, hidden), didx.ptr, count,
                              make_contiguous(dd.ptr, count + 3, hidden), st.s);
  st.sync();
  std::vector<TestType> ref(std::size_t(count + 3) * hidden);
  std::memset(ref.data(), 0xFF, ref.size() * sizeof(TestType));
  host::gather_rows<TestType>(make_contiguous<const TestType>(hsrc.data(), tokens, hidden), idx.data(), count,
                              make_contiguous(ref.data(), count + 3, hidden));
  const auto gd = dd.download();
  REQUIRE(std::memcmp(gd.data(), ref.data(), ref.size() * sizeof(TestType)) == 0);
  REQUIRE_THROWS_AS(pcu::gather_rows<TestType>(make_contiguous<const TestType>(dh.ptr, tokens, hidden), didx.ptr,
                                                tokens + 1, make_contiguous(dd.ptr, count + 3, hidden), st.s),
                    Error);
}

// -------------------------------------------------------------- scoring ----

namespace {

template <class T>
struct ScoreCase {
  int batch, kvh, group, d, cap, slots;
  bool nhd, with_lse;
  Granularity g;
  std::vector<T> keys, q;
  std::vector<float> lse;
  std::vector<std::int32_t> len, ring, win, begin, count;
  ScoreProblem<T> host_problem() {
    ScoreProblem<T> p;
    p.keys = nhd ? make_nhd<const T>(keys.data(), batch, slots, kvh, d) : make_hnd<const T>(keys.data(), batch, kvh, slots, d);
    p.kv_len = make_contiguous<const std::int32_t>(len.data(), batch, kvh);
    p.queries = make_contiguous<const T>(q.data(), batch, kvh * group, cap, d);
    p.lse = with_lse ? make_contiguous<const float>(lse.data(), batch, kvh * group, cap) : TensorView<const float, 3>{};
    p.ring_start = ring.data();
    p.window_len = win.data();
    p.score_begin = make_contiguous<const std::int32_t>(begin.data(), batch, kvh);
    p.score_count = make_contiguous<const std::int32_t>(count.data(), batch, kvh);
    p.scale = 1.0f / std::sqrt(float(d));
    return p;
  }
};

/// A case of the given shape; full: every head holds all `slots` keys, the
/// window fills the ring and every slot before it is scored (the benchmark's
/// prefill shape), else lengths, windows and ranges are random (ragged).
template <class T>
ScoreCase<T> make_score_case(int d, Granularity g, bool nhd, bool with_lse, int batch, int kvh, int group, int slots,
                             int cap, bool full = false) {
  ScoreCase<T> c;
  c.batch = batch;
  c.kvh = kvh;
  c.group = group;
  c.d = d;
  c.g = g;
  c.nhd = nhd;
  c.with_lse = with_lse;
  c.slots = slots;
  c.cap = cap;
  c.keys.resize(std::size_t(c.batch) * c.kvh * c.slots * d);
  for (auto& x : c.keys) x = pyramidinfer::from_float<T>(test::rand_normal() * 1.5f);
  c.q.resize(std::size_t(c.batch) * c.kvh * c.group * c.cap * d);
  for (auto& x : c.q) x = pyramidinfer::from_float<T>(test::rand_normal() * 1.5f);
  for (int b = 0; b < c.batch; ++b) {
    const int w = full ? c.cap : test::rand_int(1, c.cap);
    c.win.push_back(w);
    c.ring.push_back(test::rand_int(0, c.cap - 1));
    const int nshared = full ? c.slots : test::rand_int(w, c.slots);
    for (int h = 0; h < c.kvh; ++h) {
      const int n = g == Granularity::shared || full ? nshared : test::rand_int(w, c.slots);
      c.len.push_back(n);
      const int room = n - w;
      const int cnt = full ? room
                      : g == Granularity::shared && h > 0 ? c.count[std::size_t(b * c.kvh)]
                                                          : test::rand_int(0, room);
      const int beg = full ? 0
                      : g == Granularity::shared && h > 0 ? c.begin[std::size_t(b * c.kvh)]
                                                          : test::rand_int(0, room - cnt);
      c.begin.push_back(beg);
      c.count.push_back(cnt);
    }
  }
  if (with_lse) {
    // Stale statistics: the exact LSE shifted a little (what decode keeps).
    c.lse.assign(std::size_t(c.batch) * c.kvh * c.group * c.cap, 0.f);
    auto p = c.host_problem();
    p.lse = {};
    auto lv = make_contiguous(c.lse.data(), c.batch, c.kvh * c.group, c.cap);
    for (int b = 0; b < c.batch; ++b) host::window_query_lse(p, b, 0, lv);
    for (auto& x : c.lse) x += 0.1f * test::rand_normal();
  }
  return c;
}

/// A case of random shape: up to 3 sequences, 3 KV heads, groups of 4.
template <class T>
ScoreCase<T> make_score_case(int d, Granularity g, bool nhd, bool with_lse, int max_slots) {
  const int batch = test::rand_int(1, 3), kvh = test::rand_int(1, 3), group = test::rand_int(1, 4);
  const int slots = test::rand_int(8, max_slots);
  return make_score_case<T>(d, g, nhd, with_lse, batch, kvh, group, slots, test::rand_int(1, std::min(300, slots)));
}

template <class T>
void run_score_case(ScoreCase<T>& c, cudaStream_t stream, bool split_ws = false) {
  DeviceBuffer<T> dk(c.keys), dq(c.q);
  DeviceBuffer<float> dl(std::max<std::size_t>(1, c.lse.size()));
  if (c.with_lse) dl.upload(c.lse);
  DeviceBuffer<std::int32_t> dlen(c.len), dring(c.ring), dwin(c.win), dbeg(c.begin), dcnt(c.count);
  auto hp = c.host_problem();
  ScoreProblem<T> p = hp;
  p.keys.data = dk.ptr;
  p.queries.data = dq.ptr;
  if (c.with_lse) p.lse.data = dl.ptr;
  p.kv_len.data = dlen.ptr;
  p.ring_start = dring.ptr;
  p.window_len = dwin.ptr;
  p.score_begin.data = dbeg.ptr;
  p.score_count.data = dcnt.ptr;
  const int groups = c.g == Granularity::shared ? 1 : c.kvh;
  const int out_len = c.slots + 2;
  DeviceBuffer<float> dout(std::size_t(c.batch) * groups * out_len);
  const float dw = float(test::rand_int(1, 8));
  // split_ws: the granularity-aware size (shared granularity then runs every
  // KV head in its own blocks and reduces the per-head partials).
  const std::size_t wsb =
      split_ws ? pcu::window_attention_scores_workspace_bytes(p, c.g) : pcu::window_attention_scores_workspace_bytes(p);
  DeviceBuffer<unsigned char> ws(std::max<std::size_t>(wsb, 1));
  pcu::window_attention_scores<T>(p, c.g, dw, make_contiguous(dout.ptr, c.batch, groups, out_len), ws.ptr, wsb, stream);
  PYRAMIDINFER_CUDA_CHECK(cudaStreamSynchronize(stream));
  std::vector<float> ref(std::size_t(c.batch) * groups * out_len, std::numeric_limits<float>::quiet_NaN());
  host::window_attention_scores(hp, c.g, dw, make_contiguous(ref.data(), c.batch, groups, out_len));
  test::expect_scores_match(dout.download(), ref, c.count, c.batch, c.kvh, groups, out_len);
}

}  // namespace

TEMPLATE_TEST_CASE("window_attention_scores matches the host reference", "[cuda][scoring]", half_t, bfloat16_t, float) {
  test::Stream st;
  for (int d : {64, 128, 40}) {
    for (Granularity g : {Granularity::shared, Granularity::per_kv_head}) {
      for (int variant = 0; variant < 2; ++variant) {
        auto c = make_score_case<TestType>(d, g, variant == 1, test::rand_int(0, 1) == 1, d == 40 ? 300 : 700);
        const bool split = test::rand_int(0, 1) == 1;
        INFO("d " << d << " g " << granularity_name(g) << " nhd " << c.nhd << " lse " << c.with_lse << " B " << c.batch
                  << " kvh " << c.kvh << " group " << c.group << " slots " << c.slots << " cap " << c.cap
                  << " split_ws " << split);
        run_score_case(c, st.s, split);
      }
    }
  }
}

// Short caches (keys.shape[2] <= kFusedMaxSlots) take the fused kernel (one
// cluster per sequence and KV head, keys in shared memory); longer ones the
// two-pass kernels. Shapes on both sides of the threshold, the benchmark's
// prefill shape, GQA groups whose rows span several warps, ragged lengths.
TEMPLATE_TEST_CASE("window_attention_scores: fused short-cache path and its threshold", "[cuda][scoring]", half_t,
                   bfloat16_t) {
  test::Stream st;
  const int limit = pcu::detail::kFusedMaxSlots;
  struct Shape {
    int slots, cap, group;
    bool full;
  };
  const Shape shapes[] = {{512, 103, 1, true},      {limit, 205, 1, true},  {limit, 205, 4, false},
                          {limit - 1, 64, 2, true}, {limit + 1, 205, 1, true}, {test::rand_int(8, 200), 0, 3, false}};
  for (const Shape& s : shapes)
    for (int d : {128, 64})
      for (int with_lse = 0; with_lse < 2; ++with_lse) {
        const Granularity g = test::rand_int(0, 1) ? Granularity::shared : Granularity::per_kv_head;
        const int cap = s.cap ? s.cap : test::rand_int(1, s.slots);
        auto c = make_score_case<TestType>(d, g, test::rand_int(0, 1) == 1, with_lse == 1, test::rand_int(1, 2),
                                           test::rand_int(1, 3), s.group, s.slots, cap, s.full);
        const bool split = g == Granularity::per_kv_head || test::rand_int(0, 3) > 0;
        INFO("d " << d << " g " << granularity_name(g) << " nhd " << c.nhd << " lse " << c.with_lse << " B "
                  << c.batch << " kvh " << c.kvh << " group " << c.group << " slots " << c.slots << " cap " << c.cap
                  << " full " << s.full << " split_ws " << split);
        run_score_case(c, st.s, split);
      }
}

// Long windows over few key blocks: score_mma_kernel splits each head's
// query tiles over a cluster of CTAs (sm_90) and adds their per-key sums in
// the cluster. GQA groups (rows of one position span heads), a group of 3
// (tiles cross positions unevenly), ragged windows that leave some CTAs of a
// cluster without tiles, both granularities and workspace modes.
TEMPLATE_TEST_CASE("window_attention_scores: long windows split over a cluster", "[cuda][scoring]", half_t,
                   bfloat16_t) {
  test::Stream st;
  struct Shape {
    int d, group, slots, cap;
    bool full, with_lse;
    Granularity g;
  };
  const Shape shapes[] = {{128, 4, 1536, 384, true, true, Granularity::shared},
                          {64, 4, 1536, 384, false, false, Granularity::per_kv_head},
                          {128, 3, 1400, 512, false, true, Granularity::per_kv_head},
                          {64, 1, 3000, 900, true, false, Granularity::shared}};
  for (const Shape& s : shapes) {
    auto c = make_score_case<TestType>(s.d, s.g, test::rand_int(0, 1) == 1, s.with_lse, test::rand_int(1, 2), 2,
                                       s.group, s.slots, s.cap, s.full);
    const bool split = test::rand_int(0, 1) == 1;
    INFO("d " << s.d << " g " << granularity_name(s.g) << " nhd " << c.nhd << " lse " << c.with_lse << " B "
              << c.batch << " group " << s.group << " slots " << s.slots << " cap " << s.cap << " full " << s.full
              << " split_ws " << split);
    run_score_case(c, st.s, split);
  }
}

TEMPLATE_TEST_CASE("window_query_lse matches host::window_query_lse", "[cuda][scoring]", half_t, bfloat16_t, float) {
  test::Stream st;
  for (int d : {128, 64, 24}) {
    auto c = make_score_case<TestType>(d, Granularity::per_kv_head, d == 64, false, 900);
    auto hp = c.host_problem();
    DeviceBuffer<TestType> dk(c.keys), dq(c.q);
    DeviceBuffer<std::int32_t> dlen(c.len), dring(c.ring), dwin(c.win), dbeg(c.begin), dcnt(c.count);
    ScoreProblem<TestType> p = hp;
    p.keys.data = dk.ptr, p.queries.data = dq.ptr, p.kv_len.data = dlen.ptr, p.ring_start = dring.ptr;
    p.window_len = dwin.ptr, p.score_begin.data = dbeg.ptr, p.score_count.data = dcnt.ptr;
    const int hq = c.kvh * c.group;
    DeviceBuffer<float> dl(std::size_t(c.batch) * hq * c.cap);
    const int row_begin = test::rand_int(0, 2);
    pcu::window_query_lse<TestType>(p, row_begin, make_contiguous(dl.ptr, c.batch, hq, c.cap), st.s);
    st.sync();
    std::vector<float> ref(dl.n);
    std::memset(ref.data(), 0xFF, ref.size() * 4);
    for (int b = 0; b < c.batch; ++b)
      if (row_begin < c.win[std::size_t(b)])
        host::window_query_lse(hp, b, row_begin, make_contiguous(ref.data(), c.batch, hq, c.cap));
    const auto got = dl.download();
    for (std::size_t i = 0; i < ref.size(); ++i) {
      if (test::is_poison(ref[i])) {
        REQUIRE(test::is_poison(got[i]));
      } else {
        INFO("i " << i << " got " << got[i] << " ref " << ref[i]);
        REQUIRE(std::fabs(got[i] - ref[i]) <= 1e-3f * std::max(1.0f, std::fabs(ref[i])));
      }
    }
  }
}

TEST_CASE("attention_weight_scores matches the host reference", "[cuda][scoring]") {
  test::Stream st;
  for (Granularity g : {Granularity::shared, Granularity::per_kv_head}) {
    const int batch = test::rand_int(1, 3), kvh = test::rand_int(1, 3), heads = kvh * test::rand_int(1, 3);
    const int rows = test::rand_int(1, 60), n = test::rand_int(rows, 500);
    std::vector<float> attn(std::size_t(batch) * heads * rows * n);
    for (auto& x : attn) x = std::fabs(test::rand_normal());
    std::vector<std::int32_t> win, beg, cnt;
    for (int b = 0; b < batch; ++b) {
      win.push_back(test::rand_int(1, rows));
      cnt.push_back(test::rand_int(0, n));
      beg.push_back(test::rand_int(0, n - cnt.back()));
    }
    const int groups = g == Granularity::shared ? 1 : kvh;
    DeviceBuffer<float> da(attn), dout(std::size_t(batch) * groups * n);
    DeviceBuffer<std::int32_t> dw(win), db(beg), dc(cnt);
    pcu::attention_weight_scores(make_contiguous<const float>(da.ptr, batch, heads, rows, n), dw.ptr, db.ptr, dc.ptr,
                                  kvh, g, 3.0f, make_contiguous(dout.ptr, batch, groups, n), st.s);
    st.sync();
    std::vector<float> ref(dout.n);
    host::attention_weight_scores(make_contiguous<const float>(attn.data(), batch, heads, rows, n), win.data(),
                                  beg.data(), cnt.data(), kvh, g, 3.0f, make_contiguous(ref.data(), batch, groups, n));
    const auto got = dout.download();
    for (int b = 0; b < batch; ++b)
      for (int gi = 0; gi < groups; ++gi)
        for (int j = 0; j < n; ++j) {
          const std::size_t i = (std::size_t(b) * groups + gi) * n + j;
          if (j < cnt[std::size_t(b)]) REQUIRE(std::fabs(got[i] - ref[i]) <= 1e-5f * std::max(1.0f, std::fabs(ref[i])));
          else REQUIRE(test::is_poison(got[i]));
        }
  }
}

TEST_CASE("scoring rejects bad arguments before launching", "[cuda][scoring][args]") {
  ScoreProblem<half_t> p;
  DeviceBuffer<float> out(4);
  REQUIRE_THROWS_AS(pcu::window_attention_scores(p, Granularity::shared, 1.f, make_contiguous(out.ptr, 1, 1, 4),
                                                  nullptr, 0, nullptr),
                    Error);
}
