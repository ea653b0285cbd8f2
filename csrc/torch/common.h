// Shared by the CPU and CUDA faces of the ops: argument checks (messages name the
// argument and its shape) and the device-independent part of the scope backward.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

namespace setok {

inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

inline void check_x(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 3, "setok: x must have shape (B, N, D), got ", shape_str(x));
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "setok: x must be float32 or float64 here (the Python wrapper casts), got ", x.scalar_type());
  TORCH_CHECK(x.is_contiguous(), "setok: x must be contiguous");
}

inline void check_bn(const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == x.size(0) && t.size(1) == x.size(1), "setok: ", name,
              " must have shape (B, N) = (", x.size(0), ", ", x.size(1), "), got ", shape_str(t));
  TORCH_CHECK(t.device() == x.device(), "setok: ", name, " is on ", t.device(), " but x is on ", x.device());
}

inline void check_valid(const c10::optional<at::Tensor>& valid, const at::Tensor& x) {
  if (!valid.has_value()) return;
  check_bn("valid", *valid, x);
  TORCH_CHECK(valid->scalar_type() == at::kBool, "setok: valid must be bool, got ", valid->scalar_type());
}

inline void check_scope_args(double bandwidth, int64_t max_clusters, double min_scope) {
  TORCH_CHECK(bandwidth > 0 && std::isfinite(bandwidth), "setok: bandwidth must be > 0, got ", bandwidth);
  TORCH_CHECK(max_clusters >= 1, "setok: max_clusters must be >= 1, got ", max_clusters);
  TORCH_CHECK(min_scope >= 0 && min_scope < 1, "setok: min_scope must be in [0, 1), got ", min_scope);
}

inline c10::optional<at::Tensor> contiguous_valid(const c10::optional<at::Tensor>& valid) {
  if (!valid.has_value()) return c10::nullopt;
  return valid->contiguous();
}

// Given gd2 = d loss / d d2(i, seed_t) (B, T, N), with d2(i, m) = |x_i - x_m|^2 / D:
//   grad x_i   += 2/D * sum_t gd2[t, i] (x_i - x_{m_t})
//   grad x_m_t -= 2/D * sum_i gd2[t, i] (x_i - x_{m_t})
// Two small batched GEMMs and a scatter; rows t >= num_clusters of gd2 are zero.
inline at::Tensor scope_backward_from_gd2(const at::Tensor& gd2, const at::Tensor& x, const at::Tensor& seeds) {
  const int64_t D = x.size(2);
  const double c = 2.0 / static_cast<double>(D);
  auto idx = seeds.clamp_min(0);                                     // (B, T)
  auto idx3 = idx.unsqueeze(-1).expand({idx.size(0), idx.size(1), D});  // (B, T, D)
  auto xs = at::gather(x, 1, idx3);                                  // (B, T, D)
  auto r = gd2.sum(1);                                               // (B, N)
  auto grad = (x * r.unsqueeze(-1) - at::bmm(gd2.transpose(1, 2), xs)).mul_(c);  // (B, N, D)
  auto q = at::bmm(gd2, x);                                          // (B, T, D)
  auto seed_grad = (q - xs * gd2.sum(2).unsqueeze(-1)).mul_(-c);     // (B, T, D)
  grad.scatter_add_(1, idx3, seed_grad);
  return grad;
}

}  // namespace setok
