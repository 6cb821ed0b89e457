// Row kernels of the fused log-prob passes (see row_kernels.h).
//
// The float kernels (row_kernels_simd.inc) are compiled three times on x86-64 with GCC — for x86-64-v4
// (AVX-512), x86-64-v3 (AVX2 + FMA) and the baseline — and one table of them is picked at first use from
// what the CPU supports. `set_isa` forces a table, so tests can run every path that some machine would pick
// (their results differ in the last bits: FMA contraction and SIMD width change the rounding).
#include "row_kernels.h"

#include <atomic>
#include <cmath>
#include <cstring>
#include <stdexcept>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define HAF_MULTI_ISA 1
#else
#define HAF_MULTI_ISA 0
#endif

namespace haf {

struct RowTable {
  const char* name;
  void (*affine)(float*, int64_t, const float*, float);
  void (*softcap)(float*, int64_t, float);
  float (*max)(const float*, int64_t);
  double (*sumexp)(const float*, int64_t, float);
  void (*dlogits)(float*, int64_t, float, float, float);
  void (*dlogits_capped)(float*, int64_t, float, float, float, float);
  float (*absmax)(const float*, int64_t);
  void (*accumulate)(float*, const float*, int64_t);
};

#define HAF_ROW_TABLE(ns, label) \
  RowTable { label, ns::row_affine, ns::row_softcap, ns::row_max, ns::row_sumexp, ns::row_dlogits, \
             ns::row_dlogits_capped, ns::row_absmax, ns::row_accumulate }

#if HAF_MULTI_ISA
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
namespace isa_v4 {
#include "row_kernels_simd.inc"
}  // namespace isa_v4
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
namespace isa_v3 {
#include "row_kernels_simd.inc"
}  // namespace isa_v3
#pragma GCC pop_options
#endif

namespace isa_base {
#include "row_kernels_simd.inc"
}  // namespace isa_base

namespace {

const RowTable kBase = HAF_ROW_TABLE(isa_base, "default");
#if HAF_MULTI_ISA
const RowTable kV3 = HAF_ROW_TABLE(isa_v3, "x86-64-v3");
const RowTable kV4 = HAF_ROW_TABLE(isa_v4, "x86-64-v4");
#endif

const RowTable* best_table() {
#if HAF_MULTI_ISA
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return &kV4;
  if (__builtin_cpu_supports("x86-64-v3")) return &kV3;
#endif
  return &kBase;
}

std::atomic<const RowTable*> g_table{nullptr};

const RowTable& table() {
  const RowTable* t = g_table.load(std::memory_order_acquire);
  if (t == nullptr) {
    t = best_table();
    g_table.store(t, std::memory_order_release);
  }
  return *t;
}

}  // namespace

std::vector<std::string> isa_supported() {
  std::vector<std::string> out;
#if HAF_MULTI_ISA
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) out.emplace_back(kV4.name);
  if (__builtin_cpu_supports("x86-64-v3")) out.emplace_back(kV3.name);
#endif
  out.emplace_back(kBase.name);
  return out;
}

std::string isa_active() { return table().name; }

void set_isa(const std::string& name) {
  if (name == "auto") {
    g_table.store(best_table(), std::memory_order_release);
    return;
  }
  const RowTable* pick = nullptr;
  if (name == kBase.name) pick = &kBase;
#if HAF_MULTI_ISA
  __builtin_cpu_init();
  if (name == kV3.name && __builtin_cpu_supports("x86-64-v3")) pick = &kV3;
  if (name == kV4.name && __builtin_cpu_supports("x86-64-v4")) pick = &kV4;
#endif
  if (pick == nullptr) {
    std::string known = "auto";
    for (const auto& s : isa_supported()) known += ", " + s;
    throw std::invalid_argument("haf_kernels._C: instruction set '" + name + "' is not available on this CPU/build (" +
                                "choose one of: " + known + ")");
  }
  g_table.store(pick, std::memory_order_release);
}

void row_affine(float* z, int64_t n, const float* bias, float scale) { table().affine(z, n, bias, scale); }
void row_softcap(float* z, int64_t n, float cap) { table().softcap(z, n, cap); }
float row_max(const float* z, int64_t n) { return table().max(z, n); }
double row_sumexp(const float* z, int64_t n, float m) { return table().sumexp(z, n, m); }
void row_dlogits(float* z, int64_t n, float hi, float lo, float coef) { table().dlogits(z, n, hi, lo, coef); }
void row_dlogits_capped(float* z, int64_t n, float hi, float lo, float coef, float inv_cap) {
  table().dlogits_capped(z, n, hi, lo, coef, inv_cap);
}
float row_absmax(const float* z, int64_t n) { return table().absmax(z, n); }
void row_accumulate(float* acc, const float* z, int64_t n) { table().accumulate(acc, z, n); }

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

void row_dlogits(double* z, int64_t n, double hi, double lo, double coef) {
  for (int64_t j = 0; j < n; ++j) z[j] = coef * std::exp((z[j] - hi) - lo);
}

void row_dlogits_capped(double* z, int64_t n, double hi, double lo, double coef, double inv_cap) {
  for (int64_t j = 0; j < n; ++j) {
    const double t = z[j] * inv_cap;
    z[j] = coef * std::exp((z[j] - hi) - lo) * (1.0 - t * t);
  }
}

double row_absmax(const double* z, int64_t n) {
  double m = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    if (std::isnan(z[j])) return NAN;
    m = std::fabs(z[j]) > m ? std::fabs(z[j]) : m;
  }
  return m;
}

void row_accumulate(double* acc, const double* z, int64_t n) {
  for (int64_t j = 0; j < n; ++j) acc[j] += z[j];
}

}  // namespace haf
