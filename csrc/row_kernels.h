// Row kernels of the fused log-prob passes: one row of one logits tile at a time (L1-resident).
//
// float versions are vectorised (a polynomial exp the compiler turns into SIMD code, compiled for
// x86-64-v4 (AVX-512) / x86-64-v3 (AVX2) / baseline x86-64 and picked at first use, or forced with
// set_isa); double versions call std::exp / std::tanh (float64 exists for gradcheck, not for speed).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

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

// sum_j exp(z[j] - m), accumulated and returned in float64
double row_sumexp(const float* z, int64_t n, float m);
double row_sumexp(const double* z, int64_t n, double m);

// z = coef * exp((z - hi) - lo)                           (softmax part of dL/dz, no softcap)
// lse = hi + lo split in two: hi is lse rounded to the compute dtype, lo the rest (see lse_split).
void row_dlogits(float* z, int64_t n, float hi, float lo, float coef);
void row_dlogits(double* z, int64_t n, double hi, double lo, double coef);

// z = coef * exp((z - hi) - lo) * (1 - (z * inv_cap)^2)   (same, times the softcap chain rule)
void row_dlogits_capped(float* z, int64_t n, float hi, float lo, float coef, float inv_cap);
void row_dlogits_capped(double* z, int64_t n, double hi, double lo, double coef, double inv_cap);

// max_j |z[j]|  (NaN propagates)
float row_absmax(const float* z, int64_t n);
double row_absmax(const double* z, int64_t n);

// acc += z
void row_accumulate(float* acc, const float* z, int64_t n);
void row_accumulate(double* acc, const double* z, int64_t n);

// Instruction sets of the float kernels: those this CPU and build can run (best first, "default" last),
// the one in use, and a way to force one ("auto" = the best). Results differ in the last bits between them.
std::vector<std::string> isa_supported();
std::string isa_active();
void set_isa(const std::string& name);

}  // namespace haf
