"""The clustering ops against SPEC section 2: golden cases, backends against each other,
ties, padding, awkward sizes, dtypes, gradients, opcheck and torch.compile."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from setok_cli import ops
from setok_cli.ops import reference as R

# A copy of shared/golden/dpc_cases.json (SPEC section 2 worked cases, float64), kept in
# the repository so the tests never depend on what lies beside the checkout.
GOLDEN = Path(__file__).resolve().parent / "golden" / "dpc_cases.json"
SHARED_GOLDEN = Path(__file__).resolve().parents[3] / "shared" / "golden" / "dpc_cases.json"

# The CPU kernels are always built (setup.py), so the tests require them rather than skip:
# a build that silently fell back to the reference must fail here.
BACKENDS = ["reference", "cpu"]


def test_extension_is_built():
    assert ops.HAS_EXT, "setok_cli._C is missing: pip install --no-build-isolation -e ."
    assert ops.has_backend("cpu")


def _golden_cases():
    return json.loads(GOLDEN.read_text())["cases"]


@pytest.mark.skipif(not SHARED_GOLDEN.exists(), reason="no shared/ beside the checkout")
def test_golden_copy_is_current():
    assert json.loads(GOLDEN.read_text()) == json.loads(SHARED_GOLDEN.read_text())


def _run_case(c, backend, dtype):
    x = torch.tensor(c["x"], dtype=dtype)[None]
    v = torch.tensor(c["valid"])[None]
    return ops.dpc_cluster(x, c["k"], c["bandwidth"], c["max_clusters"], c["hard"], c["min_scope"],
                           c["score_threshold"], v, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", _golden_cases(), ids=lambda c: c["name"])
def test_golden(case, backend, dtype):
    out = _run_case(case, backend, dtype)
    tol = 1e-6 if dtype == torch.float64 else 1e-5
    for name, got in zip(out._fields, out):
        want = torch.tensor(case[name], dtype=got.dtype)
        if want.dim() == got.dim() - 1:
            want = want[None]
        assert got.shape == want.shape, name
        if got.is_floating_point():
            torch.testing.assert_close(got, want, atol=tol, rtol=tol, msg=f"{name} differs")
        else:
            assert torch.equal(got, want), f"{name}: {got} vs {want}"


def _agree(a: ops.DPCResult, b: ops.DPCResult, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(a.density, b.density, rtol=rtol, atol=atol)
    torch.testing.assert_close(a.delta, b.delta, rtol=rtol, atol=atol)
    torch.testing.assert_close(a.score, b.score, rtol=rtol, atol=atol)
    assert torch.equal(a.parent, b.parent)
    assert torch.equal(a.seeds, b.seeds)
    assert torch.equal(a.num_clusters, b.num_clusters)
    torch.testing.assert_close(a.masks, b.masks, rtol=1e-5, atol=1e-5)


def _bw_for(x):
    """A bandwidth at the median nearest-neighbour distance, so clusters have several points."""
    d2 = R.sqdist(x.double())
    d2 = d2 + torch.eye(x.shape[1], dtype=d2.dtype) * 1e9
    return float(d2.min(-1).values.sqrt().median()) * 1.5 + 1e-3


@pytest.mark.parametrize("N", [1, 2, 7, 97, 577])
@pytest.mark.parametrize("D", [1, 3, 1024])
@pytest.mark.parametrize("hard", [True, False])
def test_cpu_matches_reference(N, D, hard):
    g = torch.Generator().manual_seed(N * 31 + D)
    x = torch.randn(2, N, D, generator=g)
    bw = _bw_for(x)
    for k in sorted({1, 5, N, N + 3}):
        ref = ops.dpc_cluster(x, k, bw, 16, hard, backend="reference")
        cpu = ops.dpc_cluster(x, k, bw, 16, hard, backend="cpu")
        _agree(ref, cpu)
        # the separate ops agree with the fused pipeline
        assert torch.equal(ops.knn_density(x, k, backend="cpu"), cpu.density)
        delta, parent = ops.delta_distance(x, cpu.density, backend="cpu")
        assert torch.equal(delta, cpu.delta) and torch.equal(parent, cpu.parent)
        masks, seeds, num = ops.scope_cluster(x, cpu.score, bw, 16, hard, backend="cpu")
        assert torch.equal(masks, cpu.masks) and torch.equal(seeds, cpu.seeds)
        sc = ops.dpc_scores(x, k, backend="cpu")
        assert torch.equal(sc[3], cpu.score)


@pytest.mark.parametrize("D", [3, 1024])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("hard", [True, False])
@pytest.mark.parametrize("N", [131, 300])
def test_cpu_row_split_matches_whole_images(B, D, hard, N):
    """With fewer images than threads the threads share one list of tasks (Gram panels, rows,
    delta, scope per image and panel); with more, each thread runs whole images. Both paths
    against the reference and each other, with panels of 96 that do not divide N and an
    image with fewer valid points than k (its neighbour lists are shorter than the buffer's)."""
    g = torch.Generator().manual_seed(B * 7 + D + N)
    x = torch.randn(B, N, D, generator=g)
    valid = torch.ones(B, N, dtype=torch.bool)
    if B > 1:
        valid[1, 3:] = False
        valid[2, 100:] = False
    bw = _bw_for(x)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(B + 3)
        split = ops.dpc_cluster(x, 5, bw, 16, hard, valid=valid, backend="cpu")
        torch.set_num_threads(1)
        whole = ops.dpc_cluster(x, 5, bw, 16, hard, valid=valid, backend="cpu")
    finally:
        torch.set_num_threads(prev)
    _agree(ops.dpc_cluster(x, 5, bw, 16, hard, valid=valid, backend="reference"), split)
    if D <= R.DIRECT_MAX_D:  # no GEMM: the same arithmetic on both paths
        _agree(whole, split, rtol=0, atol=0)
    else:  # the Gram rows come from GEMMs of different shapes
        _agree(whole, split)


@pytest.mark.parametrize("backend", BACKENDS)
def test_spec_invariants(backend):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, 8, generator=g)
    valid = torch.rand(3, 50, generator=g) > 0.3
    r = ops.dpc_cluster(x, 4, 0.8, 10, hard=True, valid=valid, backend=backend)
    # rows of masks sum to valid; hard masks are 0/1; labels cover the valid points
    torch.testing.assert_close(r.masks.sum(1), valid.float())
    assert set(r.masks.unique().tolist()) <= {0.0, 1.0}
    assert (r.density[~valid] == 0).all() and (r.delta[~valid] == 0).all()
    ar = torch.arange(50).expand(3, 50)
    assert torch.equal(r.parent[~valid], ar[~valid])
    # a point's parent is denser (or itself for the densest valid point)
    for b in range(3):
        for i in torch.nonzero(valid[b]).flatten().tolist():
            p = int(r.parent[b, i])
            if p != i:
                assert r.density[b, p] > r.density[b, i] or (r.density[b, p] == r.density[b, i] and p < i)
        n = int(r.num_clusters[b])
        assert (r.seeds[b, :n] >= 0).all() and (r.seeds[b, n:] == -1).all()
        assert valid[b, r.seeds[b, :n]].all()
        assert (r.masks[b, n + 1:] == 0).all()
        # seeds are claimed by their own cluster in hard mode
        for t in range(n):
            assert r.masks[b, t, r.seeds[b, t]] == 1


# ---- ties (SPEC rules) ---------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_duplicates(backend):
    # two duplicate pairs and a far point: equal densities -> smaller index is denser
    x = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [1.0, 0.0], [5.0, 5.0]]])
    r = ops.dpc_cluster(x, 2, 0.1, 5, hard=True, backend=backend)
    assert r.density[0, 0] == r.density[0, 1] == 1.0  # the duplicate is at distance 0
    assert int(r.parent[0, 1]) == 0  # 0 is denser than 1 (tie, smaller index)
    assert int(r.parent[0, 3]) == 2 and r.delta[0, 3] == 0  # its duplicate, at distance exactly 0
    # densest point (0) takes its row maximum
    assert math.isclose(float(r.delta[0, 0]), math.sqrt(50 / 2), rel_tol=1e-6)
    assert int(r.parent[0, 0]) == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D", [4, 1024])
def test_ties_constant_features(backend, D):
    x = torch.full((1, 9, D), 0.25)
    r = ops.dpc_cluster(x, 3, 0.5, 4, hard=True, backend=backend)
    assert torch.equal(r.density, torch.ones(1, 9))
    assert torch.equal(r.parent, torch.tensor([[0, 0, 0, 0, 0, 0, 0, 0, 0]]))
    assert torch.equal(r.delta, torch.zeros(1, 9))
    # all scores are 0 and equal: the first point seeds the one cluster that takes all
    assert r.seeds[0].tolist() == [0, -1, -1, -1] and int(r.num_clusters[0]) == 1
    assert torch.equal(r.masks[0, 0], torch.ones(9))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_all_equal_scores(backend):
    # regular simplex-like points: all densities and deltas equal -> seeds in index order
    x = torch.eye(6)[None] * 3.0
    score = torch.ones(1, 6)
    masks, seeds, num = ops.scope_cluster(x, score, 0.1, 6, hard=True, backend=backend)
    assert seeds[0].tolist() == [0, 1, 2, 3, 4, 5] and int(num[0]) == 6
    assert torch.equal(masks[0, :6], torch.eye(6))


# ---- padding -------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D", [3, 64])
def test_padding_equals_single_images(backend, D):
    g = torch.Generator().manual_seed(D)
    sizes = [13, 40, 27]
    xs = [torch.randn(1, n, D, generator=g) for n in sizes]
    N = max(sizes)
    x = torch.zeros(len(sizes), N, D)
    valid = torch.zeros(len(sizes), N, dtype=torch.bool)
    for b, xi in enumerate(xs):
        x[b, : sizes[b]] = xi[0]
        x[b, sizes[b]:] = 100.0 * torch.randn(N - sizes[b], D, generator=g)  # garbage in the padding
        valid[b, : sizes[b]] = True
    bw = 0.9
    batched = ops.dpc_cluster(x, 5, bw, 8, hard=True, valid=valid, backend=backend)
    for b, xi in enumerate(xs):
        n = sizes[b]
        single = ops.dpc_cluster(xi, 5, bw, 8, hard=True, backend=backend)
        torch.testing.assert_close(batched.density[b, :n], single.density[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(batched.delta[b, :n], single.delta[0], rtol=1e-5, atol=1e-6)
        assert torch.equal(batched.parent[b, :n], single.parent[0])
        assert torch.equal(batched.seeds[b], single.seeds[0])
        assert torch.equal(batched.num_clusters[b], single.num_clusters[0])
        torch.testing.assert_close(batched.masks[b, :, :n], single.masks[0])
        assert (batched.masks[b, :, n:] == 0).all()


# ---- dtypes, layouts ------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_compute_in_float32(backend, dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 60, 16, generator=g).to(dtype)
    r = ops.dpc_cluster(x, 5, 0.9, 8, backend=backend)
    r32 = ops.dpc_cluster(x.float(), 5, 0.9, 8, backend=backend)
    assert r.density.dtype == torch.float32 and r.masks.dtype == torch.float32
    _agree(r, r32, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous(backend):
    g = torch.Generator().manual_seed(2)
    base = torch.randn(40, 2, 33, generator=g)
    x = base.transpose(0, 1)[:, :, :32]  # (2, 40, 32), non-contiguous
    assert not x.is_contiguous()
    a = ops.dpc_cluster(x, 5, 0.9, 8, backend=backend)
    b = ops.dpc_cluster(x.contiguous(), 5, 0.9, 8, backend=backend)
    _agree(a, b, rtol=0, atol=0)


# ---- gradients -------------------------------------------------------------------------

def _masks_fn(backend, hard, bw=0.9, T=5):
    def f(x):
        return ops.dpc_cluster(x, 3, bw, T, hard=hard, backend=backend).masks
    return f


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_soft(backend):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_masks_fn(backend, hard=False), (x,), eps=1e-6, atol=1e-5)
    valid = torch.tensor([[True] * 9, [True] * 6 + [False] * 3])
    f = lambda x: ops.scope_cluster(x, torch.rand(2, 9, generator=torch.Generator().manual_seed(0),
                                                  dtype=torch.float64), 1.1, 4, False, valid=valid,
                                    backend=backend)[0]
    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_hard_straight_through(backend):
    """Hard mode: the forward is hard, the backward is the soft alpha's gradient through
    the hard scope chain. gradcheck the surrogate whose gradient that is by definition:
    masks(alpha = hard_values + soft(x) - soft(x0)), with seeds fixed at x0."""
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(1, 10, 3, generator=g, dtype=torch.float64)
    bw, T = 1.0, 6
    ref = ops.dpc_cluster(x0, 3, bw, T, hard=True, backend="reference")
    seeds, n = ref.seeds[0], int(ref.num_clusters[0])
    d2_0 = R.sqdist(x0)[0]

    def surrogate(x):
        d2 = ((x[0, :, None] - x[0, None, seeds[:n]]) ** 2).sum(-1) / 3  # (N, n)
        soft = torch.exp2(-d2 / bw**2)
        soft0 = torch.exp2(-d2_0[:, seeds[:n]] / bw**2)
        hard0 = (d2_0[:, seeds[:n]] <= bw**2).double()
        alpha = hard0 + soft - soft0
        scope, rows = torch.ones(10, dtype=x.dtype), []
        for t in range(n):
            rows.append(scope * alpha[:, t])
            scope = scope * (1 - alpha[:, t])
        rows.append(scope)
        return torch.stack(rows)

    x = x0.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(surrogate, (x,), eps=1e-6, atol=1e-6)
    w = torch.randn(n + 1, 10, generator=g, dtype=torch.float64)
    (gs,) = torch.autograd.grad((surrogate(x) * w).sum(), x)
    masks = ops.dpc_cluster(x, 3, bw, T, hard=True, backend=backend).masks
    torch.testing.assert_close(masks[0, : n + 1].detach(), surrogate(x0))  # same forward
    (gb,) = torch.autograd.grad((masks[0, : n + 1] * w).sum(), x)
    torch.testing.assert_close(gb, gs)


@pytest.mark.parametrize("hard", [True, False])
def test_cpu_backward_matches_reference(hard):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 70, 48, generator=g, requires_grad=True)
    valid = torch.ones(2, 70, dtype=torch.bool)
    valid[1, 50:] = False
    w = torch.randn(2, 9, 70, generator=g)
    grads = []
    for be in ["reference", "cpu"]:
        m = ops.dpc_cluster(x, 5, 1.2, 8, hard=hard, valid=valid, backend=be).masks
        grads.append(torch.autograd.grad((m * w).sum(), x)[0])
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)
    assert grads[0].abs().sum() > 0
    assert (grads[1][1, 50:] == 0).all()  # padding gets no gradient


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_gradients_flow(backend):
    x = torch.randn(1, 20, 8).to(torch.bfloat16).requires_grad_(True)
    m = ops.dpc_cluster(x, 3, 1.0, 4, hard=False, backend=backend).masks
    m[:, 0].sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16


def test_scores_carry_no_gradient():
    x = torch.randn(1, 10, 4, requires_grad=True)
    for be in BACKENDS:
        d = ops.knn_density(x, 3, backend=be)
        delta, _ = ops.delta_distance(x, d, backend=be)
        assert not d.requires_grad and not delta.requires_grad


# ---- torch.library / torch.compile --------------------------------------------------------

def test_opcheck():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 12, 5, generator=g, requires_grad=True)
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[0, 9:] = False
    score = torch.rand(2, 12, generator=g)
    so = torch.ops.setok
    cases = [
        (so.knn_density.default, (x.detach(), 3, valid)),
        (so.delta_distance.default, (x.detach(), score, valid)),
        (so.dpc_scores.default, (x.detach(), 3, None)),
        (so.scope_cluster.default, (x, score, 0.9, 4, True, 0.0, None, valid)),
        (so.scope_cluster.default, (x, score, 0.9, 4, False, 0.0, 0.1, None)),
        (so.dpc_cluster.default, (x, 3, 0.9, 4, True, 0.0, None, valid)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    def f(x, valid):
        density = ops.knn_density(x, 4, valid)
        delta, parent = ops.delta_distance(x, density, valid)
        masks, seeds, num = ops.scope_cluster(x, density * delta, 0.9, 6, True, valid=valid)
        return masks[:, 0].sum() + 0.5 * masks[:, 1].sum() + num.sum(), seeds

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True)  # inductor: fake kernels, autograd and codegen around the ops
    x = torch.randn(2, 30, 8, requires_grad=True)
    valid = torch.ones(2, 30, dtype=torch.bool)
    valid[1, 20:] = False
    a, sa = f(x, valid)
    b, sb = cf(x, valid)
    torch.testing.assert_close(a, b)
    assert torch.equal(sa, sb)
    ga = torch.autograd.grad(a, x)[0]
    gb = torch.autograd.grad(b, x)[0]
    torch.testing.assert_close(ga, gb)


# ---- bad arguments ------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_arguments_name_the_argument(backend):
    x = torch.randn(1, 5, 3)
    with pytest.raises(ValueError, match="x must have shape"):
        ops.knn_density(torch.randn(5, 3), 2, backend=backend)
    with pytest.raises(ValueError, match="k must be >= 1"):
        ops.knn_density(x, 0, backend=backend)
    with pytest.raises(TypeError, match="k must be an int"):
        ops.knn_density(x, 2.5, backend=backend)
    with pytest.raises(ValueError, match="bandwidth"):
        ops.scope_cluster(x, torch.rand(1, 5), 0.0, 3, backend=backend)
    with pytest.raises(ValueError, match="bandwidth"):
        ops.dpc_cluster(x, 2, -1.0, 3, backend=backend)
    with pytest.raises(ValueError, match="max_clusters"):
        ops.dpc_cluster(x, 2, 1.0, 0, backend=backend)
    with pytest.raises(ValueError, match="valid must have shape"):
        ops.knn_density(x, 2, torch.ones(1, 4, dtype=torch.bool), backend=backend)
    with pytest.raises(TypeError, match="valid must be a bool"):
        ops.knn_density(x, 2, torch.ones(1, 5), backend=backend)
    with pytest.raises(ValueError, match="density must have shape"):
        ops.delta_distance(x, torch.rand(2, 5), backend=backend)
    with pytest.raises(ValueError, match="score must have shape"):
        ops.scope_cluster(x, torch.rand(1, 6), 1.0, 3, backend=backend)
    with pytest.raises(ValueError, match="min_scope"):
        ops.scope_cluster(x, torch.rand(1, 5), 1.0, 3, min_scope=1.5, backend=backend)


def test_bad_backend_and_devices():
    x = torch.randn(1, 5, 3)
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.knn_density(x, 2, backend="tpu")
    with pytest.raises(ValueError, match="cannot run a tensor on device 'cpu'"):
        ops.knn_density(x, 2, backend="cuda")
    with pytest.raises(ValueError, match="x is on"):
        ops.knn_density(x, 2, torch.ones(1, 5, dtype=torch.bool, device="meta"))


def test_backend_from_environment(monkeypatch):
    monkeypatch.setenv("SETOK_BACKEND", "reference")
    assert ops._backend(None, torch.zeros(1)) == "reference"
    monkeypatch.setenv("SETOK_BACKEND", "nope")
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.knn_density(torch.randn(1, 4, 2), 2)


def test_default_backend_is_compiled():
    assert ops.default_backend("cpu") == "cpu"
    info = ops.build_info()
    # built against the torch that runs it (an extension from another torch fails at import or worse)
    assert torch.__version__.split("+")[0] == info["torch_version"]
    assert info["openmp"] is True
    if info["with_cuda"]:
        assert torch.version.cuda is not None


# ---- CUDA (skips cleanly without a GPU) ------------------------------------------------------

cuda = pytest.mark.skipif(not ops.has_backend("cuda"), reason="needs a CUDA device and a CUDA build")


@cuda
@pytest.mark.parametrize("N,D", [(1, 3), (7, 1), (97, 64), (577, 1024)])
@pytest.mark.parametrize("hard", [True, False])
def test_cuda_matches_cpu(N, D, hard):
    g = torch.Generator().manual_seed(N + D)
    x = torch.randn(3, N, D, generator=g)
    valid = torch.ones(3, N, dtype=torch.bool)
    valid[2, N // 2:] = N < 2
    bw = _bw_for(x)
    for k in sorted({1, 5, N + 2, 80}):
        cpu = ops.dpc_cluster(x, k, bw, 16, hard, valid=valid, backend="cpu")
        gpu = ops.dpc_cluster(x.cuda(), k, bw, 16, hard, valid=valid.cuda(), backend="cuda")
        _agree(cpu, ops.DPCResult(*[t.cpu() for t in gpu]), rtol=1e-4, atol=1e-5)


@cuda
@pytest.mark.parametrize("hard", [True, False])
def test_cuda_backward_matches_cpu(hard):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 90, 40, generator=g)
    w = torch.randn(2, 9, 90, generator=g)
    out = []
    for dev in ["cpu", "cuda"]:
        xd = x.to(dev).requires_grad_(True)
        m = ops.dpc_cluster(xd, 5, 1.2, 8, hard=hard, backend=dev).masks
        out.append(torch.autograd.grad((m * w.to(dev)).sum(), xd)[0].cpu())
    torch.testing.assert_close(out[1], out[0], rtol=1e-4, atol=1e-5)


@cuda
def test_cuda_golden():
    for c in _golden_cases():
        a = _run_case(c, "reference", torch.float64)
        x = torch.tensor(c["x"], dtype=torch.float64)[None].cuda()
        v = torch.tensor(c["valid"])[None].cuda()
        b = ops.dpc_cluster(x, c["k"], c["bandwidth"], c["max_clusters"], c["hard"], c["min_scope"],
                            c["score_threshold"], v, backend="cuda")
        _agree(a, ops.DPCResult(*[t.cpu() for t in b]))


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_ties_at_the_kth_distance(k):
    """Equally spaced points: many neighbours tie at the k-th distance, which is where the
    CPU delta pass must fall back from the neighbour lists to a full scan."""
    x = torch.cat([torch.arange(12.0), torch.arange(12.0) * 2 + 0.5]).view(1, 24, 1)
    ref = ops.dpc_cluster(x, k, 1.0, 6, hard=True, backend="reference")
    cpu = ops.dpc_cluster(x, k, 1.0, 6, hard=True, backend="cpu")
    _agree(ref, cpu, rtol=0, atol=0)


def test_profile_names_the_path_taken():
    """The phase log (bench-kernels --profile) shows which path ran: one image with spare
    threads takes the single parallel region (no separate GEMM phase), as many images as
    threads take whole images; with profiling off nothing is recorded."""
    from setok_cli.bench.kernels import profile_phases
    from setok_cli.ops._ext import _C

    prev = torch.get_num_threads()
    x1, x2 = torch.randn(1, 64, 48), torch.randn(2, 64, 48)
    try:
        torch.set_num_threads(2)
        _C._set_profile(True)
        ops.dpc_cluster(x1, 5, 1.0, 8, backend="cpu")
        assert [n for n, _ in _C._last_profile()] == ["outputs", "setup", "task region"]
        kinds = dict(_C._last_profile_tasks())
        assert list(kinds) == ["norms", "gram panels", "rows+density", "delta", "scope", "wait"]
        assert all(kinds[k] > 0 for k in ["norms", "gram panels", "rows+density", "delta", "scope"])
        ops.dpc_cluster(x2, 5, 1.0, 8, backend="cpu")
        assert [n for n, _ in _C._last_profile()] == ["outputs", "whole images"]
        assert _C._last_profile_tasks() == []
        _C._set_profile(False)
        ops.dpc_cluster(x1, 5, 1.0, 8, backend="cpu")
        assert [n for n, _ in _C._last_profile()] == ["outputs", "whole images"]  # the last profiled call
        r = profile_phases(1, 64, 48, rounds=2)
        assert set(r["phases_ms"]) == {"outputs", "setup", "task region", "other"}
        assert set(r["tasks_ms"]) == {"norms", "gram panels", "rows+density", "delta", "scope", "wait"}
    finally:
        _C._set_profile(False)
        torch.set_num_threads(prev)


def test_bench_kernels_threads_option():
    """`setok bench-kernels --threads 1` runs the pipeline on one thread: one image then takes
    the whole-image path (no task region), which the profile shows."""
    import json

    from click.testing import CliRunner

    from setok_cli.cli.main import cli

    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        res = CliRunner().invoke(cli, ["bench-kernels", "--profile", "--quick", "--rounds", "1", "--threads", "1",
                                       "--json"])
        assert res.exit_code == 0, res.output
        out = json.loads(res.stdout.strip().splitlines()[-1])
        assert out["threads"] == 1
        one = out["shapes"][0]
        assert (one["B"], one["N"]) == (1, 576)
        assert set(one["phases_ms"]) == {"outputs", "whole images", "other"} and one["tasks_ms"] == {}
    finally:
        torch.set_num_threads(prev)
