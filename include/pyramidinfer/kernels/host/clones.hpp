// clones.hpp - PYRAMIDINFER_HOST_CLONES: a host hot loop built for several
// x86-64 levels, the best picked at load time.
#pragma once

// Compiled for the engine's flags alone (x86-64's default is SSE2) the host
// hot loops run several times slower than the CPU allows, so with GCC 12+ on
// x86-64 they are also built for x86-64-v4 (AVX-512) and x86-64-v3 (AVX2,
// FMA), and the loader picks the best level the CPU supports (target_clones;
// `arch=<cpu name>` would match one CPU model only). Results may differ in the
// last bits between levels. Lambdas are not cloned: vector code belongs in the
// cloned function itself (or in always-inlined helpers).
#if defined(__x86_64__) && defined(__GNUC__) && __GNUC__ >= 12 && !defined(__clang__) && !defined(__CUDACC__)
#define PYRAMIDINFER_HOST_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PYRAMIDINFER_HOST_CLONES
#endif
