// The host headers must compile inside a CUDA translation unit too (engines
// include them from .cu files). Instantiates the main templates under nvcc.
#include <pyramidinfer/pyramidinfer.hpp>

namespace pyramidinfer {
template class KVCache<half_t, HostBackend>;
template class KVCache<bfloat16_t, HostBackend>;
template class KVCache<float, HostBackend>;
template class PyramidCompressor<>;
template class PyramidCompressor<KeyNormScoring, TopPSelection, GeometricSchedule>;
}  // namespace pyramidinfer

__global__ void touch(pyramidinfer::half_t* x) { x[0] = pyramidinfer::from_float<pyramidinfer::half_t>(1.f); }

int main() { return 0; }
