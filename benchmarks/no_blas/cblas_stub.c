/* Definitions for the cblas.h stand-in: tools built on the device machine
 * (no BLAS installed) that link the CPU model's code without running it, e.g.
 * pyramid-eval --device cuda. A call means the CPU path was taken where it
 * cannot run: it says so and exits. */
#include <stdio.h>
#include <stdlib.h>

#include "cblas.h"

void cblas_sgemm(enum CBLAS_ORDER order, enum CBLAS_TRANSPOSE ta, enum CBLAS_TRANSPOSE tb, int m, int n, int k,
                 float alpha, const float* a, int lda, const float* b, int ldb, float beta, float* c, int ldc) {
  (void)order, (void)ta, (void)tb, (void)m, (void)n, (void)k, (void)alpha, (void)a, (void)lda, (void)b, (void)ldb;
  (void)beta, (void)c, (void)ldc;
  fprintf(stderr, "built without BLAS (benchmarks/no_blas): the CPU model cannot run here; use --device cuda\n");
  exit(3);
}
