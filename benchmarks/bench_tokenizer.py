"""Tokenizer throughput on 336 x 336 photos with the builtin encoder.

    python benchmarks/bench_tokenizer.py [--batch 8] [--repeats 5] [--merger-batch 16] [--json]

Reports (medians over --repeats after one warm-up):
  * images/s of SeTok.tokenize end to end (PIL images in, TokenizerOutput out), and the
    split of one forward into encoder / clustering (head, scaling, PE, DPC + scope loop) /
    merger time;
  * the merger at batch --merger-batch: packed varlen pass vs a per-cluster Python loop
    (the authors' structure), their ratio, the achieved GFLOP/s against this machine's
    float32 GEMM measured in the same run, and the max difference between the two.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from setok_cli import ops  # noqa: E402
from setok_cli.models.clustering import cluster  # noqa: E402
from setok_cli.models.setok import load_tokenizer  # noqa: E402

PHOTOS = ["chelsea.png", "astronaut.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "camera.png",
          "ihc.png", "retina.jpg"]


def photos(n: int):
    import skimage
    from PIL import Image

    d = os.path.join(os.path.dirname(skimage.__file__), "data")
    ims = [Image.open(os.path.join(d, f)).convert("RGB").resize((336, 336), Image.Resampling.BICUBIC) for f in PHOTOS]
    return [ims[i % len(ims)] for i in range(n)]


def timed(fn, repeats: int):
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), out


def gemm_gflops(n: int = 1024, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    t, _ = timed(lambda: a @ b, repeats)
    return 2 * n ** 3 / t / 1e9


def loop_merger(m, x, labels, num_tokens, grid):
    """The merger one cluster at a time (the authors' loop), same weights."""
    e = m.embed(x, grid)
    B = x.shape[0]
    out = torch.zeros(B, int(num_tokens.max()), m.out.out_features)
    for b in range(B):
        us = []
        for i in range(int(num_tokens[b])):
            z = e[b, labels[b] == i].unsqueeze(0)
            for blk in m.blocks:
                z = blk.dense(z)
            us.append(z[0].mean(0))
        u = torch.stack(us).unsqueeze(0)
        for blk in m.cross:
            u = blk.dense(u)
        out[b, :len(us)] = m.out(m.norm(u))[0]
    return out


def merger_flops(m, lens: torch.Tensor, num_tokens: torch.Tensor) -> float:
    d = m.dim
    hidden = m.blocks[0].mlp[0].out_features if len(m.blocks) else 4 * d
    P = float(lens.sum())
    per_tok = 2 * (3 * d * d + d * d + 2 * d * hidden)  # qkv, proj, FFN
    within = len(m.blocks) * (P * per_tok + 4 * d * float((lens.float() ** 2).sum()))
    K = float(num_tokens.sum())
    cross = len(m.cross) * (K * per_tok + 4 * d * float((num_tokens.float() ** 2).sum()))
    return within + cross + 2 * P * m.in_proj.in_features * d


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--merger-batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--soft", action="store_true", help="also time the dense soft-mask merger path (slow)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = load_tokenizer().eval()
    cfg = model.config
    res = {"torch": torch.__version__, "threads": torch.get_num_threads(), "ops_backend": ops.default_backend("cpu"),
           "batch": a.batch, "image": "336x336", "encoder": cfg.encoder, "mode": cfg.mode,
           "merger_dim": cfg.merger_dim, "token_dim": cfg.token_dim}

    ims = photos(a.batch)
    t_tok, out = timed(lambda: model.tokenize(ims), a.repeats)
    res["tokenize_s"] = t_tok
    res["images_per_s"] = a.batch / t_tok
    res["tokens_mean"] = float(out.num_tokens.float().mean())

    # stage split of one forward on the preprocessed batch
    px, valid, _, _ = model.preprocess(ims)
    t_pre, _ = timed(lambda: model.preprocess(ims), a.repeats)
    with torch.no_grad():
        t_enc, feats = timed(lambda: model.encoder(px), a.repeats)
        B, h, w, D = feats.shape
        f = feats.reshape(B, h * w, D)
        v = valid.reshape(B, -1)

        def clus():
            z = model.clustering_features(f, v, (h, w))
            return cluster(z, cfg.mode, k=cfg.k, bandwidth=cfg.bandwidth, max_tokens=cfg.max_tokens,
                           min_scope=model._min_scope(), threshold=model._threshold(), valid=v)

        t_clu, cl = timed(clus, a.repeats)
        t_mer, _ = timed(lambda: model.merger(f, cl.masks, cl.labels, cl.num_tokens, (h, w)), a.repeats)
    res.update(preprocess_s=t_pre, encoder_s=t_enc, clustering_s=t_clu, merger_s=t_mer,
               per_image_ms={k: 1000 * t / a.batch for k, t in
                             (("preprocess", t_pre), ("encoder", t_enc), ("clustering", t_clu), ("merger", t_mer))})

    # merger: packed vs per-cluster loop at batch merger_batch
    ims16 = photos(a.merger_batch)
    px, valid, _, _ = model.preprocess(ims16)
    with torch.no_grad():
        feats = model.encoder(px)
        B, h, w, D = feats.shape
        f = feats.reshape(B, h * w, D)
        v = valid.reshape(B, -1)
        z = model.clustering_features(f, v, (h, w))
        cl = cluster(z, cfg.mode, k=cfg.k, bandwidth=cfg.bandwidth, max_tokens=cfg.max_tokens, valid=v)
        m = model.merger
        t_packed, yp = timed(lambda: m(f, cl.masks, cl.labels, cl.num_tokens, (h, w)), a.repeats)
        t_loop, yl = timed(lambda: loop_merger(m, f, cl.labels, cl.num_tokens, (h, w)), a.repeats)
        t_soft = (timed(lambda: m(f, cl.masks, cl.labels, cl.num_tokens, (h, w), hard=False), a.repeats)[0]
                  if a.soft else float("nan"))
    seg = cl.labels + (torch.arange(B).view(B, 1) * cl.masks.shape[1])
    lens = torch.bincount(seg[cl.labels >= 0].flatten())
    lens = lens[lens > 0]
    flops = merger_flops(m, lens, cl.num_tokens)
    gemm = gemm_gflops()
    res["merger"] = {"batch": B, "clusters": int(cl.num_tokens.sum()), "patches": int(lens.sum()),
                     "sum_sq_cluster_sizes": int((lens ** 2).sum()), "clusters_x_N2": int(cl.num_tokens.sum()) * (h * w) ** 2,
                     "packed_ms": 1000 * t_packed, "loop_ms": 1000 * t_loop, "dense_soft_ms": 1000 * t_soft,
                     "loop_over_packed": t_loop / t_packed, "max_abs_diff": float((yp - yl).abs().max()),
                     "packed_gflops": flops / t_packed / 1e9, "gemm_gflops": gemm,
                     "fraction_of_gemm": flops / t_packed / 1e9 / gemm}

    if a.json:
        print(json.dumps(res, indent=2))
        return
    pi = res["per_image_ms"]
    print(f"torch {res['torch']}, {res['threads']} threads, ops backend {res['ops_backend']}; "
          f"builtin encoder, {cfg.mode} mode, merger width {cfg.merger_dim}, token_dim {cfg.token_dim}")
    print(f"tokenize, batch {a.batch} of 336x336 photos: {res['images_per_s']:.1f} images/s "
          f"({1000 * t_tok / a.batch:.1f} ms/image, {res['tokens_mean']:.1f} tokens/image)")
    print(f"  per image: preprocess {pi['preprocess']:.1f} ms | encoder {pi['encoder']:.1f} ms | "
          f"clustering {pi['clustering']:.1f} ms | merger {pi['merger']:.1f} ms")
    mm = res["merger"]
    print(f"merger at batch {mm['batch']} ({mm['clusters']} clusters, {mm['patches']} patches): "
          f"packed {mm['packed_ms']:.1f} ms, per-cluster loop {mm['loop_ms']:.1f} ms "
          f"-> {mm['loop_over_packed']:.2f}x; dense soft path {mm['dense_soft_ms']:.1f} ms; "
          f"max |packed - loop| {mm['max_abs_diff']:.1e}")
    print(f"  packed: {mm['packed_gflops']:.1f} GFLOP/s = {100 * mm['fraction_of_gemm']:.0f}% of this machine's "
          f"fp32 GEMM ({mm['gemm_gflops']:.1f} GFLOP/s); attention work sum s^2 = {mm['sum_sq_cluster_sizes']} "
          f"vs clusters x N^2 = {mm['clusters_x_N2']}")


if __name__ == "__main__":
    main()
