// The host headers must compile inside a CUDA translation unit too (engines
// include them from .cu files). Instantiates the main templates under nvcc.
#include <pyramidinfer/pyramidinfer.hpp>

namespace pyramidinfer {
template class PagedKVCache<half_t, HostBackend>;
template class PagedKVCache<bfloat16_t, HostBackend>;
template class PagedKVCache<float, HostBackend>;
template class HostPagedStorage<half_t>;
template class HostPagedStorage<float>;
template class PyramidCompressor<>;
template class PyramidCompressor<KeyNormScoring, TopPSelection, GeometricSchedule>;
}  // namespace pyramidinfer

__global__ void touch(pyramidinfer::half_t* x) { x[0] = pyramidinfer::from_float<pyramidinfer::half_t>(1.f); }

int main() { return 0; }
