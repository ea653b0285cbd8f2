// Every schema of the setok ops, the autograd-key kernels of the non-differentiable
// ones, and the pybind11 module (build information). Kernels: cpu_ops.cpp, cuda_ops.cpp.
#include <ATen/core/dispatch/Dispatcher.h>
#include <pybind11/pybind11.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "torch/profile.h"

#ifndef SETOK_GIT_REV
#define SETOK_GIT_REV "unknown"
#endif

TORCH_LIBRARY(setok, m) {
  m.def("knn_density(Tensor x, int k, Tensor? valid) -> Tensor");
  m.def("delta_distance(Tensor x, Tensor density, Tensor? valid) -> (Tensor, Tensor)");
  m.def("dpc_scores(Tensor x, int k, Tensor? valid) -> (Tensor, Tensor, Tensor, Tensor)");
  // seed_d2 (B, T, N): squared distances of every point to each seed, kept for backward
  m.def("scope_cluster(Tensor x, Tensor score, float bandwidth, int max_clusters, bool hard, float min_scope, "
        "float? score_threshold, Tensor? valid) -> (Tensor masks, Tensor seeds, Tensor num_clusters, "
        "Tensor seed_d2)");
  m.def("dpc_cluster(Tensor x, int k, float bandwidth, int max_clusters, bool hard, float min_scope, "
        "float? score_threshold, Tensor? valid) -> (Tensor density, Tensor delta, Tensor parent, Tensor score, "
        "Tensor masks, Tensor seeds, Tensor num_clusters, Tensor seed_d2)");
  m.def("scope_cluster_backward(Tensor grad_masks, Tensor x, Tensor seeds, Tensor seed_d2, Tensor? valid, "
        "Tensor num_clusters, float bandwidth, bool hard) -> Tensor");
}

// Densities, deltas and scores carry no gradient (seeds are discrete): an Autograd-key
// kernel that runs below autograd makes that explicit, so outputs never require grad.
namespace {
template <class Sig>
struct NoGrad;

template <class Ret, class... Args>
struct NoGrad<Ret(Args...)> {
  template <const char* Name>
  static Ret call(Args... args) {
    static auto op = c10::Dispatcher::singleton().findSchemaOrThrow(Name, "").template typed<Ret(Args...)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(args...);
  }
};

constexpr char kKnn[] = "setok::knn_density";
constexpr char kDelta[] = "setok::delta_distance";
constexpr char kScores[] = "setok::dpc_scores";
using KnnSig = at::Tensor(const at::Tensor&, int64_t, const c10::optional<at::Tensor>&);
using DeltaSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                    const c10::optional<at::Tensor>&);
using ScoresSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, int64_t,
                                                                             const c10::optional<at::Tensor>&);
}  // namespace

TORCH_LIBRARY_IMPL(setok, Autograd, m) {
  m.impl("knn_density", &NoGrad<KnnSig>::call<kKnn>);
  m.impl("delta_distance", &NoGrad<DeltaSig>::call<kDelta>);
  m.impl("dpc_scores", &NoGrad<ScoresSig>::call<kScores>);
}

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "setok compiled ops (registered as torch.ops.setok.*) and build information";
  mod.def("build_info", []() {
    py::dict d;
#ifdef SETOK_WITH_CUDA
    d["with_cuda"] = true;
#else
    d["with_cuda"] = false;
#endif
#ifdef _OPENMP
    d["openmp"] = true;
#else
    d["openmp"] = false;
#endif
    d["git_rev"] = SETOK_GIT_REV;
    d["torch_version"] = TORCH_VERSION;
#if defined(__clang__)
    d["compiler"] = "clang " __clang_version__;
#elif defined(__GNUC__)
    d["compiler"] = "gcc " __VERSION__;
#else
    d["compiler"] = "unknown";
#endif
    return d;
  });
  mod.def("_set_profile", [](bool on) { setok::profile_on().store(on); },
          "Record the per-phase wall-clock split of each CPU pipeline call (benchmarks only).");
  mod.def("_last_profile", []() {
    py::list out;
    for (const auto& e : setok::profile_log()) out.append(py::make_tuple(e.first, e.second));
    return out;
  }, "[(phase, ms), ...] of the last profiled CPU pipeline call.");
  mod.def("_last_profile_tasks", []() {
    py::list out;
    for (const auto& e : setok::profile_tasks()) out.append(py::make_tuple(e.first, e.second));
    return out;
  }, "[(task kind, thread-ms), ...] of the last profiled call's task region (wait counted apart).");
}
