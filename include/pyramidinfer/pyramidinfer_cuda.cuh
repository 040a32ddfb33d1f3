// Umbrella header of the CUDA backend (include from .cu files only).
#pragma once

#include "pyramidinfer.hpp"
#include "core/cuda_check.cuh"
#include "kernels/cuda/scoring.cuh"
#include "kernels/cuda/select.cuh"
#include "kernels/cuda/compact.cuh"
#include "kernels/cuda/paged.cuh"
#include "compressor_cuda.cuh"
