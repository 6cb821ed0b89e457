// haf_kernels._C: fused linear + log-softmax + target pick on CPU, forward and backward.
//
//   logits z = cap(scale · (h·Wᵀ + b)),  cap(u) = softcap·tanh(u/softcap) (identity without softcap)
//   logp[t]  = z[t, y_t] − logsumexp_v z[t, v]        (0 where y_t == ignore_index)
//   dL/d(h·Wᵀ + b) = g ⊙ (onehot(y) − softmax(z)) ⊙ (1 − (z/softcap)²) · scale
//
// Work is split over vocab tiles: each of S "slots" owns a contiguous run of vocab tiles, so it owns the
// rows of dW / db it writes (no race, no atomics) and keeps private partial softmax statistics / a private
// dH partial, merged afterwards in slot order. OpenMP threads run the slots. By default S = threads (one slot
// each: deterministic for a fixed thread count); under torch.use_deterministic_algorithms(True) S is fixed
// (kDeterministicSlots, or fewer tiles), so every reduction has one order and results are bitwise equal for
// any thread count. Inside a thread,
// each [token chunk × vocab tile] block of logits is produced by a single-threaded BLAS GEMM (ATen mm_out),
// transformed row by row while it is cache-resident (row_kernels.cpp), and consumed by the dH / dW GEMMs.
//
// Two strategies:
//   forward / backward            recompute the logits in backward: 4 GEMMs, O(threads · tile) memory
//   forward_keep / backward_saved keep this chunk's logits (tile-major [N·V] buffer): 3 GEMMs, O(N·V)
//
// Notes from measurements (2-core AMD EPYC Zen 4 VM, MKL, shared with other jobs; one chunk of n=512 tokens,
// V=32000, D=512, fp32): single-threaded MKL on 128-512 × 1000 × 512 blocks runs as fast as one big GEMM.
// 1 thread (CPU s): H·Wᵀ 0.191, G·W 0.174, Gᵀ·H 0.209 (sum 0.574); forward_keep+backward_saved 0.599
// (torch backend 0.617); forward alone 0.181 (torch 0.293). 2 threads (wall s): GEMMs 0.291, keep path 0.307
// (torch 0.356). dW GEMMs with a short inner dimension cost more (hence 512-token blocks on the keep path);
// first-touch page faults of fresh 64 MiB buffers (~30 ms each) remain: a huge-page hint (madvise) on them did
// not help consistently (better at 1 thread, worse at 2), so there is none.
//
// Profile of 2026-12-02 (same VM, busy: load 2-4 on 2 cores; 1 thread, CPU ms, one chunk n=512, D=512,
// V=32000): H·Wᵀ 327, G·W 249, Gᵀ·H 281 (GEMMs 857); forward_keep 345 (forward 320), backward_saved ~600
// (keep path ~945 = 1.10× its GEMMs); a fresh 62.5 MiB buffer's first touch 52-61 ms. Predictions, from that:
// gradient filtering skips 2 of 3 GEMMs in a sparse block (peaky: ~83% of 128-token blocks, so ~55% of the
// backward, ~35% of the loss; random: none); reusing the kept buffer saves its page faults, ~5% per chunk;
// the row passes (one exp pass each way) and the kept buffer's traffic (3 × 62.5 MiB) are ≤ 5% and ~2%;
// bigger multi-threaded GEMMs and other slot schedules: ~0 (per-block single-threaded MKL is as fast).
// Measured (whole fused_haf_loss, 4 pairs × 256 × 512 × 32000, 2 threads, interleaved runs): filtering at
// 2^-12 on peaky 4.5 s → 3.0 s CPU (−36%) at a dH error of 3e-2 (vs 1.5e-6 unfiltered, 1.9e-4 naive fp32;
// dW 7.9e-3): the dropped off-target mass of a peaked row equals its target's 1 − p, so no threshold that
// filters anything is accuracy-neutral (1e-4: 4 of 128 blocks, already 2e-3), hence opt-in; at 8 pairs × 512 ×
// 1024 peaky, 26.1 → 13.7 s CPU (3 reps each).
//
// Profile of 2026-12-02 (2-core AMD EPYC Zen 3 VM, AVX2, quiet; perf): the row kernels ran as scalar code (GCC kept
// the exp's clamp branches: trapping math), 12% of forward_keep's samples in row_sumexp; -fno-trapping-math (setup.py)
// vectorises them. One chunk (n = 512, D = 512, V = 32000, 1 thread): forward_keep 300 → 252 ms, backward_saved
// 480 → 428 ms, against 200 ms per GEMM. The rest of forward_keep was the fresh kept buffer's page faults: the
// whole-loss path now hands each chunk the previous chunk's consumed buffer (forward_keep's `out`). At n = 1024,
// D = 1024, 2 threads: forward_keep + backward_saved 1.18 s per chunk against 1.29 s for the three plain GEMMs
// (which fault in a fresh [n, V] output); perf of the whole loss: 81% of samples in MKL's sgemm kernel, 7% in its
// packing, 2% in the row kernels.
#include <torch/extension.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <exception>
#include <limits>
#include <mutex>
#include <optional>
#include <tuple>
#include <vector>

#include "row_kernels.h"

namespace haf {
namespace {

using at::Tensor;

struct Config {
  int64_t ignore_index;
  double scale;
  double softcap;  // <= 0: none
  int64_t chunk_tokens;
  int64_t vocab_tile;
  int64_t partial_bytes = int64_t(64) << 20;  // bound on the per-thread dH partials of backward (all threads)
  double grad_filter = 0.0;  // > 0: gradient filtering threshold on |onehot − p|·chain·scale (see tile_dlogits)
};

// Blocks of the last backward call: how many there were and how many gradient filtering made sparse
// (read by tests and benchmarks through _C.filter_stats()).
std::atomic<int64_t> g_blocks{0}, g_sparse_blocks{0};

struct Tiling {
  int64_t vocab, tile, count;
  Tiling(int64_t v, int64_t t) : vocab(v), tile(t), count((v + t - 1) / t) {}
  int64_t begin(int64_t k) const { return k * tile; }
  int64_t width(int64_t k) const { return std::min(tile, vocab - k * tile); }
};

int64_t max_threads() { return std::max<int64_t>(1, at::get_num_threads()); }

// Most token rows of one backward block when gradient filtering is on.
constexpr int64_t kFilterChunkTokens = 128;

// Slots of the deterministic mode: the most threads it can use (a larger count costs more dH partials).
constexpr int64_t kDeterministicSlots = 8;

bool deterministic() { return at::globalContext().deterministicAlgorithms(); }

// Number of work slots for `tiles` vocab tiles (see the header comment).
int64_t slot_count(int64_t tiles) {
  return std::max<int64_t>(1, std::min(deterministic() ? kDeterministicSlots : max_threads(), tiles));
}

// Threads that run `slots` slots.
int64_t team_size(int64_t slots) { return std::min(max_threads(), slots); }

// Contiguous share [lo, hi) of `count` items for thread `tid` of `nt`.
std::pair<int64_t, int64_t> share(int64_t count, int64_t nt, int64_t tid) {
  const int64_t base = count / nt, extra = count % nt;
  const int64_t lo = tid * base + std::min(tid, extra);
  return {lo, lo + base + (tid < extra ? 1 : 0)};
}

// Runs body(slot, tid) for every slot in [0, slots) on team_size(slots) OpenMP threads (thread tid takes slots
// tid, tid + nt, ...; tid indexes per-thread scratch). Exceptions thrown by any thread are rethrown here
// (never across the OpenMP region boundary).
template <typename F>
void run_slots(int64_t slots, const F& body) {
  const int64_t team = team_size(slots);
  if (team <= 1) {
    at::NoGradGuard no_grad;
    for (int64_t s = 0; s < slots; ++s) body(s, 0);
    return;
  }
  std::exception_ptr error = nullptr;
  std::mutex error_mutex;
#ifdef _OPENMP
#pragma omp parallel num_threads(static_cast<int>(team))
  {
    const int64_t tid = omp_get_thread_num(), nt = omp_get_num_threads();
    try {
      at::NoGradGuard no_grad;
      for (int64_t s = tid; s < slots; s += nt) body(s, tid);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
    }
  }
#else
  {
    at::NoGradGuard no_grad;
    for (int64_t s = 0; s < slots; ++s) body(s, 0);
  }
#endif
  if (error) std::rethrow_exception(error);
}

template <typename T>
Tensor blob(T* ptr, at::IntArrayRef sizes) {
  return at::from_blob(ptr, sizes, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// Vocab tile k of W as a [width, D] tensor of T (a view, or a converted copy in `scratch`).
template <typename T>
Tensor weight_tile(const Tensor& weight, const Tiling& tl, int64_t k, T* scratch) {
  const int64_t d = weight.size(1), v0 = tl.begin(k), w = tl.width(k);
  if (weight.scalar_type() == c10::CppTypeToScalarType<T>::value) {
    return blob(weight.data_ptr<T>() + v0 * d, {w, d});
  }
  Tensor out = blob(scratch, {w, d});
  out.copy_(weight.narrow(0, v0, w));
  return out;
}

// Logits transform of one [rows, cols] tile in place: bias, scale, softcap.
template <typename T>
void transform_rows(T* z, int64_t rows, int64_t cols, const T* bias, const Config& cfg) {
  const bool affine = bias != nullptr || cfg.scale != 1.0;
  for (int64_t r = 0; r < rows; ++r) {
    T* zr = z + r * cols;
    if (affine) row_affine(zr, cols, bias, static_cast<T>(cfg.scale));
    if (cfg.softcap > 0) row_softcap(zr, cols, static_cast<T>(cfg.softcap));
  }
}

// Forward statistics of one tile (rows r0.., vocab v0..): running (max, sum-exp) and the target logit.
// The statistics are float64 whatever T is (see row_sumexp: a peaked row's small terms must not be rounded
// against its largest one).
template <typename T>
void tile_stats(const T* z, int64_t rows, int64_t cols, int64_t r0, int64_t v0, const int64_t* labels,
                const Config& cfg, double* run_max, double* run_sum, T* target) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* zr = z + r * cols;
    const int64_t t = r0 + r;
    const T mt = row_max(zr, cols);
    const double s = row_sumexp(zr, cols, mt);
    const double m = mt;
    if (run_max[t] < m) {
      run_sum[t] = run_sum[t] * std::exp(run_max[t] - m) + s;
      run_max[t] = m;
    } else {
      run_sum[t] += s * std::exp(m - run_max[t]);
    }
    const int64_t y = labels[t];
    if (y != cfg.ignore_index && y >= v0 && y < v0 + cols) target[t] = zr[y - v0];
  }
}

// lse (float64) as hi + lo in T: hi = lse rounded to T, lo = the rest (0 for T = double).
template <typename T>
std::pair<T, T> lse_split(double lse) {
  const T hi = static_cast<T>(lse);
  return {hi, static_cast<T>(lse - static_cast<double>(hi))};
}

// dL/d(raw logits) of one tile in place (z holds transformed logits on entry); db += column sums.
//
// Gradient filtering (cfg.grad_filter = ε > 0): returns true when every entry off the targets is negligible,
// |(onehot − p)·chain·scale| = |dz| / |g| <= ε. The caller then applies only the targets' entries (one per row
// at most: rank-1 updates of dH and dW instead of the two GEMMs); the dropped entries' contribution to
// dH[t] is at most ε·|g_t|·Σ_{j dropped}|W_j| (elementwise), and to dW[j] at most ε·Σ_t |g_t|·|h_t|. A target's
// entry is never dropped, and db always gets the full rows. Returns false when filtering is off.
template <typename T>
bool tile_dlogits(T* z, int64_t rows, int64_t cols, int64_t r0, int64_t v0, const int64_t* labels,
                  const T* g, const double* lse, const Config& cfg, T* db) {
  const bool filter = cfg.grad_filter > 0;
  bool sparse = filter;
  const T scale = static_cast<T>(cfg.scale);
  const bool capped = cfg.softcap > 0;
  const T inv_cap = capped ? static_cast<T>(1.0 / cfg.softcap) : T(0);
  for (int64_t r = 0; r < rows; ++r) {
    T* zr = z + r * cols;
    const int64_t t = r0 + r;
    const T gt = g[t];
    if (gt == T(0)) {
      std::fill(zr, zr + cols, T(0));
      continue;
    }
    const int64_t y = labels[t];
    const bool hit = y >= v0 && y < v0 + cols;  // g is already 0 for ignored tokens
    T chain_y = T(1);
    if (hit && capped) {
      const T c = zr[y - v0] * inv_cap;
      chain_y = T(1) - c * c;
    }
    const auto [hi, lo] = lse_split<T>(lse[t]);
    if (capped) {
      row_dlogits_capped(zr, cols, hi, lo, -gt * scale, inv_cap);
    } else {
      row_dlogits(zr, cols, hi, lo, -gt * scale);
    }
    if (sparse) {  // the largest |dz| off the target (the target's own entry is set aside for the scan)
      const T at_y = hit ? zr[y - v0] : T(0);
      if (hit) zr[y - v0] = T(0);
      const T m = row_absmax(zr, cols);
      if (hit) zr[y - v0] = at_y;
      sparse = static_cast<double>(m) <= cfg.grad_filter * std::fabs(static_cast<double>(gt));
    }
    if (hit) zr[y - v0] += gt * scale * chain_y;
    if (db != nullptr) row_accumulate(db, zr, cols);
  }
  return sparse;
}

// dH rows += dz[t, y_t]·W[y_t] and dW[y_t] += dz[t, y_t]·h_t for the rows whose target lies in this tile (the
// only entries a sparse block keeps; see tile_dlogits).
template <typename T>
void tile_sparse_update(const T* z, int64_t rows, int64_t cols, int64_t r0, int64_t v0, int64_t d,
                        const int64_t* labels, const T* g, const T* h, const T* w_tile, T* dh_rows, T* dw_tile) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = r0 + r, y = labels[t];
    if (g[t] == T(0) || y < v0 || y >= v0 + cols) continue;
    const T c = z[r * cols + (y - v0)];
    const T* wy = w_tile + (y - v0) * d;
    const T* ht = h + t * d;
    if (dh_rows != nullptr) {
      T* out = dh_rows + r * d;
      for (int64_t k = 0; k < d; ++k) out[k] += c * wy[k];
    }
    if (dw_tile != nullptr) {
      T* out = dw_tile + (y - v0) * d;
      for (int64_t k = 0; k < d; ++k) out[k] += c * ht[k];
    }
  }
}

void check_inputs(const Tensor& hidden, const Tensor& weight, const Tensor& labels,
                  const std::optional<Tensor>& bias, const Config& cfg) {
  TORCH_CHECK_VALUE(hidden.device().is_cpu() && weight.device().is_cpu() && labels.device().is_cpu(),
                    "haf_kernels._C: hidden, weight and labels must be CPU tensors");
  TORCH_CHECK_VALUE(hidden.dim() == 2, "haf_kernels._C: hidden must be [N, D], got ", hidden.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2, "haf_kernels._C: weight must be [V, D], got ", weight.sizes());
  TORCH_CHECK_VALUE(weight.size(0) >= 1, "haf_kernels._C: weight needs at least one row (V >= 1), got ",
                    weight.sizes());
  TORCH_CHECK_VALUE(hidden.size(1) == weight.size(1), "haf_kernels._C: hidden [N, D] and weight [V, D] disagree on D: ",
                    hidden.sizes(), " vs ", weight.sizes());
  const auto dt = hidden.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
                   "haf_kernels._C: hidden must be float32/float64/bfloat16/float16, got ", dt);
  TORCH_CHECK_TYPE(weight.scalar_type() == dt, "haf_kernels._C: weight dtype ", weight.scalar_type(),
                   " must match hidden dtype ", dt);
  TORCH_CHECK_VALUE(hidden.is_contiguous() && weight.is_contiguous() && labels.is_contiguous(),
                    "haf_kernels._C: hidden, weight and labels must be contiguous (call .contiguous())");
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, "haf_kernels._C: labels must be int64, got ",
                   labels.scalar_type());
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == hidden.size(0), "haf_kernels._C: labels must be [N] = [",
                    hidden.size(0), "], got ", labels.sizes());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_VALUE(bias->device().is_cpu(), "haf_kernels._C: bias must be a CPU tensor");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), "haf_kernels._C: bias must be [V] = [",
                      weight.size(0), "], got ", bias->sizes());
    TORCH_CHECK_TYPE(bias->is_floating_point(), "haf_kernels._C: bias must be floating point, got ",
                     bias->scalar_type());
  }
  TORCH_CHECK_VALUE(std::isfinite(cfg.scale), "haf_kernels._C: logit_scale must be finite, got ", cfg.scale);
  TORCH_CHECK_VALUE(cfg.chunk_tokens >= 1 && cfg.vocab_tile >= 1, "haf_kernels._C: tile sizes must be positive, got ",
                    cfg.chunk_tokens, " x ", cfg.vocab_tile);
  const int64_t vocab = weight.size(0);
  const int64_t* y = labels.data_ptr<int64_t>();
  for (int64_t i = 0; i < labels.size(0); ++i) {
    TORCH_CHECK_VALUE(y[i] == cfg.ignore_index || (y[i] >= 0 && y[i] < vocab), "haf_kernels._C: labels[", i,
                      "] = ", y[i], " is outside [0, ", vocab, ") and is not ignore_index=", cfg.ignore_index);
  }
}

void check_row_vector(const char* name, const Tensor& t, int64_t n) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "haf_kernels._C: ", name, " must be a CPU tensor");
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, "haf_kernels._C: ", name, " must be [N] = [", n, "], got ",
                    t.sizes());
  TORCH_CHECK_TYPE(t.is_floating_point(), "haf_kernels._C: ", name, " must be floating point, got ", t.scalar_type());
}

Config make_config(int64_t ignore_index, double scale, std::optional<double> softcap, int64_t chunk_tokens,
                   int64_t vocab_tile) {
  if (softcap.has_value()) {
    TORCH_CHECK_VALUE(std::isfinite(*softcap) && *softcap > 0,
                      "haf_kernels._C: softcap must be a positive number, got ", *softcap);
  }
  return Config{ignore_index, scale, softcap.value_or(0.0), chunk_tokens, vocab_tile};
}

// ---------------------------------------------------------------- forward

template <typename T>
std::tuple<Tensor, Tensor> forward_impl(const Tensor& h, const Tensor& weight, const Tensor& labels, const Tensor& bias,
                                        const Config& cfg, T* saved) {
  const int64_t n = h.size(0), d = h.size(1), vocab = weight.size(0);
  const auto opt = h.options();
  const Tiling tl(vocab, std::min(cfg.vocab_tile, vocab));
  const int64_t tc = std::min(cfg.chunk_tokens, std::max<int64_t>(n, 1));
  const int64_t slots = slot_count(tl.count), team = team_size(slots);
  const bool convert = weight.scalar_type() != h.scalar_type();

  Tensor stats = at::empty({2, slots, n}, opt.dtype(at::kDouble));
  Tensor target = at::zeros({n}, opt);
  Tensor scratch = saved == nullptr ? at::empty({team, tc * tl.tile}, opt) : Tensor();
  Tensor wbuf = convert ? at::empty({team, tl.tile * d}, opt) : Tensor();
  double* stats_p = stats.data_ptr<double>();
  T* target_p = target.data_ptr<T>();
  const T* h_p = h.const_data_ptr<T>();
  const T* b_p = bias.defined() ? bias.const_data_ptr<T>() : nullptr;
  const int64_t* y_p = labels.const_data_ptr<int64_t>();

  run_slots(slots, [&](int64_t slot, int64_t tid) {
    double* run_max = stats_p + slot * n;
    double* run_sum = stats_p + (slots + slot) * n;
    std::fill(run_max, run_max + n, -std::numeric_limits<double>::infinity());
    std::fill(run_sum, run_sum + n, 0.0);
    const auto [k0, k1] = share(tl.count, slots, slot);
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t v0 = tl.begin(k), cols = tl.width(k);
      Tensor wt = weight_tile<T>(weight, tl, k, convert ? wbuf.data_ptr<T>() + tid * tl.tile * d : nullptr);
      for (int64_t r0 = 0; r0 < n; r0 += tc) {
        const int64_t rows = std::min(tc, n - r0);
        T* z = saved != nullptr ? saved + n * v0 + r0 * cols : scratch.data_ptr<T>() + tid * tc * tl.tile;
        Tensor zt = blob(z, {rows, cols});
        at::mm_out(zt, blob(const_cast<T*>(h_p) + r0 * d, {rows, d}), wt.t());
        transform_rows(z, rows, cols, b_p == nullptr ? nullptr : b_p + v0, cfg);
        tile_stats(z, rows, cols, r0, v0, y_p, cfg, run_max, run_sum, target_p);
      }
    }
  });

  // lse in float64: hi + lo of the backward's row_dlogits (one fp32 rounding of a large lse would cost the
  // target's 1 − p of a peaked row most of its accuracy); logp = target − lse rounded once.
  Tensor logp = at::empty({n}, opt);
  Tensor lse = at::empty({n}, opt.dtype(at::kDouble));
  T* logp_p = logp.data_ptr<T>();
  double* lse_p = lse.data_ptr<double>();
  at::parallel_for(0, n, 1024, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      double m = -std::numeric_limits<double>::infinity(), s = 0.0;
      bool nan = false;
      for (int64_t i = 0; i < slots; ++i) {
        const double mi = stats_p[i * n + t], si = stats_p[(slots + i) * n + t];
        if (std::isnan(mi) || std::isnan(si)) nan = true;
        if (si == 0.0) continue;  // this slot saw no logits (cannot happen: slots <= tiles; be safe)
        if (m < mi) {
          s = s * std::exp(m - mi) + si;
          m = mi;
        } else {
          s += si * std::exp(mi - m);
        }
      }
      const double l = nan ? std::numeric_limits<double>::quiet_NaN() : m + std::log(s);
      lse_p[t] = l;
      logp_p[t] = y_p[t] == cfg.ignore_index ? T(0) : static_cast<T>(static_cast<double>(target_p[t]) - l);
    }
  });
  return {logp, lse};
}

// ---------------------------------------------------------------- backward

template <typename T>
std::tuple<Tensor, Tensor, Tensor> backward_impl(const Tensor& g_in, const Tensor& h, const Tensor& weight,
                                                 const Tensor& labels, const Tensor& bias, const Tensor& lse,
                                                 const Config& cfg, bool need_h, bool need_w, bool need_b, T* saved,
                                                 const Tensor& dw_acc, const Tensor& db_acc) {
  const int64_t n = h.size(0), d = h.size(1), vocab = weight.size(0);
  const auto opt = h.options();
  const Tiling tl(vocab, std::min(cfg.vocab_tile, vocab));
  // Filtering decides per block: smaller token chunks let more blocks qualify (peaky regime, 512 tokens × 32k ×
  // 512, ε = 2^-12: 15 of 32 blocks of 512 rows, 106 of 128 of 128 rows; the saved layout does not depend on it).
  const int64_t chunk = cfg.grad_filter > 0 ? std::min(cfg.chunk_tokens, kFilterChunkTokens) : cfg.chunk_tokens;
  const int64_t tc = std::min(chunk, std::max<int64_t>(n, 1));
  const int64_t slots = slot_count(tl.count), team = team_size(slots);
  const bool convert = weight.scalar_type() != h.scalar_type();
  need_b = need_b && bias.defined();

  Tensor dh = need_h ? at::zeros({n, d}, opt) : Tensor();
  // With dw_acc / db_acc (contiguous, compute dtype) the gradients are added into those buffers instead.
  const bool accumulate = need_w && dw_acc.defined();
  Tensor dw = need_w ? (accumulate ? dw_acc : at::empty({vocab, d}, opt)) : Tensor();
  Tensor db = need_b ? (db_acc.defined() ? db_acc : at::zeros({vocab}, opt)) : Tensor();
  if (n == 0 || !(need_h || need_w || need_b)) {
    if (need_w && !accumulate) dw.zero_();
    return {dh, dw, db};
  }

  // g with ignored tokens zeroed, and which token chunks have any non-zero gradient at all.
  Tensor g = at::empty({n}, opt);
  T* g_p = g.data_ptr<T>();
  const T* gin_p = g_in.const_data_ptr<T>();
  const int64_t* y_p = labels.const_data_ptr<int64_t>();
  const int64_t n_chunks = (n + tc - 1) / tc;
  std::vector<char> active(n_chunks, 0);
  for (int64_t t = 0; t < n; ++t) {
    g_p[t] = y_p[t] == cfg.ignore_index ? T(0) : gin_p[t];
    if (g_p[t] != T(0)) active[t / tc] = 1;
  }

  // Token blocks bound the per-slot dH partials (slots 1.. accumulate into private buffers).
  int64_t block = n;
  if (need_h && slots > 1) {
    const int64_t per_row = (slots - 1) * d * static_cast<int64_t>(sizeof(T));
    block = std::max<int64_t>(tc, (cfg.partial_bytes / std::max<int64_t>(per_row, 1)) / tc * tc);
    block = std::min(block, n);
  }
  Tensor parts = need_h && slots > 1 ? at::empty({slots - 1, block, d}, opt) : Tensor();
  Tensor scratch = saved == nullptr ? at::empty({team, tc * tl.tile}, opt) : Tensor();
  Tensor wbuf = convert ? at::empty({team, tl.tile * d}, opt) : Tensor();
  const T* h_p = h.const_data_ptr<T>();
  const T* b_p = bias.defined() ? bias.const_data_ptr<T>() : nullptr;
  const double* lse_p = lse.const_data_ptr<double>();
  T* dh_p = need_h ? dh.data_ptr<T>() : nullptr;
  T* dw_p = need_w ? dw.data_ptr<T>() : nullptr;
  T* db_p = need_b ? db.data_ptr<T>() : nullptr;
  T* parts_p = parts.defined() ? parts.data_ptr<T>() : nullptr;

  std::atomic<int64_t> all_blocks{0}, all_sparse{0};
  for (int64_t b0 = 0; b0 < n; b0 += block) {
    const int64_t nb = std::min(block, n - b0);
    run_slots(slots, [&](int64_t slot, int64_t tid) {
      int64_t blocks = 0, sparse_blocks = 0;
      T* dh_acc = nullptr;
      if (need_h) {
        dh_acc = slot == 0 ? dh_p + b0 * d : parts_p + (slot - 1) * block * d;
        if (slot > 0) std::fill(dh_acc, dh_acc + nb * d, T(0));
      }
      const auto [k0, k1] = share(tl.count, slots, slot);
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t v0 = tl.begin(k), cols = tl.width(k);
        Tensor dw_tile = need_w ? blob(dw_p + v0 * d, {cols, d}) : Tensor();
        bool dw_written = accumulate || b0 > 0;  // else block 0's first active chunk overwrites its dW rows
        Tensor wt = weight_tile<T>(weight, tl, k, convert ? wbuf.data_ptr<T>() + tid * tl.tile * d : nullptr);
        for (int64_t r0 = b0; r0 < b0 + nb; r0 += tc) {
          if (!active[r0 / tc]) continue;
          const int64_t rows = std::min(tc, b0 + nb - r0);
          Tensor h_rows = blob(const_cast<T*>(h_p) + r0 * d, {rows, d});
          T* z;
          if (saved != nullptr) {
            z = saved + n * v0 + r0 * cols;
          } else {
            z = scratch.data_ptr<T>() + tid * tc * tl.tile;
            Tensor zt = blob(z, {rows, cols});
            at::mm_out(zt, h_rows, wt.t());
            transform_rows(z, rows, cols, b_p == nullptr ? nullptr : b_p + v0, cfg);
          }
          const bool sparse = tile_dlogits(z, rows, cols, r0, v0, y_p, g_p, lse_p, cfg, need_b ? db_p + v0 : nullptr);
          ++blocks;
          if (sparse) {
            ++sparse_blocks;
            if (need_w && !dw_written) {
              dw_tile.zero_();
              dw_written = true;
            }
            tile_sparse_update(z, rows, cols, r0, v0, d, y_p, g_p, h_p, wt.const_data_ptr<T>(),
                               need_h ? dh_acc + (r0 - b0) * d : nullptr, need_w ? dw_p + v0 * d : nullptr);
            continue;
          }
          Tensor dz = blob(z, {rows, cols});
          if (need_h) blob(dh_acc + (r0 - b0) * d, {rows, d}).addmm_(dz, wt);
          if (need_w && dw_written) {
            dw_tile.addmm_(dz.t(), h_rows);
          } else if (need_w) {
            at::mm_out(dw_tile, dz.t(), h_rows);
            dw_written = true;
          }
        }
        if (need_w && !dw_written) dw_tile.zero_();
      }
      all_blocks += blocks;
      all_sparse += sparse_blocks;
    });
    if (need_h && slots > 1) {
      T* dst = dh_p + b0 * d;
      at::parallel_for(0, nb, 64, [&](int64_t lo, int64_t hi) {
        for (int64_t i = 1; i < slots; ++i) {
          const T* src = parts_p + (i - 1) * block * d;
          for (int64_t r = lo; r < hi; ++r) row_accumulate(dst + r * d, src + r * d, d);
        }
      });
    }
  }
  g_blocks = all_blocks.load();
  g_sparse_blocks = all_sparse.load();
  return {dh, dw, db};
}

// ---------------------------------------------------------------- typed host launchers

// Inputs in the compute dtype T (float64 stays float64, everything else float32); the weight keeps its dtype
// and is converted one vocab tile at a time.
struct Prepared {
  Tensor h, weight, labels, bias;
  at::ScalarType compute;
};

Prepared prepare(const Tensor& hidden, const Tensor& weight, const Tensor& labels, const std::optional<Tensor>& bias,
                 const Config& cfg) {
  check_inputs(hidden, weight, labels, bias, cfg);
  const at::ScalarType ct = hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Prepared p;
  p.compute = ct;
  p.h = hidden.detach().to(ct).contiguous();
  p.weight = weight.detach();
  p.labels = labels.detach();
  if (bias.has_value() && bias->defined()) p.bias = bias->detach().to(ct).contiguous();
  return p;
}

std::tuple<Tensor, Tensor> forward(const Tensor& hidden, const Tensor& weight, const Tensor& labels,
                                   const std::optional<Tensor>& bias, int64_t ignore_index, double logit_scale,
                                   std::optional<double> softcap, int64_t chunk_tokens, int64_t vocab_tile) {
  const Config cfg = make_config(ignore_index, logit_scale, softcap, chunk_tokens, vocab_tile);
  Prepared p = prepare(hidden, weight, labels, bias, cfg);
  if (p.compute == at::kDouble) return forward_impl<double>(p.h, p.weight, p.labels, p.bias, cfg, nullptr);
  return forward_impl<float>(p.h, p.weight, p.labels, p.bias, cfg, nullptr);
}

// The kept-logits buffer of forward_keep: `out` when the caller passes one (the whole-loss path hands each chunk the
// buffer the previous chunk's backward_saved consumed), else a fresh one. A fresh [N·V] buffer costs its first-touch
// page faults every time: 52-61 ms for 62.5 MiB on the 2-core VM, next to ~200 ms for the chunk's forward GEMM.
Tensor keep_buffer(int64_t numel, const at::TensorOptions& opt, const std::optional<Tensor>& out) {
  if (!out.has_value() || !out->defined()) return at::empty({numel}, opt);
  const Tensor& o = *out;
  TORCH_CHECK_VALUE(o.device().is_cpu() && o.scalar_type() == opt.dtype().toScalarType() && o.is_contiguous() &&
                        o.numel() >= numel,
                    "haf_kernels._C: out must be a contiguous CPU ", opt.dtype().toScalarType(),
                    " tensor of at least N*V = ", numel, " elements, got ", o.sizes(), " ", o.scalar_type(), " on ",
                    o.device());
  return o.view({-1}).narrow(0, 0, numel);
}

std::tuple<Tensor, Tensor, Tensor> forward_keep(const Tensor& hidden, const Tensor& weight, const Tensor& labels,
                                                const std::optional<Tensor>& bias, int64_t ignore_index,
                                                double logit_scale, std::optional<double> softcap,
                                                int64_t chunk_tokens, int64_t vocab_tile,
                                                const std::optional<Tensor>& out) {
  const Config cfg = make_config(ignore_index, logit_scale, softcap, chunk_tokens, vocab_tile);
  Prepared p = prepare(hidden, weight, labels, bias, cfg);
  Tensor saved = keep_buffer(hidden.size(0) * weight.size(0), p.h.options(), out);
  if (p.compute == at::kDouble) {
    auto [logp, lse] = forward_impl<double>(p.h, p.weight, p.labels, p.bias, cfg, saved.data_ptr<double>());
    return {logp, lse, saved};
  }
  auto [logp, lse] = forward_impl<float>(p.h, p.weight, p.labels, p.bias, cfg, saved.data_ptr<float>());
  return {logp, lse, saved};
}

std::tuple<Tensor, Tensor, Tensor> backward_common(const std::optional<Tensor>& saved, const Tensor& grad_logp,
                                                   const Tensor& hidden, const Tensor& weight, const Tensor& labels,
                                                   const std::optional<Tensor>& bias, const Tensor& lse,
                                                   int64_t ignore_index, double logit_scale,
                                                   std::optional<double> softcap, int64_t chunk_tokens,
                                                   int64_t vocab_tile, bool need_h, bool need_w, bool need_b,
                                                   int64_t partial_bytes, double grad_filter,
                                                   const std::optional<Tensor>& dw_acc_in = std::nullopt,
                                                   const std::optional<Tensor>& db_acc_in = std::nullopt) {
  Config cfg = make_config(ignore_index, logit_scale, softcap, chunk_tokens, vocab_tile);
  TORCH_CHECK_VALUE(partial_bytes >= 1, "haf_kernels._C: partial_bytes must be positive, got ", partial_bytes);
  cfg.partial_bytes = partial_bytes;
  TORCH_CHECK_VALUE(grad_filter >= 0 && std::isfinite(grad_filter),
                    "haf_kernels._C: grad_filter must be a finite number >= 0, got ", grad_filter);
  cfg.grad_filter = grad_filter;
  Prepared p = prepare(hidden, weight, labels, bias, cfg);
  const int64_t n = hidden.size(0);
  check_row_vector("grad_logp", grad_logp, n);
  check_row_vector("lse", lse, n);
  Tensor g = grad_logp.detach().to(p.compute).contiguous();
  Tensor l = lse.detach().to(at::kDouble).contiguous();
  Tensor buf;
  if (saved.has_value() && saved->defined()) {
    buf = *saved;
    TORCH_CHECK(buf.scalar_type() == p.compute && buf.is_contiguous() && buf.numel() == n * weight.size(0),
                "haf_kernels._C: saved must be the buffer forward_keep returned for these inputs ([N*V] ",
                p.compute, "), got ", buf.sizes(), " ", buf.scalar_type());
  }
  auto check_acc = [&](const char* name, const std::optional<Tensor>& acc, std::vector<int64_t> shape) {
    if (!acc.has_value() || !acc->defined()) return Tensor();
    TORCH_CHECK_VALUE(acc->scalar_type() == p.compute && acc->is_contiguous() && acc->sizes() == shape, "haf_kernels._C: ",
                      name, " must be a contiguous ", p.compute, " tensor of shape ", at::IntArrayRef(shape), ", got ",
                      acc->sizes(), " ", acc->scalar_type());
    return *acc;
  };
  Tensor dw_acc = check_acc("dw_acc", dw_acc_in, {weight.size(0), weight.size(1)});
  Tensor db_acc = check_acc("db_acc", db_acc_in, {weight.size(0)});
  if (p.compute == at::kDouble) {
    return backward_impl<double>(g, p.h, p.weight, p.labels, p.bias, l, cfg, need_h, need_w, need_b,
                                 buf.defined() ? buf.data_ptr<double>() : nullptr, dw_acc, db_acc);
  }
  return backward_impl<float>(g, p.h, p.weight, p.labels, p.bias, l, cfg, need_h, need_w, need_b,
                              buf.defined() ? buf.data_ptr<float>() : nullptr, dw_acc, db_acc);
}

std::tuple<Tensor, Tensor, Tensor> backward(const Tensor& grad_logp, const Tensor& hidden, const Tensor& weight,
                                            const Tensor& labels, const std::optional<Tensor>& bias, const Tensor& lse,
                                            int64_t ignore_index, double logit_scale, std::optional<double> softcap,
                                            int64_t chunk_tokens, int64_t vocab_tile, bool need_h, bool need_w,
                                            bool need_b, int64_t partial_bytes, double grad_filter) {
  return backward_common(std::nullopt, grad_logp, hidden, weight, labels, bias, lse, ignore_index, logit_scale,
                         softcap, chunk_tokens, vocab_tile, need_h, need_w, need_b, partial_bytes, grad_filter);
}

std::tuple<Tensor, Tensor, Tensor> backward_saved(const Tensor& saved, const Tensor& grad_logp, const Tensor& hidden,
                                                  const Tensor& weight, const Tensor& labels,
                                                  const std::optional<Tensor>& bias, const Tensor& lse,
                                                  int64_t ignore_index, double logit_scale,
                                                  std::optional<double> softcap, int64_t chunk_tokens,
                                                  int64_t vocab_tile, bool need_h, bool need_w, bool need_b,
                                                  const std::optional<Tensor>& dw_acc,
                                                  const std::optional<Tensor>& db_acc, int64_t partial_bytes,
                                                  double grad_filter) {
  TORCH_CHECK(saved.defined(), "haf_kernels._C: saved must be the tensor returned by forward_keep");
  return backward_common(saved, grad_logp, hidden, weight, labels, bias, lse, ignore_index, logit_scale, softcap,
                         chunk_tokens, vocab_tile, need_h, need_w, need_b, partial_bytes, grad_filter, dw_acc,
                         db_acc);
}

}  // namespace
}  // namespace haf

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "haf_kernels C++ CPU backend: fused linear + log-softmax + target pick (OpenMP, ATen GEMMs)";
  namespace py = pybind11;
  m.def("forward", &haf::forward, "logp[N], lse[N] (recompute strategy: keeps nothing)", py::arg("hidden"),
        py::arg("weight"), py::arg("labels"), py::arg("bias"), py::arg("ignore_index"), py::arg("logit_scale"),
        py::arg("softcap"), py::arg("chunk_tokens"), py::arg("vocab_tile"));
  m.def("forward_keep", &haf::forward_keep, "logp[N], lse[N], saved[N*V] (logits kept tile-major for backward_saved)",
        py::arg("hidden"), py::arg("weight"), py::arg("labels"), py::arg("bias"), py::arg("ignore_index"),
        py::arg("logit_scale"), py::arg("softcap"), py::arg("chunk_tokens"), py::arg("vocab_tile"),
        py::arg("out") = py::none());
  m.def("backward", &haf::backward, "dh[N,D], dw[V,D], db[V] in the compute dtype; recomputes the logits",
        py::arg("grad_logp"), py::arg("hidden"), py::arg("weight"), py::arg("labels"), py::arg("bias"), py::arg("lse"),
        py::arg("ignore_index"), py::arg("logit_scale"), py::arg("softcap"), py::arg("chunk_tokens"),
        py::arg("vocab_tile"), py::arg("need_h"), py::arg("need_w"), py::arg("need_b"),
        py::arg("partial_bytes") = int64_t(64) << 20, py::arg("grad_filter") = 0.0);
  m.def("backward_saved", &haf::backward_saved,
        "dh, dw, db from the logits kept by forward_keep (consumed: overwritten with dL/dlogits)", py::arg("saved"),
        py::arg("grad_logp"), py::arg("hidden"), py::arg("weight"), py::arg("labels"), py::arg("bias"), py::arg("lse"),
        py::arg("ignore_index"), py::arg("logit_scale"), py::arg("softcap"), py::arg("chunk_tokens"),
        py::arg("vocab_tile"), py::arg("need_h"), py::arg("need_w"), py::arg("need_b"),
        py::arg("dw_acc") = py::none(), py::arg("db_acc") = py::none(), py::arg("partial_bytes") = int64_t(64) << 20,
        py::arg("grad_filter") = 0.0);
  m.def(
      "filter_stats", []() { return std::make_tuple(haf::g_blocks.load(), haf::g_sparse_blocks.load()); },
      "(blocks, sparse blocks) of the last backward call: blocks whose dH / dW GEMMs gradient filtering replaced");
  m.def("isa", &haf::isa_active, "instruction set of the float row kernels in use (x86-64-v4, x86-64-v3, default)");
  m.def("isa_supported", &haf::isa_supported, "instruction sets this CPU and build can run, best first");
  m.def("set_isa", &haf::set_isa, "force the float row kernels' instruction set ('auto' = best supported)",
        py::arg("name"));
  m.def("num_threads", []() { return haf::max_threads(); }, "threads the kernels will use (at::get_num_threads)");
}
