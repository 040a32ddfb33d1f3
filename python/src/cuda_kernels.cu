// pyramidinfer._cuda, part 1: the array kernels over CUDA arrays (issue 13).
//
//   window_attention_scores  (cuda::window_attention_scores)
//   topk_indices             (cuda::topk_indices, workspace overload)
//   compact_rows             (cuda::compact_kv_inplace)
//   gather_rows              (cuda::gather_rows)
//
// Same semantics as _core's functions of the same names, over DLPack CUDA
// arrays (torch, cupy, jax) used in place with their strides. Every function
// here only enqueues work on `stream` (an int handle, 0 = the legacy default
// stream): it allocates nothing and never synchronises, so outputs and
// scratch are the caller's (pyramidinfer.cuda_kernels allocates them with
// torch when not given). Each call that needs scratch has a *_workspace_bytes
// query taking the same arguments minus out / workspace / stream; the query
// checks the arguments as the call does.
//
// Why a workspace even where the library asks for none: the CUDA kernels read
// the per-sequence values of a problem (lengths, window sizes, ring starts,
// keep counts) from device memory, where the host kernels read them from host
// memory. The binding keeps those few int32 at the start of the caller's
// workspace (a header of 256 bytes, more for window scoring with large
// batches), written there by a one-block kernel on `stream` before the
// library's launches; the library's own scratch follows the header. So every
// *_workspace_bytes answer is > 0.
#include <cuda_runtime.h>
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <string>

#include "cuda_common.cuh"
#include "score_args.hpp"

namespace pyramidinfer::python {
namespace {

namespace pcu = pyramidinfer::cuda;
using namespace nb::literals;

// ---------------------------------------------------------------------------
// Device helpers of the binding.

/// The header's ints: p[0..4) = head, then `tail` copies of tail_a, then
/// `tail` copies of tail_b.
__global__ void fill_ints_kernel(std::int32_t* p, int4 head, int tail, int tail_a, int tail_b) {
  const int i = int(blockIdx.x) * int(blockDim.x) + int(threadIdx.x);
  if (i < 4) p[i] = i == 0 ? head.x : i == 1 ? head.y : i == 2 ? head.z : head.w;
  else if (i < 4 + tail) p[i] = tail_a;
  else if (i < 4 + 2 * tail) p[i] = tail_b;
}

void fill_ints(std::int32_t* p, int4 head, int tail, int tail_a, int tail_b, cudaStream_t stream) {
  const int total = 4 + 2 * tail;
  fill_ints_kernel<<<unsigned((total + 255) / 256), 256, 0, stream>>>(p, head, tail, tail_a, tail_b);
  PYRAMIDINFER_CUDA_CHECK_LAUNCH("pyramidinfer::python::fill_ints_kernel");
}

/// compact_rows' device check of kept (m entries, `stride` elements apart):
/// strictly ascending and inside [0, n). Writes status[0] = 0 and status[1]
/// = m when it is, else status[0] = 1 and status[1] = 0, so that the
/// compaction that reads status[1] as its count moves nothing. One block.
constexpr int kCheckThreads = 1024;
__global__ void __launch_bounds__(kCheckThreads)
    check_kept_kernel(const std::int32_t* kept, std::int64_t stride, int m, int n, std::int32_t* status) {
  int bad = 0;
  for (int i = int(threadIdx.x); i < m; i += kCheckThreads) {
    const int v = kept[std::int64_t(i) * stride];
    const int prev = i > 0 ? kept[std::int64_t(i - 1) * stride] : -1;
    bad |= (v <= prev || v >= n) ? 1 : 0;
  }
  bad = __syncthreads_or(bad);
  if (threadIdx.x == 0) {
    status[0] = bad ? 1 : 0;
    status[1] = bad ? 0 : m;
  }
}

// ---------------------------------------------------------------------------
// Arguments.

enum class Elem { f32, f16, bf16 };

template <class A>
Elem elem_of(const A& a, const char* fn, const char* name) {
  const nb::dlpack::dtype dt = a.dtype();
  if (dt == dtype_of<float>()) return Elem::f32;
  if (dt == dtype_of<half_t>()) return Elem::f16;
  if (dt == dtype_of<bfloat16_t>()) return Elem::bf16;
  fail(fn, name, "array of dtype " + dtype_name(dt), "must have dtype float32, float16 or bfloat16");
}

/// f(T{}) with T the element type of e.
template <class F>
decltype(auto) with_elem(Elem e, F&& f) {
  switch (e) {
    case Elem::f16: return f(half_t{});
    case Elem::bf16: return f(bfloat16_t{});
    default: return f(float{});
  }
}

/// An array the call writes: nb::ndarray<> rejects read-only ones.
nb::ndarray<> writable(nb::handle h, const char* fn, const char* name) {
  nb::ndarray<> a;
  if (nb::try_cast(h, a, false)) return a;
  Array ro;
  if (nb::try_cast(h, ro, false)) fail(fn, name, "a read-only array", "must be writable (the call writes it)");
  fail(fn, name, std::string("a ") + nb::inst_name(h).c_str() + " object",
       "must be a CUDA array (DLPack; a torch tensor that requires grad must be detached)");
}

/// Outputs are written once per element: no axis may be broadcast.
template <class A>
void check_writes_once(const A& a, const char* fn, const char* name) {
  for (std::size_t i = 0; i < a.ndim(); ++i)
    if (a.shape(i) > 1 && a.stride(i) == 0)
      fail(fn, name,
           "array with stride[" + std::to_string(i) + "] = 0 over shape[" + std::to_string(i) +
               "] = " + std::to_string(a.shape(i)),
           "must not broadcast an axis it is written along");
}

template <class A>
void check_shape(const A& a, std::initializer_list<std::int64_t> want, const char* fn, const char* name) {
  bool ok = a.ndim() == want.size();
  std::string s = "(";
  std::size_t i = 0;
  for (std::int64_t w : want) {
    s += (i ? ", " : "") + std::to_string(w);
    ok = ok && std::int64_t(a.shape(i)) == w;  // ok: i < ndim
    ++i;
  }
  s += want.size() == 1 ? ",)" : ")";
  if (!ok) fail(fn, name, "array of shape " + shape_str(a), "must have shape " + s);
}

/// The caller's scratch: a 1-D, contiguous uint8 CUDA array on `device`.
struct Scratch {
  unsigned char* data = nullptr;
  std::size_t bytes = 0;
};

Scratch scratch(nb::handle h, const char* fn, int device, std::size_t need, const char* query) {
  const std::string what = "must be a contiguous 1-D uint8 array on CUDA device " + std::to_string(device) +
                           " of at least " + std::to_string(need) + " bytes (" + query + ")";
  if (h.is_none()) {
    if (need == 0) return {};
    fail(fn, "workspace", "None", what);
  }
  const nb::ndarray<> a = writable(h, fn, "workspace");
  if (a.device_type() != nb::device::cuda::value || a.device_id() != device)
    fail(fn, "workspace", describe_device(a.device_type(), a.device_id()), what);
  if (a.dtype() != nb::dtype<std::uint8_t>())
    fail(fn, "workspace", "array of dtype " + dtype_name(a.dtype()), what);
  if (a.ndim() != 1 || (a.shape(0) > 1 && a.stride(0) != 1))
    fail(fn, "workspace", "array of shape " + shape_str(a) + (a.ndim() == 1 ? " and stride " + std::to_string(a.stride(0)) : ""),
         what);
  Scratch s{static_cast<unsigned char*>(a.data()), a.shape(0)};
  if (s.bytes < need) fail(fn, "workspace", "array of " + std::to_string(s.bytes) + " bytes", what);
  if (s.bytes > 0 && reinterpret_cast<std::uintptr_t>(s.data) % 16 != 0)
    fail(fn, "workspace", "array at an address that is not a multiple of 16", "must be 16-byte aligned");
  return s;
}

/// Bytes of the binding's int header (see the file comment) for `ints` ints.
constexpr std::size_t header_bytes(std::size_t ints) { return align_up(sizeof(std::int32_t) * ints); }

// ---------------------------------------------------------------------------
// window_attention_scores

template <class T>
struct ScoreCall {
  ScoreProblem<T> p;
  Granularity g = Granularity::shared;
  bool batched = true;
  std::int64_t batch = 0, n = 0, w = 0, ctx = 0, groups = 1;
  std::size_t header = 0, library = 0;  // workspace bytes: the ints, then the library's scratch
};

/// The checks of _core's window_attention_scores (same messages), on `device`.
template <class T>
ScoreCall<T> score_call(const Array& keys, const Array& queries, const OptArray& lse, float scale,
                        float distance_weight, const std::string& granularity, int device) {
  const char* fn = "window_attention_scores";
  ScoreCall<T> c;
  c.g = parse_granularity(granularity, fn);
  c.batched = keys.ndim() == 4;
  ScoreProblem<T>& p = c.p;
  p = score_views<T>(keys, queries, lse, scale, Place{device});
  const std::int64_t B = p.keys.shape[0], n = p.keys.shape[2], w = p.queries.shape[2];
  // The CUDA grids put the batch and the heads on grid axes y and z.
  if (B > 65535 || p.keys.shape[1] > 65535 || p.queries.shape[1] > 65535)
    fail(fn, "queries", "array of shape " + shape_str(queries),
         "must have at most 65535 sequences and 65535 query heads on CUDA");
  if (!std::isfinite(distance_weight)) fail(fn, "distance_weight", std::to_string(distance_weight), "must be finite");
  c.batch = B, c.n = n, c.w = w, c.ctx = n - w;
  c.groups = c.g == Granularity::shared ? 1 : p.keys.shape[1];
  // Header: kv_len, score_begin, score_count, (w); ring_start[B]; window_len[B].
  c.header = header_bytes(4 + 2 * std::size_t(B));
  c.library = pcu::window_attention_scores_workspace_bytes(p, c.g);  // with the per-KV-head partials
  return c;
}

template <class T>
void score_launch(ScoreCall<T>& c, float distance_weight, nb::handle out, nb::handle workspace, int device,
                  std::uintptr_t stream) {
  const char* fn = "window_attention_scores";
  const nb::ndarray<> o = writable(out, fn, "out");
  const TensorView<float, 3> ov = view<float, 3>(o, fn, "out", Place{device}, !c.batched);
  if (c.batched) check_shape(o, {c.batch, c.groups, c.ctx}, fn, "out");
  else check_shape(o, {c.groups, c.ctx}, fn, "out");
  check_writes_once(o, fn, "out");
  const Scratch ws = scratch(workspace, fn, device, c.header + c.library, "window_attention_scores_workspace_bytes");
  if (c.ctx == 0) return;  // no context slot to score
  auto* ints = reinterpret_cast<std::int32_t*>(ws.data);
  ScoreProblem<T>& p = c.p;
  const std::int64_t kvh = p.keys.shape[1];
  p.kv_len = {ints + 0, {c.batch, kvh}, {0, 0}};
  p.score_begin = {ints + 1, {c.batch, kvh}, {0, 0}};
  p.score_count = {ints + 2, {c.batch, kvh}, {0, 0}};
  p.ring_start = ints + 4;           // [B] zeros: window query 0 is row 0
  p.window_len = ints + 4 + c.batch;  // [B] w: the whole ring
  const int n = int(c.n), w = int(c.w);
  DeviceGuard guard(device);
  const cudaStream_t s = as_stream(stream);
  fill_ints(ints, int4{n, 0, n - w, w}, int(c.batch), 0, w, s);
  pcu::window_attention_scores<T>(p, c.g, distance_weight, ov, ws.data + c.header, ws.bytes - c.header, s);
}

void window_attention_scores(const Array& keys, const Array& queries, const OptArray& lse, float scale,
                             float distance_weight, const std::string& granularity, nb::handle out,
                             nb::handle workspace, std::uintptr_t stream) {
  const char* fn = "window_attention_scores";
  const int device = cuda_device_of(keys, fn, "keys");
  with_elem(elem_of(keys, fn, "keys"), [&](auto tag) {
    using T = decltype(tag);
    ScoreCall<T> c = score_call<T>(keys, queries, lse, scale, distance_weight, granularity, device);
    score_launch(c, distance_weight, out, workspace, device, stream);
  });
}

std::size_t window_attention_scores_workspace_bytes(const Array& keys, const Array& queries, const OptArray& lse,
                                                    float scale, float distance_weight,
                                                    const std::string& granularity) {
  const char* fn = "window_attention_scores";
  const int device = cuda_device_of(keys, fn, "keys");
  return with_elem(elem_of(keys, fn, "keys"), [&](auto tag) {
    using T = decltype(tag);
    const ScoreCall<T> c = score_call<T>(keys, queries, lse, scale, distance_weight, granularity, device);
    return c.header + c.library;
  });
}

// ---------------------------------------------------------------------------
// topk_indices

struct TopkCall {
  TensorView<const float, 3> scores;  // (rows, 1, n)
  bool rows2 = true;
  std::int64_t rows = 0;
  int n = 0;
  std::size_t header = 0, library = 0;
};

TopkCall topk_call(const Array& scores, int k, int sinks, int device) {
  const char* fn = "topk_indices";
  TopkCall c;
  c.rows2 = scores.ndim() == 2;
  const TensorView<const float, 2> s = view<const float, 2>(scores, fn, "scores", Place{device}, true);
  if (s.shape[1] >= INT32_MAX) fail(fn, "scores", "array of shape " + shape_str(scores), "is too long");
  if (s.shape[0] > INT32_MAX) fail(fn, "scores", "array of shape " + shape_str(scores), "has too many rows");
  c.n = int(s.shape[1]);
  c.rows = s.shape[0];
  PYRAMIDINFER_REQUIRE(k >= 0 && k <= c.n, fn, "k", k, "must be in [0, n = " + std::to_string(c.n) + "]");
  PYRAMIDINFER_REQUIRE(sinks >= 0, fn, "sinks", sinks, "must be >= 0");
  c.scores = {s.data, {c.rows, 1, s.shape[1]}, {s.stride[0], 0, s.stride[1]}};
  c.header = header_bytes(2);  // n, k
  c.library = pcu::topk_indices_workspace_bytes(int(c.rows), c.n);
  return c;
}

void topk_indices(const Array& scores, int k, int sinks, nb::handle out, nb::handle workspace,
                  std::uintptr_t stream) {
  const char* fn = "topk_indices";
  const int device = cuda_device_of(scores, fn, "scores");
  const TopkCall c = topk_call(scores, k, sinks, device);
  const nb::ndarray<> o = writable(out, fn, "out");
  const TensorView<std::int32_t, 2> ov = view<std::int32_t, 2>(o, fn, "out", Place{device}, !c.rows2);
  if (c.rows2) check_shape(o, {c.rows, k}, fn, "out");
  else check_shape(o, {k}, fn, "out");
  check_writes_once(o, fn, "out");
  const Scratch ws = scratch(workspace, fn, device, c.header + c.library, "topk_indices_workspace_bytes");
  if (c.rows == 0 || k == 0) return;
  auto* ints = reinterpret_cast<std::int32_t*>(ws.data);
  const TensorView<const std::int32_t, 2> nv{ints + 0, {c.rows, 1}, {0, 0}}, kv{ints + 1, {c.rows, 1}, {0, 0}};
  const TensorView<std::int32_t, 3> o3{ov.data, {c.rows, 1, k}, {ov.stride[0], 0, ov.stride[1]}};
  DeviceGuard guard(device);
  const cudaStream_t s = as_stream(stream);
  fill_ints(ints, int4{c.n, k, 0, 0}, 0, 0, 0, s);
  pcu::topk_indices(c.scores, nv, kv, sinks, o3, ws.data + c.header, ws.bytes - c.header, s);
}

std::size_t topk_indices_workspace_bytes(const Array& scores, int k, int sinks) {
  const int device = cuda_device_of(scores, "topk_indices", "scores");
  const TopkCall c = topk_call(scores, k, sinks, device);
  return c.header + c.library;
}

// ---------------------------------------------------------------------------
// compact_rows

/// Whether the rows (last axis) of x move as 16-byte vectors in
/// cuda::compact_kv_inplace (the condition of its detail::rows_vectorizable).
template <class T>
bool moves_as_vectors(const KVView<T>& x) {
  const std::int64_t rb = x.shape[3] * std::int64_t(sizeof(T));
  if (x.shape[3] > 1 && x.stride[3] != 1) return false;
  if (rb % 16 != 0 || reinterpret_cast<std::uintptr_t>(x.data) % 16 != 0) return false;
  for (int a = 0; a < 3; ++a)
    if ((x.stride[a] * std::int64_t(sizeof(T))) % 16 != 0) return false;
  return true;
}

template <class T>
struct CompactCall {
  // compact_kv_inplace moves two tensors (K and V) of one shape with one
  // index list. x goes in as its two halves along head_dim when that keeps
  // the rows' 16-byte moves (each element then moves once); otherwise (odd
  // head_dim, or halves that would lose the vector moves) as K and V both,
  // which moves every row twice, the same values to the same place.
  KVView<T> k, v;
  TensorView<const std::int32_t, 1> kept;
  int m = 0;
  std::size_t header = 0, library = 0;
};

template <class T>
CompactCall<T> compact_call(const nb::ndarray<>& x, const Array& kept, int device) {
  const char* fn = "compact_rows";
  CompactCall<T> c;
  const KVView<T> xv = view<T, 4>(x, fn, "x", Place{device}, true);
  check_writes_once(x, fn, "x");
  c.kept = view<const std::int32_t, 1>(kept, fn, "kept", Place{device});
  for (int a = 0; a < 4; ++a)
    if (xv.shape[a] > INT32_MAX) fail(fn, "x", "array of shape " + shape_str(x), "is too large");
  if (xv.shape[0] * xv.shape[1] > INT32_MAX) fail(fn, "x", "array of shape " + shape_str(x), "has too many rows");
  const std::int64_t n = xv.shape[2], d = xv.shape[3];
  if (c.kept.shape[0] > n)
    fail(fn, "kept", "array of " + std::to_string(c.kept.shape[0]) + " indices",
         "must hold at most n = " + std::to_string(n) + " ascending indices into x's rows");
  c.m = int(c.kept.shape[0]);
  c.k = c.v = xv;
  if (d >= 2 && d % 2 == 0) {
    KVView<T> lo = xv, hi = xv;
    lo.shape[3] = hi.shape[3] = d / 2;
    hi.data = xv.data + (d / 2) * xv.stride[3];
    if ((moves_as_vectors(lo) && moves_as_vectors(hi)) || !moves_as_vectors(xv)) c.k = lo, c.v = hi;
  }
  c.header = header_bytes(2);  // status, count
  c.library = pcu::compact_kv_inplace_workspace_bytes<T>(int(xv.shape[0]), int(xv.shape[1]), int(n),
                                                         int(c.k.shape[3]));
  return c;
}

int compact_rows(nb::handle x, const Array& kept, nb::handle workspace, std::uintptr_t stream) {
  const char* fn = "compact_rows";
  const nb::ndarray<> xa = writable(x, fn, "x");
  const int device = cuda_device_of(xa, fn, "x");
  return with_elem(elem_of(xa, fn, "x"), [&](auto tag) {
    using T = decltype(tag);
    const CompactCall<T> c = compact_call<T>(xa, kept, device);
    const Scratch ws = scratch(workspace, fn, device, c.header + c.library, "compact_rows_workspace_bytes");
    auto* ints = reinterpret_cast<std::int32_t*>(ws.data);
    const std::int64_t B = c.k.shape[0], H = c.k.shape[1];
    // An empty list still needs a device pointer: the count (0) says no row is read.
    const TensorView<const std::int32_t, 3> kv{c.m > 0 ? c.kept.data : ints, {B, H, c.m}, {0, 0, c.kept.stride[0]}};
    const TensorView<const std::int32_t, 2> count{ints + 1, {B, H}, {0, 0}};
    DeviceGuard guard(device);
    const cudaStream_t s = as_stream(stream);
    check_kept_kernel<<<1, kCheckThreads, 0, s>>>(c.kept.data, c.kept.stride[0], c.m, int(c.k.shape[2]), ints);
    PYRAMIDINFER_CUDA_CHECK_LAUNCH("pyramidinfer::python::check_kept_kernel");
    pcu::compact_kv_inplace<T>(c.k, c.v, TensorView<std::int32_t, 3>{}, TensorView<std::int32_t, 2>{}, kv, count,
                               ws.data + c.header, ws.bytes - c.header, s);
    return c.m;
  });
}

std::size_t compact_rows_workspace_bytes(nb::handle x, const Array& kept) {
  const char* fn = "compact_rows";
  const nb::ndarray<> xa = writable(x, fn, "x");
  const int device = cuda_device_of(xa, fn, "x");
  return with_elem(elem_of(xa, fn, "x"), [&](auto tag) {
    using T = decltype(tag);
    const CompactCall<T> c = compact_call<T>(xa, kept, device);
    return c.header + c.library;
  });
}

// ---------------------------------------------------------------------------
// gather_rows

void gather_rows(const Array& src, const Array& idx, nb::handle out, std::uintptr_t stream) {
  const char* fn = "gather_rows";
  const int device = cuda_device_of(src, fn, "src");
  with_elem(elem_of(src, fn, "src"), [&](auto tag) {
    using T = decltype(tag);
    const TensorView<const T, 2> sv = view<const T, 2>(src, fn, "src", Place{device});
    const TensorView<const std::int32_t, 1> iv = view<const std::int32_t, 1>(idx, fn, "idx", Place{device});
    if (sv.shape[0] > INT32_MAX) fail(fn, "src", "array of shape " + shape_str(src), "is too long");
    if (iv.shape[0] > sv.shape[0])
      fail(fn, "idx", "array of " + std::to_string(iv.shape[0]) + " indices",
           "must hold at most n = " + std::to_string(sv.shape[0]) + " ascending indices into src's rows");
    if (iv.shape[0] > 1 && iv.stride[0] != 1)
      fail(fn, "idx", "array with stride[0] = " + std::to_string(iv.stride[0]),
           "must be contiguous (cuda::gather_rows reads a plain device array)");
    const int m = int(iv.shape[0]);
    const nb::ndarray<> o = writable(out, fn, "out");
    const TensorView<T, 2> ov = view<T, 2>(o, fn, "out", Place{device});
    check_shape(o, {std::int64_t(m), sv.shape[1]}, fn, "out");
    check_writes_once(o, fn, "out");
    if (m == 0 || sv.shape[1] == 0) return;
    DeviceGuard guard(device);
    pcu::gather_rows<T>(sv, iv.data, m, ov, as_stream(stream));
  });
}

}  // namespace

void bind_cuda_kernels(nb::module_& m) {
  m.def("window_attention_scores", &window_attention_scores, "keys"_a, "queries"_a, "lse"_a.none(), "scale"_a,
        "distance_weight"_a, "granularity"_a, "out"_a, "workspace"_a.none() = nb::none(), "stream"_a = 0,
        "Recent-window attention scores of the context slots [0, n - w), on the GPU.\n\n"
        "keys (b, kv_heads, n, d) and queries (b, q_heads, w, d) CUDA arrays of one dtype\n"
        "(float32, float16 or bfloat16; or without b), lse None or float32 (b, q_heads, w).\n"
        "scale 0 means 1/sqrt(d); granularity 'shared' or 'per_kv_head'. Writes out, float32\n"
        "(b, groups, n - w), groups 1 when shared, kv_heads per_kv_head. workspace: a uint8\n"
        "CUDA array of window_attention_scores_workspace_bytes(...) bytes. Enqueued on stream\n"
        "(an int handle); allocates nothing, never synchronises.");
  m.def("window_attention_scores_workspace_bytes", &window_attention_scores_workspace_bytes, "keys"_a, "queries"_a,
        "lse"_a.none(), "scale"_a, "distance_weight"_a, "granularity"_a,
        "Workspace bytes window_attention_scores needs for these arguments (checked as the call checks them).");

  m.def("topk_indices", &topk_indices, "scores"_a, "k"_a, "sinks"_a, "out"_a, "workspace"_a.none() = nb::none(),
        "stream"_a = 0,
        "Keeps min(sinks, k) leading slots and the best others of each row of scores ((n,) or\n"
        "(rows, n) float32 CUDA): writes ascending int32 indices to out, (k,) or (rows, k).\n"
        "Higher first, NaN last, ties to the lower index. workspace: topk_indices_workspace_bytes.");
  m.def("topk_indices_workspace_bytes", &topk_indices_workspace_bytes, "scores"_a, "k"_a, "sinks"_a,
        "Workspace bytes topk_indices needs for these arguments (checked as the call checks them).");

  m.def("compact_rows", &compact_rows, "x"_a, "kept"_a, "workspace"_a.none() = nb::none(), "stream"_a = 0,
        "In place: moves rows kept[i] -> i along axis -2 of x ((b, h, n, d) or (h, n, d) CUDA,\n"
        "float32, float16 or bfloat16, any strides) in every (b, h). kept: int32 CUDA (m,),\n"
        "m <= n, strictly ascending in [0, n), checked on the device: when it is not, x is\n"
        "left as it is and the workspace's first int32 is set to 1 (0 after a valid list).\n"
        "workspace: compact_rows_workspace_bytes. Returns m.");
  m.def("compact_rows_workspace_bytes", &compact_rows_workspace_bytes, "x"_a, "kept"_a,
        "Workspace bytes compact_rows needs for these arguments (checked as the call checks them).");

  m.def("gather_rows", &gather_rows, "src"_a, "idx"_a, "out"_a, "stream"_a = 0,
        "out[i] = src[idx[i]] for src (n, c) CUDA (float32, float16 or bfloat16, any strides),\n"
        "idx a contiguous int32 CUDA array of m <= n ascending indices, out (m, c) of src's\n"
        "dtype. idx's values are not checked (device data): an index outside [0, n) reads the\n"
        "nearest row, never out of bounds.");
}

}  // namespace pyramidinfer::python
