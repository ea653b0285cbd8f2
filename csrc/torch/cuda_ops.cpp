// CUDA face of the setok ops: argument checks, the Gram GEMM (cuBLAS through at::bmm,
// TF32 off), then the hand-written kernels of core/dpc_cuda.cu on the current stream.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "core/dpc_cpu.h"  // kDirectMaxD
#include "core/dpc_cuda.h"
#include "torch/common.h"

namespace setok {
namespace {

using at::Tensor;
using c10::optional;

const bool* valid_ptr(const optional<Tensor>& v) { return v.has_value() ? v->data_ptr<bool>() : nullptr; }

// TF32 would make distances depend on the GPU generation: off for our one GEMM.
struct NoTF32 {
  bool prev;
  NoTF32() : prev(at::globalContext().allowTF32CuBLAS()) { at::globalContext().setAllowTF32CuBLAS(false); }
  ~NoTF32() { at::globalContext().setAllowTF32CuBLAS(prev); }
};

Tensor sqdist_cuda(const Tensor& x) {
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  auto stream = at::cuda::getCurrentCUDAStream();
  if (D <= core::kDirectMaxD) {
    Tensor d2 = at::empty({B, N, N}, x.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "setok_sqdist_direct_cuda", [&] {
      cuda::sqdist_direct<scalar_t>(x.data_ptr<scalar_t>(), d2.data_ptr<scalar_t>(), B, N, D, stream);
    });
    return d2;
  }
  Tensor g;
  {
    NoTF32 guard;
    g = at::bmm(x, x.transpose(1, 2));
  }
  Tensor sq = at::empty({B, N}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "setok_sqdist_gram_cuda", [&] {
    cuda::sqdist_from_gram<scalar_t>(g.data_ptr<scalar_t>(), sq.data_ptr<scalar_t>(), B, N, D, stream);
  });
  return g;
}

Tensor density_cuda(const Tensor& d2, int64_t k, const optional<Tensor>& valid) {
  const int64_t B = d2.size(0), N = d2.size(1);
  Tensor density = at::empty({B, N}, d2.options());
  AT_DISPATCH_FLOATING_TYPES(d2.scalar_type(), "setok_knn_density_cuda", [&] {
    cuda::knn_density<scalar_t>(d2.data_ptr<scalar_t>(), valid_ptr(valid), B, N, k, density.data_ptr<scalar_t>(),
                                at::cuda::getCurrentCUDAStream());
  });
  return density;
}

std::tuple<Tensor, Tensor> delta_cuda(const Tensor& d2, const Tensor& density, const optional<Tensor>& valid) {
  const int64_t B = d2.size(0), N = d2.size(1);
  Tensor delta = at::empty({B, N}, d2.options());
  Tensor parent = at::empty({B, N}, d2.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(d2.scalar_type(), "setok_delta_cuda", [&] {
    cuda::delta_distance<scalar_t>(d2.data_ptr<scalar_t>(), density.data_ptr<scalar_t>(), valid_ptr(valid), B, N,
                                   delta.data_ptr<scalar_t>(), parent.data_ptr<int64_t>(),
                                   at::cuda::getCurrentCUDAStream());
  });
  return {delta, parent};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> scope_cuda(const Tensor& d2, const Tensor& score, double bandwidth,
                                                      int64_t T, bool hard, double min_scope,
                                                      optional<double> threshold, const optional<Tensor>& valid) {
  const int64_t B = d2.size(0), N = d2.size(1);
  Tensor masks = at::zeros({B, T + 1, N}, d2.options());
  Tensor seeds = at::full({B, T}, -1, d2.options().dtype(at::kLong));
  Tensor num = at::zeros({B}, d2.options().dtype(at::kLong));
  Tensor seed_d2 = at::zeros({B, T, N}, d2.options());
  Tensor scope = at::empty({B, N}, d2.options());
  AT_DISPATCH_FLOATING_TYPES(d2.scalar_type(), "setok_scope_cuda", [&] {
    cuda::scope_cluster<scalar_t>(d2.data_ptr<scalar_t>(), score.data_ptr<scalar_t>(), valid_ptr(valid), B, N, T,
                                  bandwidth, hard, min_scope, threshold.has_value(), threshold.value_or(0.0),
                                  masks.data_ptr<scalar_t>(), seeds.data_ptr<int64_t>(), num.data_ptr<int64_t>(),
                                  seed_d2.data_ptr<scalar_t>(), scope.data_ptr<scalar_t>(),
                                  at::cuda::getCurrentCUDAStream());
  });
  return {masks, seeds, num, seed_d2};
}

// ---- ops ----------------------------------------------------------------------------

Tensor knn_density(const Tensor& x, int64_t k, const optional<Tensor>& valid_in) {
  check_x(x);
  check_valid(valid_in, x);
  TORCH_CHECK(k >= 1, "setok: k must be >= 1, got ", k);
  c10::cuda::CUDAGuard device_guard(x.device());
  auto valid = contiguous_valid(valid_in);
  return density_cuda(sqdist_cuda(x), k, valid);
}

std::tuple<Tensor, Tensor> delta_distance(const Tensor& x, const Tensor& density, const optional<Tensor>& valid_in) {
  check_x(x);
  check_bn("density", density, x);
  check_valid(valid_in, x);
  c10::cuda::CUDAGuard device_guard(x.device());
  auto valid = contiguous_valid(valid_in);
  return delta_cuda(sqdist_cuda(x), density.to(x.scalar_type()).contiguous(), valid);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> dpc_scores(const Tensor& x, int64_t k, const optional<Tensor>& valid_in) {
  check_x(x);
  check_valid(valid_in, x);
  TORCH_CHECK(k >= 1, "setok: k must be >= 1, got ", k);
  c10::cuda::CUDAGuard device_guard(x.device());
  auto valid = contiguous_valid(valid_in);
  Tensor d2 = sqdist_cuda(x);
  Tensor density = density_cuda(d2, k, valid);
  auto [delta, parent] = delta_cuda(d2, density, valid);
  return {density, delta, parent, density * delta};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> scope_cluster(const Tensor& x, const Tensor& score, double bandwidth,
                                                         int64_t max_clusters, bool hard, double min_scope,
                                                         optional<double> score_threshold,
                                                         const optional<Tensor>& valid_in) {
  check_x(x);
  check_bn("score", score, x);
  check_valid(valid_in, x);
  check_scope_args(bandwidth, max_clusters, min_scope);
  c10::cuda::CUDAGuard device_guard(x.device());
  auto valid = contiguous_valid(valid_in);
  return scope_cuda(sqdist_cuda(x), score.to(x.scalar_type()).contiguous(), bandwidth, max_clusters, hard, min_scope,
                    score_threshold, valid);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> dpc_cluster(
    const Tensor& x, int64_t k, double bandwidth, int64_t max_clusters, bool hard, double min_scope,
    optional<double> score_threshold, const optional<Tensor>& valid_in) {
  check_x(x);
  check_valid(valid_in, x);
  TORCH_CHECK(k >= 1, "setok: k must be >= 1, got ", k);
  check_scope_args(bandwidth, max_clusters, min_scope);
  c10::cuda::CUDAGuard device_guard(x.device());
  auto valid = contiguous_valid(valid_in);
  Tensor d2 = sqdist_cuda(x);
  Tensor density = density_cuda(d2, k, valid);
  auto [delta, parent] = delta_cuda(d2, density, valid);
  Tensor score = density * delta;
  auto [masks, seeds, num, seed_d2] = scope_cuda(d2, score, bandwidth, max_clusters, hard, min_scope,
                                                 score_threshold, valid);
  return {density, delta, parent, score, masks, seeds, num, seed_d2};
}

Tensor scope_cluster_backward(const Tensor& grad_masks_in, const Tensor& x, const Tensor& seeds,
                              const Tensor& seed_d2, const optional<Tensor>& valid_in, const Tensor& num,
                              double bandwidth, bool hard) {
  check_x(x);
  const int64_t B = x.size(0), N = x.size(1), T = seeds.size(1);
  TORCH_CHECK(grad_masks_in.dim() == 3 && grad_masks_in.size(0) == B && grad_masks_in.size(1) == T + 1 &&
                  grad_masks_in.size(2) == N,
              "setok: grad_masks must have shape (B, T+1, N), got ", shape_str(grad_masks_in));
  c10::cuda::CUDAGuard device_guard(x.device());
  auto valid = contiguous_valid(valid_in);
  Tensor grad_masks = grad_masks_in.to(x.scalar_type()).contiguous();
  Tensor sd2 = seed_d2.contiguous();
  Tensor n = num.contiguous();
  Tensor gd2 = at::zeros({B, T, N}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "setok_scope_backward_cuda", [&] {
    cuda::scope_backward<scalar_t>(grad_masks.data_ptr<scalar_t>(), sd2.data_ptr<scalar_t>(), valid_ptr(valid),
                                   n.data_ptr<int64_t>(), B, N, T, bandwidth, hard, gd2.data_ptr<scalar_t>(),
                                   at::cuda::getCurrentCUDAStream());
  });
  return scope_backward_from_gd2(gd2, x, seeds);
}

}  // namespace
}  // namespace setok

TORCH_LIBRARY_IMPL(setok, CUDA, m) {
  m.impl("knn_density", &setok::knn_density);
  m.impl("delta_distance", &setok::delta_distance);
  m.impl("dpc_scores", &setok::dpc_scores);
  m.impl("scope_cluster", &setok::scope_cluster);
  m.impl("dpc_cluster", &setok::dpc_cluster);
  m.impl("scope_cluster_backward", &setok::scope_cluster_backward);
}
