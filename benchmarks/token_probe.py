"""How much of an object's shape its token carries: a linear-probe-style test on the shapes world.

    python benchmarks/token_probe.py --data DATA [--size 224] [--rel 4] [--relh 128] [--crop 16] [--steps 700]

DATA is `setok data shapes --out DATA --n 2500 --size 64 --seed 0`. The frozen clustering
(builtin encoder) is computed once and cached in --out; then a fresh merger and a 2-layer
MLP head learn, with cross-entropy, the shape (8 kinds) of the object that holds the
majority of each token's patches (tokens that are mostly background are left out). Prints
the test accuracy over the tokens of the first 250 test images and the confusion matrix:
what a decoder can at best learn to draw from the token, at this grid and merger.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from setok_cli.data.datasets import PairsDataset
from setok_cli.data.shapes import SHAPES
from setok_cli.models.setok import SeTok, SeTokConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cluster_cache import cluster_cache  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--data", required=True, help="a shapes-world folder (setok data shapes)")
ap.add_argument("--out", default="probe_out", help="cache folder")
ap.add_argument("--size", type=int, default=224, help="tokenizer image size (224: 16 x 16 grid)")
ap.add_argument("--k", type=int, default=8)
ap.add_argument("--bw", type=float, default=0.6)
ap.add_argument("--maxtok", type=int, default=16)
ap.add_argument("--rel", type=int, default=0, help="merger_relative_pe")
ap.add_argument("--relh", type=int, default=0, help="merger_relative_hidden")
ap.add_argument("--crop", type=int, default=0, help="merger_crop (the crop encoder reads the 64-px images)")
ap.add_argument("--mdim", type=int, default=64)
ap.add_argument("--mdepth", type=int, default=1)
ap.add_argument("--steps", type=int, default=700)
ap.add_argument("--threads", type=int, default=1)
a = ap.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)
OUT = Path(a.out)
OUT.mkdir(parents=True, exist_ok=True)
cfg = SeTokConfig(encoder="builtin", image_size=a.size, image_policy="squash", k=a.k, bandwidth=a.bw,
                  max_tokens=a.maxtok, merger_dim=a.mdim, merger_depth=a.mdepth, merger_cross_depth=1, token_dim=64,
                  merger_relative_pe=a.rel, merger_relative_hidden=a.relh, merger_crop=a.crop)
setok = SeTok(cfg)
g = a.size // 14


C = cluster_cache(setok, a.data, OUT, a.size, a.k, a.bw, a.maxtok)  # the same cache as detok_ablation.py


def targets(split, C):
    """(n, maxtok) shape index of the object holding most of each token's patches, -1 if none."""
    ds = PairsDataset(f"{a.data}/{split}/pairs.json", image_size=64)
    shp = torch.full((len(C["idx"]), a.maxtok), -1, dtype=torch.long)
    for j, i in enumerate(C["idx"]):
        objs = json.loads((ds.root / ds.records[i]["scene"]).read_text())["objects"]
        ids = ds[i]["instances"]
        share = F.interpolate(F.one_hot(ids, len(objs) + 1).permute(2, 0, 1)[None].float(), size=(g, g),
                              mode="area")[0]  # (n+1, g, g) area share of each instance per patch
        lab = C["l"][j].view(g, g)
        for t in range(int(C["nt"][j])):
            m = (lab == t).float()
            cnt = (share * m).flatten(1).sum(1)
            o = int(cnt.argmax())
            if o > 0 and cnt[o] > 0.5 * m.sum():
                shp[j, t] = SHAPES.index(objs[o - 1]["shape"])
    return shp


Ytr, Yte = targets("train", C["train"]), targets("test", C["test"])
head = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, len(SHAPES)))
params = list(setok.merger.parameters()) + list(head.parameters())
opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=1e-3)


def tokens(C, ii):
    l, nt = C["l"][ii], C["nt"][ii]
    K = int(nt.max())
    masks = F.one_hot(l.clamp_min(0), K).permute(0, 2, 1).float()
    return setok.merger(C["f"][ii], masks, l, nt, (g, g), hard=True, pixels=C["x"][ii] if a.crop else None), K


gen = torch.Generator().manual_seed(0)
n = C["train"]["x"].shape[0]
t0 = time.time()
for step in range(a.steps):
    ii = torch.randint(0, n, (16,), generator=gen)
    tok, K = tokens(C["train"], ii)
    y = Ytr[ii][:, :K]
    loss = F.cross_entropy(head(tok)[y >= 0], y[y >= 0])
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 100 == 0:
        print(f"step {step} loss {loss.item():.3f}", flush=True)
with torch.no_grad():
    tok, K = tokens(C["test"], torch.arange(len(C["test"]["idx"])))
    y = Yte[:, :K]
    pred = head(tok).argmax(-1)[y >= 0]
    y = y[y >= 0]
conf = torch.zeros(len(SHAPES), len(SHAPES), dtype=torch.long)
conf.index_put_((y, pred), torch.ones_like(y), accumulate=True)
res = dict(size=a.size, grid=g, rel=a.rel, relh=a.relh, crop=a.crop, steps=a.steps, tokens=int(y.numel()),
           shape_accuracy=round((pred == y).float().mean().item(), 4), train_s=round(time.time() - t0))
print("rows: true shape, columns: predicted;", ", ".join(SHAPES))
print(conf)
print(json.dumps(res))
