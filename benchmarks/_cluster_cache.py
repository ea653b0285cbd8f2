"""The frozen clustering of a shapes-world folder, computed once and cached (shared by
detok_ablation.py and token_probe.py: the same file serves both)."""
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from setok_cli.data.datasets import PairsDataset, collate


def _precompute(setok, data: str, split: str, size: int, n=None) -> dict:
    ds = PairsDataset(f"{data}/{split}/pairs.json", image_size=64)
    n = len(ds) if n is None else n
    X, Fs, L, NT, idx = [], [], [], [], []
    for s in range(0, n, 50):
        b = collate([ds[i] for i in range(s, min(n, s + 50))])
        with torch.no_grad():
            o = setok(F.interpolate(b["pixel_values"], size=(size,) * 2, mode="bilinear", antialias=True))
        X.append(b["pixel_values"]); Fs.append(o.features.flatten(1, 2)); L.append(o.labels.flatten(1))
        NT.append(o.num_tokens); idx += b["index"].tolist()
    return dict(x=torch.cat(X), f=torch.cat(Fs), l=torch.cat(L), nt=torch.cat(NT), idx=idx)


def cluster_cache(setok, data: str, out: Path, size: int, k: int, bw: float, maxtok: int, ntest: int = 250) -> dict:
    """{"train", "test"} -> dict(x images (n, 3, 64, 64), f features (n, N, D), l labels (n, N),
    nt token counts (n,), idx record indices); cached in out/cache_{size}_{k}_{bw}_{maxtok}.pt."""
    cache = Path(out) / f"cache_{size}_{k}_{bw}_{maxtok}.pt"
    if cache.exists():
        return torch.load(cache, weights_only=False)
    t = time.time()
    C = {"train": _precompute(setok, data, "train", size), "test": _precompute(setok, data, "test", size, ntest)}
    torch.save(C, cache)
    print(f"clustering computed in {time.time() - t:.0f} s", flush=True)
    return C
