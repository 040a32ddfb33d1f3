/* cblas.h stand-in for building pyramid-serve where no BLAS is installed (the
 * device machine). examples/generate/policies.hpp includes the CPU model's
 * header, which includes <cblas.h>; pyramid-serve never runs the CPU model,
 * so these declarations are never called and need no library.
 * run_serve_gpu.sh adds this directory only when <cblas.h> is missing. */
#ifndef PYRAMIDINFER_NO_BLAS_CBLAS_H
#define PYRAMIDINFER_NO_BLAS_CBLAS_H
#ifdef __cplusplus
extern "C" {
#endif
enum CBLAS_ORDER { CblasRowMajor = 101, CblasColMajor = 102 };
enum CBLAS_TRANSPOSE { CblasNoTrans = 111, CblasTrans = 112, CblasConjTrans = 113 };
void cblas_sgemm(enum CBLAS_ORDER order, enum CBLAS_TRANSPOSE ta, enum CBLAS_TRANSPOSE tb, int m, int n, int k,
                 float alpha, const float* a, int lda, const float* b, int ldb, float beta, float* c, int ldc);
#ifdef __cplusplus
}
#endif
#endif
