// CPU kernels of the setok ops: argument checks, one Gram GEMM (or direct differences
// for small D), then the core row kernels under at::parallel_for. No Python loops, no
// per-image launches: every pass covers all images x rows at once.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

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

// Everything after the distance matrix, for one image whose Gram matrix (or nothing,
// for the direct path) is in `d2` (N, N). Rows are finalized and their k nearest summed
// in the same sweep, while each row is hot in cache.
// Neighbour lists handed from the density sweep to the delta sweep (rows x k_eff).
template <typename scalar_t>
struct Knn {
  int32_t* idx = nullptr;
  scalar_t* kth = nullptr;
  int64_t k_eff = 0;
};

template <typename scalar_t>
void image_after_gram(const Plan& p, const scalar_t* x, scalar_t* d2, scalar_t* sq, const bool* valid, int64_t N,
                      int64_t D, int64_t b, Out& o, int64_t r0, int64_t r1, std::vector<scalar_t>& scratch,
                      Knn<scalar_t> nn) {
  const int64_t nv = core::count_valid(valid, N);
  for (int64_t i = r0; i < r1; ++i) {
    if (D <= core::kDirectMaxD)
      core::sqdist_rows_direct(x, d2, N, D, i, i + 1);
    else
      core::sqdist_rows_from_gram(d2, sq, N, D, i, i + 1);
    if (p.density)
      core::knn_density_rows(d2, valid, N, p.k, nv, o.density.data_ptr<scalar_t>() + b * N, i, i + 1,
                             scratch.data(), nn.idx ? nn.idx + (i - r0) * nn.k_eff : nullptr,
                             nn.idx ? nn.kth + (i - r0) : nullptr);
  }
}

template <typename scalar_t>
void image_tail(const Plan& p, const scalar_t* d2, const bool* valid, int64_t N, int64_t b, Out& o, int64_t r0,
                int64_t r1, Knn<scalar_t> nn) {
  if (p.delta) {
    const scalar_t* den = (p.density_in ? *p.density_in : o.density).template data_ptr<scalar_t>() + b * N;
    scalar_t* dl = o.delta.data_ptr<scalar_t>() + b * N;
    core::delta_rows(d2, den, valid, N, dl, o.parent.data_ptr<int64_t>() + b * N, r0, r1, nn.idx, nn.kth, nn.k_eff);
    if (o.score.defined()) {
      scalar_t* sc = o.score.data_ptr<scalar_t>() + b * N;
      for (int64_t i = r0; i < r1; ++i) sc[i] = den[i] * dl[i];
    }
  }
}

template <typename scalar_t>
void image_scope(const Plan& p, const scalar_t* d2, const bool* valid, int64_t N, int64_t b, Out& o,
                 std::vector<scalar_t>& scope) {
  const int64_t T = p.T;
  const scalar_t* sc = (p.score_in ? *p.score_in : o.score).template data_ptr<scalar_t>() + b * N;
  o.num.data_ptr<int64_t>()[b] = core::scope_loop(
      d2, sc, valid, N, T, p.bandwidth, p.hard, p.min_scope, p.threshold.has_value(), p.threshold.value_or(0.0),
      o.masks.data_ptr<scalar_t>() + b * (T + 1) * N, o.seeds.data_ptr<int64_t>() + b * T,
      o.seed_d2.data_ptr<scalar_t>() + b * T * N, scope.data());
}

// The whole pipeline. With at least as many images as threads, each thread runs whole
// images (its own N x N buffer, single-threaded GEMM): the distance matrix stays in cache
// between passes and peak memory is threads x N^2, not B x N^2. With fewer images, the
// threads split the rows (Gram rows, distances, densities in one region); the delta pass
// and the scope loops, cheap by then, follow.
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
  // the density sweep keeps each row's neighbours so the delta sweep rarely scans a row
  const bool use_knn = p.density && p.delta && p.k <= core::kSmallK;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "setok_pipeline_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    if (B >= threads) {
      at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
        Tensor buf = at::empty({N, N}, x.options());
        std::vector<scalar_t> sq(N), scratch(p.k > 64 ? N : 0), scope(N), kth(use_knn ? N : 0);
        std::vector<int32_t> knn_idx(use_knn ? N * std::min<int64_t>(p.k, N) : 0);
        for (int64_t b = begin; b < end; ++b) {
          const bool* vb = valid_ptr(valid, b, N);
          Knn<scalar_t> nn;
          if (use_knn) nn = {knn_idx.data(), kth.data(), core::effective_k(p.k, core::count_valid(vb, N))};
          if (gram) {
            Tensor xb = x[b];
            at::mm_out(buf, xb, xb.t());  // single-threaded inside a parallel region
            core::squared_norms(xp + b * N * D, N, D, sq.data());
          }
          scalar_t* d2 = buf.data_ptr<scalar_t>();
          image_after_gram<scalar_t>(p, xp + b * N * D, d2, sq.data(), vb, N, D, b, o, 0, N, scratch, nn);
          image_tail<scalar_t>(p, d2, vb, N, b, o, 0, N, nn);
          if (p.scope) image_scope<scalar_t>(p, d2, vb, N, b, o, scope);
        }
      });
      clock.lap("whole images");
      return;
    }
    // Fewer images than threads: one parallel region over all rows, in which each thread
    // computes its own rows of the Gram matrix (a single-threaded GEMM each, the same flops
    // as one batched GEMM) and turns them into distances and densities while they are in
    // cache. No thread waits for another until the region ends: at B=1 a second region
    // (or a barrier) costs about as much as the passes, and under load a time slice.
    Tensor d2t = at::empty({B, N, N}, x.options());
    scalar_t* d2 = d2t.data_ptr<scalar_t>();
    // neighbour lists of every row: (B, N, k) indices and (B, N) k-th distances
    std::vector<int64_t> k_eff(B);
    for (int64_t b = 0; b < B; ++b) k_eff[b] = core::effective_k(p.k, core::count_valid(valid_ptr(valid, b, N), N));
    const int64_t kmax = std::min<int64_t>(p.k, N);
    std::vector<int32_t> knn_idx(use_knn ? B * N * kmax : 0);
    std::vector<scalar_t> kth(use_knn ? B * N : 0);
    auto knn_of = [&](int64_t r) {
      Knn<scalar_t> nn;
      if (use_knn) nn = {knn_idx.data() + r * kmax, kth.data() + r, k_eff[r / N]};
      return nn;
    };
    clock.lap("setup");
    at::parallel_for(0, B * N, row_grain(N), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> scratch(p.k > 64 ? N : 0), sq(gram ? N : 0);
      for (int64_t r = begin; r < end;) {
        const int64_t b = r / N, i0 = r % N, i1 = std::min(N, i0 + (end - r));
        if (gram) {
          Tensor xb = x[b];
          Tensor rows = d2t[b].narrow(0, i0, i1 - i0);
          at::mm_out(rows, xb.narrow(0, i0, i1 - i0), xb.t());
          core::squared_norms(xp + b * N * D, N, D, sq.data());
        }
        // one call per run of rows where the neighbour lists have the buffer's stride
        // (knn_of); row by row for an image with fewer valid points than k
        const int64_t step = (!use_knn || k_eff[b] == kmax) ? i1 - i0 : 1;
        for (int64_t i = i0; i < i1; i += step)
          image_after_gram<scalar_t>(p, xp + b * N * D, d2 + b * N * N, sq.data(), valid_ptr(valid, b, N), N, D, b,
                                     o, i, i + step, scratch, knn_of(b * N + i));
        r += i1 - i0;
      }
    });
    clock.lap("gram rows+distances+density");
    if (p.delta) {
      // with the neighbour lists most rows take O(k): a small batch runs inline, as waking
      // the other threads costs more than the pass (and under load, a scheduler time slice)
      const int64_t grain = use_knn ? std::max<int64_t>(row_grain(N), 4096) : row_grain(N);
      at::parallel_for(0, B * N, grain, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t b = r / N, i = r % N;
          image_tail<scalar_t>(p, d2 + b * N * N, valid_ptr(valid, b, N), N, b, o, i, i + 1, knn_of(r));
        }
      });
      clock.lap("delta");
    }
    if (p.scope) {
      at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> scope(N);
        for (int64_t b = begin; b < end; ++b)
          image_scope<scalar_t>(p, d2 + b * N * N, valid_ptr(valid, b, N), N, b, o, scope);
      });
      clock.lap("scope");
    }
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
