// C++ tests of csrc/core against brute-force definitions (SPEC section 2), no torch.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "core/dpc_cpu.h"

using namespace setok::core;

static int failures = 0;
#define CHECK(cond, ...)                                  \
  do {                                                    \
    if (!(cond)) {                                        \
      ++failures;                                         \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__);    \
      std::printf(__VA_ARGS__);                           \
      std::printf("\n");                                  \
    }                                                     \
  } while (0)

static std::vector<double> random_x(int N, int D, unsigned seed) {
  std::mt19937 g(seed);
  std::normal_distribution<double> n(0.0, 1.0);
  std::vector<double> x(N * D);
  for (auto& v : x) v = n(g);
  return x;
}

static double brute_d2(const std::vector<double>& x, int D, int i, int j) {
  double s = 0;
  for (int c = 0; c < D; ++c) s += (x[i * D + c] - x[j * D + c]) * (x[i * D + c] - x[j * D + c]);
  return s / D;
}

static void test_sqdist(int N, int D) {
  auto x = random_x(N, D, 1 + N + D);
  std::vector<double> direct(N * N), gram(N * N), sq(N);
  sqdist_rows_direct(x.data(), direct.data(), N, D, 0, N);
  for (int i = 0; i < N; ++i)
    for (int j = 0; j < N; ++j) {
      double s = 0;
      for (int c = 0; c < D; ++c) s += x[i * D + c] * x[j * D + c];
      gram[i * N + j] = s;
    }
  for (int i = 0; i < N; ++i) sq[i] = gram[i * N + i];
  sqdist_rows_from_gram(gram.data(), sq.data(), N, D, 0, N);
  for (int i = 0; i < N; ++i) {
    CHECK(direct[i * N + i] == 0.0 && gram[i * N + i] == 0.0, "diagonal not exactly 0");
    for (int j = 0; j < N; ++j) {
      const double want = brute_d2(x, D, i, j);
      CHECK(std::fabs(direct[i * N + j] - want) < 1e-12, "direct d2 (%d,%d)", i, j);
      CHECK(std::fabs(gram[i * N + j] - want) < 1e-9 && gram[i * N + j] >= 0, "gram d2 (%d,%d)", i, j);
    }
  }
}

// The pipelines' triangle: column panels of width w, each from its diagonal downwards
// (columns [i0, i1), rows [i0, N)), then rows [i0, i1) above the diagonal mirrored. Cells
// above the panels start as NaN, so a kernel writing outside its range or a mirror that
// misses a cell shows; the result must be exactly symmetric, its lower part bit-equal to the
// full-matrix kernels', and (direct differences being symmetric) the direct one all equal.
static void test_triangle(int N, int D, int w) {
  auto x = random_x(N, D, 7 + N + D);
  std::vector<double> full_direct(N * N), full_gram(N * N), gram(N * N), sq(N);
  sqdist_rows_direct(x.data(), full_direct.data(), N, D, 0, N);
  for (int i = 0; i < N; ++i)
    for (int j = 0; j < N; ++j) {
      double s = 0;
      for (int c = 0; c < D; ++c) s += x[i * D + c] * x[j * D + c];
      gram[i * N + j] = s;
    }
  squared_norms(x.data(), N, D, sq.data());
  full_gram = gram;
  sqdist_rows_from_gram(full_gram.data(), sq.data(), N, D, 0, N);
  const double nan = std::nan("");
  std::vector<double> tri_direct(N * N, nan), tri_gram(N * N, nan);
  for (int i0 = 0; i0 < N; i0 += w) {
    const int i1 = std::min(N, i0 + w);
    sqdist_rows_direct(x.data(), tri_direct.data(), N, D, i0, N, i0, i1);
    for (int i = i0; i < N; ++i)
      for (int j = i0; j < i1; ++j) tri_gram[i * N + j] = gram[i * N + j];
    sqdist_rows_from_gram(tri_gram.data(), sq.data(), N, D, i0, N, i0, i1);
  }
  for (int i = 0; i < N; ++i)
    for (int j = 0; j < N; ++j) {
      const bool computed = j / w * w <= i;  // in panel j / w, which starts at its diagonal
      CHECK(std::isnan(tri_direct[i * N + j]) != computed && std::isnan(tri_gram[i * N + j]) != computed,
            "N=%d w=%d: cell (%d,%d) written outside its panel or not written", N, w, i, j);
    }
  for (int i0 = 0; i0 < N; i0 += w) {
    mirror_upper_rows(tri_direct.data(), N, i0, std::min(N, i0 + w));
    mirror_upper_rows(tri_gram.data(), N, i0, std::min(N, i0 + w));
  }
  for (int i = 0; i < N; ++i)
    for (int j = 0; j < N; ++j) {
      CHECK(tri_direct[i * N + j] == full_direct[i * N + j], "N=%d w=%d direct (%d,%d)", N, w, i, j);
      CHECK(tri_gram[i * N + j] == tri_gram[j * N + i], "N=%d w=%d gram not symmetric (%d,%d)", N, w, i, j);
      if (j <= i) CHECK(tri_gram[i * N + j] == full_gram[i * N + j], "N=%d w=%d gram (%d,%d)", N, w, i, j);
    }
}

// squared_norms against exact small-integer norms, float and double
static void test_squared_norms() {
  for (int D : {1, 15, 16, 17, 1024}) {
    std::vector<float> xf(3 * D);
    std::vector<double> xd(3 * D);
    for (int i = 0; i < 3; ++i)
      for (int c = 0; c < D; ++c) xf[i * D + c] = xd[i * D + c] = (c % 2 ? -1.0 : 1.0) * (i + 1);
    std::vector<float> sf(3);
    std::vector<double> sd(3);
    squared_norms(xf.data(), 3, D, sf.data());
    squared_norms(xd.data(), 3, D, sd.data());
    for (int i = 0; i < 3; ++i) {
      CHECK(sf[i] == float(D * (i + 1) * (i + 1)), "float norm D=%d row %d: %g", D, i, sf[i]);
      CHECK(sd[i] == double(D * (i + 1) * (i + 1)), "double norm D=%d row %d: %g", D, i, sd[i]);
    }
  }
}

// For a power-of-two D the kernel multiplies by 1/D: the bits must be those of the division.
static void test_sqdist_power_of_two_d() {
  std::mt19937 g(11);
  std::uniform_real_distribution<float> u(-3e3f, 3e3f);
  const int N = 37;
  for (int D : {64, 1024, 1 << 20}) {
    std::vector<float> gram(N * N), sq(N);
    for (auto& v : gram) v = u(g);
    for (auto& v : sq) v = std::fabs(u(g)) * 1e-30f;  // small: some results are subnormal
    for (int i = 0; i < N; ++i) sq[i] += (i % 3) * 2e3f;
    std::vector<float> got = gram;
    sqdist_rows_from_gram(got.data(), sq.data(), N, D, 0, N);
    for (int i = 0; i < N; ++i)
      for (int j = 0; j < N; ++j) {
        const float want = i == j ? 0.0f : sqdist_from_gram(sq[i], sq[j], gram[i * N + j], float(D));
        CHECK(got[i * N + j] == want, "D=%d (%d,%d): %a vs %a", D, i, j, got[i * N + j], want);
      }
  }
}

// The k nearest of each row (indices, ascending by (distance, index)) against a stable sort,
// on rows with many exact ties and on rows whose nearest all sit in one lane (columns
// j = c mod kBlock), where the lane bound is loose. Both must give the full scan's answer.
static void test_knn_lists(int N, int k, bool one_lane) {
  std::mt19937 g(5 + N * 7 + k);
  std::uniform_int_distribution<int> q(0, 6);
  std::vector<float> d2(N * N);
  for (int i = 0; i < N; ++i)
    for (int j = 0; j < N; ++j) {
      float v = 0.25f * q(g) + 1.0f;  // 7 distinct values: ties everywhere
      if (one_lane) v = (j % kBlock == i % kBlock) ? 0.5f + 0.01f * float(j % 5) : 3.0f;
      d2[i * N + j] = i == j ? 0.0f : v;
    }
  const int64_t ke = effective_k(k, N);
  std::vector<float> dens(N), kth(N);
  std::vector<int32_t> knn(N * ke);
  knn_density_rows(d2.data(), nullptr, N, k, N, dens.data(), 0, N, static_cast<float*>(nullptr), knn.data(),
                   kth.data());
  for (int i = 0; i < N; ++i) {
    std::vector<int> order(N);
    for (int j = 0; j < N; ++j) order[j] = j;
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return d2[i * N + a] < d2[i * N + b]; });
    float s = 0;
    for (int t = 0; t < ke; ++t) {
      CHECK(knn[i * ke + t] == order[t], "N=%d k=%d row %d: neighbour %d is %d, want %d", N, k, i, t,
            knn[i * ke + t], order[t]);
      s += d2[i * N + order[t]];
    }
    CHECK(kth[i] == d2[i * N + order[ke - 1]], "N=%d k=%d row %d: k-th distance", N, k, i);
    CHECK(dens[i] == density_from_sum(s, ke), "N=%d k=%d row %d: density", N, k, i);
  }
}

static void test_density_delta(int N, int D, int k, bool with_padding) {
  auto x = random_x(N, D, 7 + N * k);
  std::vector<double> d2(N * N);
  sqdist_rows_direct(x.data(), d2.data(), N, D, 0, N);
  std::vector<char> vbuf(N, 1);
  if (with_padding)
    for (int i = 0; i < N; i += 3) vbuf[i] = 0;
  std::vector<bool> vb(vbuf.begin(), vbuf.end());
  bool valid[512];
  for (int i = 0; i < N; ++i) valid[i] = vbuf[i];
  const bool* vp = with_padding ? valid : nullptr;
  const int64_t nv = count_valid(vp, N);
  std::vector<double> dens(N), scratch(N), delta(N);
  std::vector<int64_t> parent(N);
  knn_density_rows(d2.data(), vp, N, k, nv, dens.data(), 0, N, scratch.data());
  delta_rows(d2.data(), dens.data(), vp, N, delta.data(), parent.data(), 0, N);
  for (int i = 0; i < N; ++i) {
    if (!valid[i] && with_padding) {
      CHECK(dens[i] == 0 && delta[i] == 0 && parent[i] == i, "padding row %d", i);
      continue;
    }
    std::vector<double> row;
    for (int j = 0; j < N; ++j)
      if (!with_padding || valid[j]) row.push_back(d2[i * N + j]);
    std::sort(row.begin(), row.end());
    const int ke = std::min<int64_t>(k, row.size());
    double s = 0;
    for (int t = 0; t < ke; ++t) s += row[t];
    CHECK(std::fabs(dens[i] - std::exp(-s / ke)) < 1e-12, "density %d", i);
    // brute-force delta
    double best = INFINITY, mx = 0;
    int bj = -1;
    for (int j = 0; j < N; ++j) {
      if (with_padding && !valid[j]) continue;
      mx = std::max(mx, d2[i * N + j]);
      const bool denser = dens[j] > dens[i] || (dens[j] == dens[i] && j < i);
      if (denser && d2[i * N + j] < best) {
        best = d2[i * N + j];
        bj = j;
      }
    }
    CHECK(parent[i] == (bj < 0 ? i : bj), "parent %d", i);
    CHECK(std::fabs(delta[i] - std::sqrt(bj < 0 ? mx : best)) < 1e-12, "delta %d", i);
  }
}

static void test_scope(int N, int D, int T, bool hard) {
  auto x = random_x(N, D, 99 + N);
  std::vector<double> d2(N * N), score(N), masks((T + 1) * N), seed_d2(T * N), scope(N);
  std::vector<int64_t> seeds(T);
  sqdist_rows_direct(x.data(), d2.data(), N, D, 0, N);
  std::mt19937 g(3);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  for (auto& s : score) s = u(g);
  const int64_t n = scope_loop(d2.data(), score.data(), nullptr, N, T, 0.8, hard, 0.0, false, 0.0, masks.data(),
                               seeds.data(), seed_d2.data(), scope.data());
  CHECK(n >= 1 && n <= T, "num clusters %lld", (long long)n);
  // seed 0 is the argmax of the scores
  CHECK(seeds[0] == std::max_element(score.begin(), score.end()) - score.begin(), "first seed");
  for (int i = 0; i < N; ++i) {
    double s = 0;
    for (int t = 0; t <= T; ++t) s += masks[t * N + i];
    CHECK(std::fabs(s - 1.0) < 1e-12, "masks of point %d sum to %f", i, s);
  }
  for (int t = n; t < T; ++t) CHECK(seeds[t] == -1, "seed after stop");
  // backward against central differences of the scalar recursion in d2
  std::vector<double> gm((T + 1) * N), gd2(T * N);
  for (auto& v : gm) v = u(g) - 0.5;
  scope_backward_rows(gm.data(), seed_d2.data(), nullptr, N, T, n, 0.8, false, gd2.data(), 0, N);
  if (!hard) {
    const double bw2 = 0.64, inv = 1 / bw2;
    for (int i = 0; i < std::min(N, 5); ++i)
      for (int t = 0; t < n; ++t) {
        auto loss = [&](double delta_d2) {
          double s = 1, L = 0;
          for (int u2 = 0; u2 < n; ++u2) {
            const double a = alpha_soft(seed_d2[u2 * N + i] + (u2 == t ? delta_d2 : 0.0), inv);
            L += gm[u2 * N + i] * s * a;
            s = s * (1 - a);
          }
          return L + gm[n * N + i] * s;
        };
        const double num = (loss(1e-6) - loss(-1e-6)) / 2e-6;
        CHECK(std::fabs(num - gd2[t * N + i]) < 1e-6, "backward (%d,%d): %g vs %g", i, t, num, gd2[t * N + i]);
      }
  }
}

int main() {
  for (int N : {1, 2, 7, 33})
    for (int D : {1, 3, 40}) test_sqdist(N, D);
  for (int N : {1, 7, 50})
    for (int k : {1, 5, 70})
      for (bool pad : {false, true}) test_density_delta(N, 4, k, pad);
  for (bool hard : {false, true}) test_scope(40, 3, 8, hard);
  for (int N : {1, 2, 7, 33, 40})
    for (int w : {1, 5, 16, 17, 96}) test_triangle(N, 40, w);
  test_squared_norms();
  test_sqdist_power_of_two_d();
  for (int N : {16, 17, 40, 577})
    for (int k : {1, 2, 5, 16, 17})
      for (bool one_lane : {false, true}) test_knn_lists(N, k, one_lane);
  std::printf("%s (%d failures)\n", failures ? "FAILED" : "all core tests passed", failures);
  return failures ? 1 : 0;
}
