/* cblas.h stand-in for building CUDA tools where no BLAS is installed (the
 * device machine). examples/generate/policies.hpp includes the CPU model's
 * header, which includes <cblas.h>. pyramid-serve never calls it and needs
 * no library; pyramid-eval links the CPU model's code without running it
 * (--device cuda) and links cblas_stub.c. The device scripts add this
 * directory only when <cblas.h> is missing. */
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
