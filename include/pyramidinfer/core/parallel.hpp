// parallel.hpp - how a host engine lends its threads to the library's host
// kernels. The library never starts a thread of its own.
#pragma once

#include <functional>

namespace pyramidinfer {

/// Runs body(i) for every i in [0, tasks), in any order and possibly at once
/// on several threads, and returns when every call has returned. The host
/// kernels that take one (e.g. host::window_attention_scores through
/// ScoreProblem::parallel, set by PyramidCompressor::set_host_parallel) hand
/// it tasks that write disjoint memory, and give the same bits however the
/// tasks are run.
using ParallelFor = std::function<void(int tasks, const std::function<void(int)>& body)>;

}  // namespace pyramidinfer
