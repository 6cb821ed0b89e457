// Row kernels of the fused log-prob passes: one row of one logits tile at a time (L1-resident).
//
// float versions are vectorised (a polynomial exp the compiler turns into SIMD code, cloned for
// AVX-512 / AVX2 / baseline x86-64 and picked at load time); double versions call std::exp / std::tanh
// (float64 exists for gradcheck, not for speed).
#pragma once

#include <cstdint>

namespace haf {

// z = (z + bias) * scale; bias may be null.
void row_affine(float* z, int64_t n, const float* bias, float scale);
void row_affine(double* z, int64_t n, const double* bias, double scale);

// z = cap * tanh(z / cap)
void row_softcap(float* z, int64_t n, float cap);
void row_softcap(double* z, int64_t n, double cap);

// max_j z[j]
float row_max(const float* z, int64_t n);
double row_max(const double* z, int64_t n);

// sum_j exp(z[j] - m)
float row_sumexp(const float* z, int64_t n, float m);
double row_sumexp(const double* z, int64_t n, double m);

// z = coef * exp(z - lse)                                  (softmax part of dL/dz, no softcap)
void row_dlogits(float* z, int64_t n, float lse, float coef);
void row_dlogits(double* z, int64_t n, double lse, double coef);

// z = coef * exp(z - lse) * (1 - (z * inv_cap)^2)          (same, times the softcap chain rule)
void row_dlogits_capped(float* z, int64_t n, float lse, float coef, float inv_cap);
void row_dlogits_capped(double* z, int64_t n, double lse, double coef, double inv_cap);

// acc += z
void row_accumulate(float* acc, const float* z, int64_t n);
void row_accumulate(double* acc, const double* z, int64_t n);

}  // namespace haf
