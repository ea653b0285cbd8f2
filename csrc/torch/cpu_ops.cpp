// CPU kernels of the setok ops: argument checks, one Gram GEMM (or direct differences
// for small D), then the core row kernels under at::parallel_for. No Python loops, no
// per-image launches: every pass covers all images x rows at once.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <chrono>
#include <stdexcept>
#include <thread>
#include <vector>

#include "core/dpc_cpu.h"
#include "torch/common.h"
#include "torch/profile.h"

namespace setok {
namespace {

using at::Tensor;
using c10::optional;

// Row grain for parallel_for: rows are O(N) work each.
int64_t row_grain(int64_t N) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1)); }

const bool* valid_ptr(const optional<Tensor>& v, int64_t b, int64_t N) {
  return v.has_value() ? v->data_ptr<bool>() + b * N : nullptr;
}

// What a call needs from the pipeline.
struct Plan {
  bool density = false, delta = false, scope = false;
  int64_t k = 1;
  const Tensor* density_in = nullptr;  // delta_distance: densities given by the caller
  const Tensor* score_in = nullptr;    // scope_cluster: scores given by the caller
  double bandwidth = 1.0, min_scope = 0.0;
  int64_t T = 0;
  bool hard = true;
  optional<double> threshold;
};

struct Out {
  Tensor density, delta, parent, score, masks, seeds, num, seed_d2;
};

// Neighbour lists handed from the density sweep to the delta sweep: rows x k_eff, written
// and read per panel (a panel's rows start at its first row's slot of a buffer whose rows
// hold kmax >= k_eff entries, so panels never overlap).
template <typename scalar_t>
struct Knn {
  int32_t* idx = nullptr;
  scalar_t* kth = nullptr;
  int64_t k_eff = 0;
};

// The distance matrix is built in column panels of kPanel columns: panel I is the columns
// [i0, i1) from the diagonal downwards only (about half the GEMM flops of x x^T), and the
// rows [i0, i1) above the diagonal are then mirrored from it, so the matrix is exactly
// symmetric. Column panels of 96 ran fastest of row and column panels of 64-144 and of one
// full GEMM (MKL, single-threaded, N=576, D=1024 and 64; with AVX-512 and held to AVX2,
// there within 5% of the best); direct differences (small D) gain the most.
constexpr int64_t kPanel = 96;

struct Panels {
  int64_t n;  // number of panels
  int64_t begin(int64_t I) const { return I * kPanel; }
  int64_t end(int64_t I, int64_t N) const { return std::min(N, (I + 1) * kPanel); }
};

Panels panels_of(int64_t N) { return {(N + kPanel - 1) / kPanel}; }

// Below this many distance entries (B x N x N) a call runs on the calling thread: waking a
// second thread costs more than the work, and under load a scheduler time slice (ms).
constexpr int64_t kMinParallelEntries = 16384;

// One image: its features and its (N, N) distance buffer, as tensors (for the GEMM) and
// pointers.
template <typename scalar_t>
struct Image {
  Tensor xb, d2t;  // (N, D), (N, N)
  const scalar_t* x;
  scalar_t* d2;
  scalar_t* sq;  // (N) squared norms
  const bool* valid;
  int64_t b;
};

// Panel I of the Gram matrix (one single-threaded GEMM into the distance buffer) or of the
// direct differences, turned into squared distances while in cache. Needs the squared norms
// of rows [i0, N).
template <typename scalar_t>
void gram_panel(const Image<scalar_t>& im, int64_t N, int64_t D, const Panels& pn, int64_t I) {
  const int64_t i0 = pn.begin(I), i1 = pn.end(I, N);  // rows [i0, N) x columns [i0, i1)
  if (D <= core::kDirectMaxD) {
    core::sqdist_rows_direct(im.x, im.d2, N, D, i0, N, i0, i1);
    return;
  }
  Tensor out = im.d2t.narrow(0, i0, N - i0).narrow(1, i0, i1 - i0);  // strides (N, 1): GEMM writes in place
  at::mm_out(out, im.xb.narrow(0, i0, N - i0), im.xb.narrow(0, i0, i1 - i0).t());
  core::sqdist_rows_from_gram(im.d2, im.sq, N, D, i0, N, i0, i1);
}

// Rows [i0, i1) of panel I (needs panels 0..I): above the diagonal from panel I, then
// densities and neighbour lists (nn: the panel's slots).
template <typename scalar_t>
void panel_rows(const Plan& p, const Image<scalar_t>& im, int64_t N, Out& o, const Panels& pn, int64_t I,
                std::vector<scalar_t>& scratch, Knn<scalar_t> nn) {
  const int64_t i0 = pn.begin(I), i1 = pn.end(I, N);
  core::mirror_upper_rows(im.d2, N, i0, i1);
  if (p.density)
    core::knn_density_rows(im.d2, im.valid, N, p.k, core::count_valid(im.valid, N),
                           o.density.data_ptr<scalar_t>() + im.b * N, i0, i1, scratch.data(), nn.idx, nn.kth);
}

// Delta, parent and score of the rows of panel I (needs every density of the image).
template <typename scalar_t>
void panel_delta(const Plan& p, const Image<scalar_t>& im, int64_t N, Out& o, const Panels& pn, int64_t I,
                 Knn<scalar_t> nn) {
  const int64_t i0 = pn.begin(I), i1 = pn.end(I, N), b = im.b;
  const scalar_t* den = (p.density_in ? *p.density_in : o.density).template data_ptr<scalar_t>() + b * N;
  scalar_t* dl = o.delta.data_ptr<scalar_t>() + b * N;
  core::delta_rows(im.d2, den, im.valid, N, dl, o.parent.data_ptr<int64_t>() + b * N, i0, i1, nn.idx, nn.kth,
                   nn.k_eff);
  if (o.score.defined()) {
    scalar_t* sc = o.score.data_ptr<scalar_t>() + b * N;
    for (int64_t i = i0; i < i1; ++i) sc[i] = den[i] * dl[i];
  }
}

template <typename scalar_t>
void image_scope(const Plan& p, const Image<scalar_t>& im, int64_t N, Out& o, std::vector<scalar_t>& scope) {
  const int64_t T = p.T, b = im.b;
  const scalar_t* sc = (p.score_in ? *p.score_in : o.score).template data_ptr<scalar_t>() + b * N;
  o.num.data_ptr<int64_t>()[b] = core::scope_loop(
      im.d2, sc, im.valid, N, T, p.bandwidth, p.hard, p.min_scope, p.threshold.has_value(),
      p.threshold.value_or(0.0), o.masks.data_ptr<scalar_t>() + b * (T + 1) * N, o.seeds.data_ptr<int64_t>() + b * T,
      o.seed_d2.data_ptr<scalar_t>() + b * T * N, scope.data());
}

// Waits (yielding the core) until `ready` holds; gives up if another task failed, so an
// exception never leaves a thread waiting for work that will not come. Adds the time
// waited to *waited_ns when profiling (non-null).
template <typename F>
void wait_until(F ready, const std::atomic<bool>& failed, int64_t* waited_ns) {
  if (ready()) return;
  const auto t0 = std::chrono::steady_clock::now();
  while (!ready()) {
    if (failed.load(std::memory_order_relaxed)) throw std::runtime_error("setok: a pipeline task failed");
    std::this_thread::yield();
  }
  if (waited_ns != nullptr)
    *waited_ns += std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count();
}

// Task kinds of the region, in list order (names for the profile).
enum TaskKind { kNorms, kPanels, kRows, kDelta, kScope, kWaitKind, kKinds };
constexpr const char* kKindNames[kKinds] = {"norms", "gram panels", "rows+density", "delta", "scope", "wait"};

// The whole pipeline. With at least as many images as threads, each thread runs whole
// images (its own N x N buffer): the distance matrix stays in cache between passes and
// peak memory is threads x N^2, not B x N^2. With fewer images, one parallel region runs a
// list of tasks that the threads claim in order from a shared counter: squared norms, Gram
// panels, mirrored rows + densities, delta, scope loop (per image and panel). A task waits
// only for tasks listed before it (claimed by threads that are running), so the list
// cannot deadlock, whatever the number of threads that join; a thread that starts late
// (descheduled under load) simply finds less left to do. One region, no barrier: at B=1 a
// second region costs about as much as the passes, and under load a time slice.
Out run_pipeline(const Tensor& x_in, const optional<Tensor>& valid, const Plan& p) {
  PhaseClock clock;
  const Tensor x = x_in.detach();  // x may require grad; nothing here is differentiated
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  const bool need_d2_rows = p.density || p.delta || p.scope;
  Out o;
  if (p.density) o.density = at::empty({B, N}, x.options());
  if (p.delta) {
    o.delta = at::empty({B, N}, x.options());
    o.parent = at::empty({B, N}, x.options().dtype(at::kLong));
    if (p.density) o.score = at::empty({B, N}, x.options());
  }
  if (p.scope) {
    o.masks = at::empty({B, p.T + 1, N}, x.options());
    o.seeds = at::empty({B, p.T}, x.options().dtype(at::kLong));
    o.num = at::empty({B}, x.options().dtype(at::kLong));
    o.seed_d2 = at::empty({B, p.T, N}, x.options());
  }
  clock.lap("outputs");
  if (!need_d2_rows || B == 0 || N == 0) return o;
  const bool gram = D > core::kDirectMaxD;
  const int64_t threads = at::get_num_threads();
  const int64_t kmax = std::min<int64_t>(p.k, N);
  // the density sweep keeps each row's neighbours so the delta sweep rarely scans a row
  const bool use_knn = p.density && p.delta && p.k <= core::kSmallK;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "setok_pipeline_cpu", [&] {
    scalar_t* const xp = x.data_ptr<scalar_t>();
    if (B >= threads) {
      const Panels pn = panels_of(N);
      const int64_t nb = pn.n;
      at::parallel_for(0, B, std::max<int64_t>(1, kMinParallelEntries / (N * N)), [&](int64_t begin, int64_t end) {
        Tensor buf = at::empty({N, N}, x.options());
        std::vector<scalar_t> sq(N), scratch(p.k > core::kSmallK ? N : 0), scope(N), kth(use_knn ? N : 0);
        std::vector<int32_t> knn_idx(use_knn ? N * kmax : 0);
        for (int64_t b = begin; b < end; ++b) {
          const Image<scalar_t> im{x[b], buf, xp + b * N * D, buf.data_ptr<scalar_t>(), sq.data(),
                                   valid_ptr(valid, b, N), b};
          const int64_t k_eff = core::effective_k(p.k, core::count_valid(im.valid, N));
          auto nn = [&](int64_t I) {
            Knn<scalar_t> r;
            if (use_knn) r = {knn_idx.data() + pn.begin(I) * kmax, kth.data() + pn.begin(I), k_eff};
            return r;
          };
          if (gram) core::squared_norms(im.x, N, D, sq.data());
          for (int64_t I = 0; I < nb; ++I) gram_panel(im, N, D, pn, I);
          for (int64_t I = 0; I < nb; ++I) panel_rows(p, im, N, o, pn, I, scratch, nn(I));
          if (p.delta)
            for (int64_t I = 0; I < nb; ++I) panel_delta(p, im, N, o, pn, I, nn(I));
          if (p.scope) image_scope(p, im, N, o, scope);
        }
      });
      clock.lap("whole images");
      return;
    }
    const Panels pn = panels_of(N);
    const int64_t nb = pn.n;
    Tensor d2t = at::empty({B, N, N}, x.options());
    std::vector<scalar_t> sq(gram ? B * N : 0), kth(use_knn ? B * N : 0);
    std::vector<int32_t> knn_idx(use_knn ? B * N * kmax : 0);
    std::vector<Image<scalar_t>> ims;
    std::vector<int64_t> k_eff(B);
    for (int64_t b = 0; b < B; ++b) {
      ims.push_back({x[b], d2t[b], xp + b * N * D, d2t.data_ptr<scalar_t>() + b * N * N,
                     gram ? sq.data() + b * N : nullptr, valid_ptr(valid, b, N), b});
      k_eff[b] = core::effective_k(p.k, core::count_valid(ims[b].valid, N));
    }
    auto nn = [&](int64_t b, int64_t I) {
      Knn<scalar_t> r;
      if (use_knn) r = {knn_idx.data() + (b * N + pn.begin(I)) * kmax, kth.data() + b * N + pn.begin(I), k_eff[b]};
      return r;
    };
    // the task list, stage by stage, each stage by panel then image (the longest panels,
    // the first ones, go first)
    const int64_t per = B * nb;
    const int64_t n_norms = gram ? per : 0, n_delta = p.delta ? per : 0, n_scope = p.scope ? B : 0;
    const int64_t total = n_norms + 2 * per + n_delta + n_scope;
    std::atomic<int64_t> next{0};
    std::atomic<bool> failed{false};
    std::vector<std::atomic<int64_t>> norms_done(B), rows_done(B), delta_done(B);
    std::vector<std::atomic<bool>> panel_done(per);
    for (int64_t b = 0; b < B; ++b) norms_done[b] = rows_done[b] = delta_done[b] = 0;
    for (auto& f : panel_done) f = false;
    // returns the task's kind; waits add to *w (profiling) or are not timed (nullptr)
    auto run_task = [&](int64_t t, std::vector<scalar_t>& scratch, std::vector<scalar_t>& scope,
                        int64_t* w) -> TaskKind {
      if (t < n_norms) {
        const int64_t I = t / B, b = t % B, i0 = pn.begin(I), i1 = pn.end(I, N);
        core::squared_norms(ims[b].x + i0 * D, i1 - i0, D, ims[b].sq + i0);
        norms_done[b].fetch_add(1, std::memory_order_acq_rel);
        return kNorms;
      }
      t -= n_norms;
      if (t < per) {
        const int64_t I = t / B, b = t % B;
        if (gram) wait_until([&] { return norms_done[b].load(std::memory_order_acquire) == nb; }, failed, w);
        gram_panel(ims[b], N, D, pn, I);
        panel_done[b * nb + I].store(true, std::memory_order_release);
        return kPanels;
      }
      t -= per;
      if (t < per) {
        const int64_t I = t / B, b = t % B;
        for (int64_t J = 0; J <= I; ++J)
          wait_until([&] { return panel_done[b * nb + J].load(std::memory_order_acquire); }, failed, w);
        panel_rows(p, ims[b], N, o, pn, I, scratch, nn(b, I));
        rows_done[b].fetch_add(1, std::memory_order_acq_rel);
        return kRows;
      }
      t -= per;
      if (t < n_delta) {
        const int64_t I = t / B, b = t % B;
        wait_until([&] { return rows_done[b].load(std::memory_order_acquire) == nb; }, failed, w);
        panel_delta(p, ims[b], N, o, pn, I, nn(b, I));
        delta_done[b].fetch_add(1, std::memory_order_acq_rel);
        return kDelta;
      }
      t -= n_delta;
      const int64_t b = t;
      auto& before = p.delta ? delta_done : rows_done;
      wait_until([&] { return before[b].load(std::memory_order_acquire) == nb; }, failed, w);
      scope.resize(N);
      image_scope(p, ims[b], N, o, scope);
      return kScope;
    };
    clock.lap("setup");
    const bool prof = clock.on();
    std::array<std::atomic<int64_t>, kKinds> kind_ns;
    for (auto& v : kind_ns) v = 0;
    auto worker = [&](int64_t, int64_t) {
      std::vector<scalar_t> scratch(p.k > core::kSmallK ? N : 0), scope;
      try {
        for (int64_t t; (t = next.fetch_add(1, std::memory_order_relaxed)) < total;) {
          if (!prof) {
            run_task(t, scratch, scope, nullptr);
            continue;
          }
          int64_t waited = 0;
          const auto t0 = std::chrono::steady_clock::now();
          const TaskKind kind = run_task(t, scratch, scope, &waited);
          const int64_t ns =
              std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count();
          kind_ns[kind] += ns - waited;
          kind_ns[kWaitKind] += waited;
        }
      } catch (...) {
        failed = true;
        throw;
      }
    };
    if (B * N * N < kMinParallelEntries)
      worker(0, 1);
    else
      at::parallel_for(0, threads, 1, worker);
    if (prof)
      for (int k = 0; k < kKinds; ++k) profile_tasks().emplace_back(kKindNames[k], kind_ns[k].load() * 1e-6);
    clock.lap("task region");
  });
  return o;
}

// ---- ops ----------------------------------------------------------------------------

Tensor knn_density(const Tensor& x, int64_t k, const optional<Tensor>& valid_in) {
  check_x(x);
  check_valid(valid_in, x);
  TORCH_CHECK(k >= 1, "setok: k must be >= 1, got ", k);
  Plan p;
  p.density = true;
  p.k = k;
  return run_pipeline(x, contiguous_valid(valid_in), p).density;
}

std::tuple<Tensor, Tensor> delta_distance(const Tensor& x, const Tensor& density_in, const optional<Tensor>& valid_in) {
  check_x(x);
  check_bn("density", density_in, x);
  check_valid(valid_in, x);
  Tensor density = density_in.to(x.scalar_type()).contiguous();
  Plan p;
  p.delta = true;
  p.density_in = &density;
  Out o = run_pipeline(x, contiguous_valid(valid_in), p);
  return {o.delta, o.parent};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> dpc_scores(const Tensor& x, int64_t k, const optional<Tensor>& valid_in) {
  check_x(x);
  check_valid(valid_in, x);
  TORCH_CHECK(k >= 1, "setok: k must be >= 1, got ", k);
  Plan p;
  p.density = p.delta = true;
  p.k = k;
  Out o = run_pipeline(x, contiguous_valid(valid_in), p);
  return {o.density, o.delta, o.parent, o.score};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> scope_cluster(const Tensor& x, const Tensor& score_in, double bandwidth,
                                                         int64_t max_clusters, bool hard, double min_scope,
                                                         optional<double> score_threshold,
                                                         const optional<Tensor>& valid_in) {
  check_x(x);
  check_bn("score", score_in, x);
  check_valid(valid_in, x);
  check_scope_args(bandwidth, max_clusters, min_scope);
  Tensor score = score_in.to(x.scalar_type()).contiguous();
  Plan p;
  p.scope = true;
  p.score_in = &score;
  p.bandwidth = bandwidth;
  p.T = max_clusters;
  p.hard = hard;
  p.min_scope = min_scope;
  p.threshold = score_threshold;
  Out o = run_pipeline(x, contiguous_valid(valid_in), p);
  return {o.masks, o.seeds, o.num, o.seed_d2};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> dpc_cluster(
    const Tensor& x, int64_t k, double bandwidth, int64_t max_clusters, bool hard, double min_scope,
    optional<double> score_threshold, const optional<Tensor>& valid_in) {
  check_x(x);
  check_valid(valid_in, x);
  TORCH_CHECK(k >= 1, "setok: k must be >= 1, got ", k);
  check_scope_args(bandwidth, max_clusters, min_scope);
  Plan p;
  p.density = p.delta = p.scope = true;
  p.k = k;
  p.bandwidth = bandwidth;
  p.T = max_clusters;
  p.hard = hard;
  p.min_scope = min_scope;
  p.threshold = score_threshold;
  Out o = run_pipeline(x, contiguous_valid(valid_in), p);
  return {o.density, o.delta, o.parent, o.score, o.masks, o.seeds, o.num, o.seed_d2};
}

Tensor scope_cluster_backward(const Tensor& grad_masks_in, const Tensor& x, const Tensor& seeds,
                              const Tensor& seed_d2, const optional<Tensor>& valid_in, const Tensor& num,
                              double bandwidth, bool hard) {
  check_x(x);
  const int64_t B = x.size(0), N = x.size(1), T = seeds.size(1);
  TORCH_CHECK(grad_masks_in.dim() == 3 && grad_masks_in.size(0) == B && grad_masks_in.size(1) == T + 1 &&
                  grad_masks_in.size(2) == N,
              "setok: grad_masks must have shape (B, T+1, N), got ", shape_str(grad_masks_in));
  auto valid = contiguous_valid(valid_in);
  Tensor grad_masks = grad_masks_in.to(x.scalar_type()).contiguous();
  Tensor sd2 = seed_d2.contiguous();
  Tensor n = num.contiguous();
  Tensor gd2 = at::empty({B, T, N}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "setok_scope_backward", [&] {
    const scalar_t* gm = grad_masks.data_ptr<scalar_t>();
    const scalar_t* sp = sd2.data_ptr<scalar_t>();
    const int64_t* np = n.data_ptr<int64_t>();
    scalar_t* out = gd2.data_ptr<scalar_t>();
    at::parallel_for(0, B * N, row_grain(T + 1), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / N, i = r % N;
        core::scope_backward_rows(gm + b * (T + 1) * N, sp + b * T * N, valid_ptr(valid, b, N), N, T, np[b],
                                  bandwidth, hard, out + b * T * N, i, i + 1);
      }
    });
  });
  return scope_backward_from_gd2(gd2, x, seeds);
}

}  // namespace
}  // namespace setok

TORCH_LIBRARY_IMPL(setok, CPU, m) {
  m.impl("knn_density", &setok::knn_density);
  m.impl("delta_distance", &setok::delta_distance);
  m.impl("dpc_scores", &setok::dpc_scores);
  m.impl("scope_cluster", &setok::scope_cluster);
  m.impl("dpc_cluster", &setok::dpc_cluster);
  m.impl("scope_cluster_backward", &setok::scope_cluster_backward);
}
