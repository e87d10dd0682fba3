/* kernels/qmatmul: matmul against weights of any usable element type
 * (core/dtype.h), for inference of published models.
 *
 *   out[N][OC] = in[N][C] @ W^T, W a [OC][C] matrix of type wtype whose rows
 *   are dtype_row_bytes(wtype, C) apart.
 *
 * F32 weights go to matmul_forward (fp32). Any other type first converts each
 * input row to the type's dot_type (quantize_act: as llama.cpp does), then
 * every output element is one vec_dot. Work is split by output rows and each
 * element is one vec_dot, so results do not depend on the thread count.
 * ws is qmatmul_workspace(wtype, N, C) bytes, planned by the caller (NULL
 * when that is 0); the kernel allocates nothing. */
#ifndef MOE_QMATMUL_H
#define MOE_QMATMUL_H
#include <stddef.h>
#include "core/dtype.h"

size_t qmatmul_workspace(int wtype, int N, int C);
void qmatmul_forward(float *out, const float *in, const void *w, int wtype, int N, int C,
                     int OC, void *ws);
/* The reference twin: every weight row dequantised with to_float and summed
 * against the activation row as its dot type rounds it, in double. Test oracle
 * (a tolerance check; the fast path must agree with vec_dot bit for bit). */
void qmatmul_forward_ref(float *out, const float *in, const void *w, int wtype, int N, int C,
                         int OC);
#endif
