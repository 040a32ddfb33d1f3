// pyramidinfer: a pyramid-shaped, compressed KV cache for LLM inference engines.
// Umbrella header: everything that builds without the CUDA toolkit.
#pragma once

#include "core/config.hpp"
#include "core/dtype.hpp"
#include "core/error.hpp"
#include "core/view.hpp"
#include "core/workspace.hpp"
#include "policy/granularity.hpp"
#include "policy/schedule.hpp"
#include "policy/scoring.hpp"
#include "policy/selection.hpp"
#include "kernels/problem.hpp"
#include "kernels/host/compact.hpp"
#include "kernels/host/paged.hpp"
#include "kernels/host/scoring.hpp"
#include "kernels/host/select.hpp"
#include "cache/planner.hpp"
#include "cache/paged.hpp"
#include "cache/paged_storage.hpp"
#include "cache/ring_pool.hpp"
#include "compressor.hpp"
