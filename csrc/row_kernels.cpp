// Row kernels of the fused log-prob passes (see row_kernels.h).
//
// The float exp is the classic range reduction x = k·ln2 + r (|r| <= ln2/2) with a degree-6 polynomial
// for e^r (about 1 ulp), written without branches or libm calls so that `omp simd` loops vectorise.
#include "row_kernels.h"

#include <cmath>
#include <cstring>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define HAF_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define HAF_CLONES
#endif

namespace haf {
namespace {

inline float exp_f32(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  // round(x / ln2) with the 1.5·2^23 trick (no rounding instruction needed on baseline x86-64)
  const float magic = 12582912.0f;
  const float t = x * 1.44269504088896341f + magic;
  const float k = t - magic;
  float r = x - k * 0.693359375f;
  r = r - k * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// tanh(x) = 1 − 2 / (e^{2x} + 1): exact limits ±1, absolute error ~1e-7 near 0 (enough for logits).
inline float tanh_f32(float x) { return 1.0f - 2.0f / (exp_f32(2.0f * x) + 1.0f); }

}  // namespace

HAF_CLONES void row_affine(float* z, int64_t n, const float* bias, float scale) {
  if (bias != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) z[j] = (z[j] + bias[j]) * scale;
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) z[j] = z[j] * scale;
  }
}

HAF_CLONES void row_softcap(float* z, int64_t n, float cap) {
  const float inv = 1.0f / cap;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) z[j] = cap * tanh_f32(z[j] * inv);
}

// NaN logits are not tracked here: they reach row_sumexp and turn the row's lse into NaN there.
HAF_CLONES float row_max(const float* z, int64_t n) {
  float m = -INFINITY;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = z[j] > m ? z[j] : m;
  return m;
}

HAF_CLONES float row_sumexp(const float* z, int64_t n, float m) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += exp_f32(z[j] - m);
  return s;
}

HAF_CLONES void row_dlogits(float* z, int64_t n, float lse, float coef) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) z[j] = coef * exp_f32(z[j] - lse);
}

HAF_CLONES void row_dlogits_capped(float* z, int64_t n, float lse, float coef, float inv_cap) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float t = z[j] * inv_cap;
    z[j] = coef * exp_f32(z[j] - lse) * (1.0f - t * t);
  }
}

HAF_CLONES void row_accumulate(float* acc, const float* z, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) acc[j] += z[j];
}

// ---- float64: plain libm (gradcheck precision) ----

void row_affine(double* z, int64_t n, const double* bias, double scale) {
  for (int64_t j = 0; j < n; ++j) z[j] = (z[j] + (bias != nullptr ? bias[j] : 0.0)) * scale;
}

void row_softcap(double* z, int64_t n, double cap) {
  for (int64_t j = 0; j < n; ++j) z[j] = cap * std::tanh(z[j] / cap);
}

double row_max(const double* z, int64_t n) {
  double m = -INFINITY;
  for (int64_t j = 0; j < n; ++j) {
    if (std::isnan(z[j])) return NAN;
    m = z[j] > m ? z[j] : m;
  }
  return m;
}

double row_sumexp(const double* z, int64_t n, double m) {
  double s = 0.0;
  for (int64_t j = 0; j < n; ++j) s += std::exp(z[j] - m);
  return s;
}

void row_dlogits(double* z, int64_t n, double lse, double coef) {
  for (int64_t j = 0; j < n; ++j) z[j] = coef * std::exp(z[j] - lse);
}

void row_dlogits_capped(double* z, int64_t n, double lse, double coef, double inv_cap) {
  for (int64_t j = 0; j < n; ++j) {
    const double t = z[j] * inv_cap;
    z[j] = coef * std::exp(z[j] - lse) * (1.0 - t * t);
  }
}

void row_accumulate(double* acc, const double* z, int64_t n) {
  for (int64_t j = 0; j < n; ++j) acc[j] += z[j];
}

}  // namespace haf
