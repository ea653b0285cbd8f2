"""Detokenizer ablations on the shapes world, fast: the frozen clustering is computed once
(and cached), then only the merger and the detokenizer train, on the denoising loss alone;
the result is scored by `setok_cli.eval.reconstruct.evaluate_reconstruction` (what
`setok eval reconstruct` prints), on the val split unless told otherwise.

    python benchmarks/detok_ablation.py --data DATA --coord 2 --append 1 --tag coord_append
        [--canvas 8 --crw 1.0] [--size 224] [--steps 700] [--ntest 100] [--split val]
        [--canvas 8 --ckind sprite --cgrid 32 --chid 256 --crw 1 --ctarget instances --sil 1 --mlr 1e-2]

DATA is `setok data shapes --out DATA --n 2500 --size 64 --seed 0`. Prints and appends to
OUT/results.jsonl the evaluation's fields (recon_object_recall: objects right in shape,
colour and position in the samples; canvas_object_recall: in the token canvas alone) with
the run's arguments; writes OUT/TAG.png (originals / samples / canvas).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from setok_cli.data.datasets import PairsDataset
from setok_cli.eval.reconstruct import evaluate_reconstruction
from setok_cli.files import atomic_write_text, ensure_dir
from setok_cli.models.detokenizer import Detokenizer, DetokenizerConfig, MapperConfig, instance_canvas_targets
from setok_cli.models.setok import SeTok, SeTokConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cluster_cache import cluster_cache  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="a shapes-world folder (setok data shapes)")
    ap.add_argument("--out", default="ablation_out", help="cache, pictures and results.jsonl")
    ap.add_argument("--tag", default="x", help="name of this run")
    ap.add_argument("--split", default="val", help="the split scored (choices are made on val)")
    ap.add_argument("--size", type=int, default=224, help="tokenizer image size (224: 16 x 16 grid)")
    ap.add_argument("--k", type=int, default=8, help="clustering neighbours")
    ap.add_argument("--bw", type=float, default=0.6, help="clustering bandwidth")
    ap.add_argument("--maxtok", type=int, default=16, help="max tokens per image")
    ap.add_argument("--mdim", type=int, default=64, help="merger width")
    ap.add_argument("--mdepth", type=int, default=1, help="merger blocks within a cluster")
    ap.add_argument("--tdim", type=int, default=64, help="token width")
    ap.add_argument("--rel", type=int, default=0, help="merger_relative_pe (octaves; 0: off)")
    ap.add_argument("--relh", type=int, default=0, help="merger_relative_hidden (0: Linear)")
    ap.add_argument("--crop", type=int, default=0, help="merger_crop (crop side; 0: off)")
    ap.add_argument("--cropw", type=int, default=16, help="merger_crop_width")
    ap.add_argument("--coord", type=int, default=2, help="detokenizer.coord_channels")
    ap.add_argument("--append", type=int, default=0, help="mapper.append_tokens (0/1)")
    ap.add_argument("--queries", type=int, default=8, help="mapper queries")
    ap.add_argument("--canvas", type=int, default=0, help="canvas_channels (0: no canvas)")
    ap.add_argument("--ckind", default="mlp", help="canvas_kind")
    ap.add_argument("--cgrid", type=int, default=16, help="canvas_grid")
    ap.add_argument("--chid", type=int, default=64, help="canvas_hidden")
    ap.add_argument("--crw", type=float, default=0, help="canvas_recon_weight")
    ap.add_argument("--cmw", type=float, default=0, help="canvas_mask_weight")
    ap.add_argument("--coct", type=int, default=6, help="canvas_octaves (kind local)")
    ap.add_argument("--ctarget", default="clusters", help="canvas_mask_target: clusters | instances")
    ap.add_argument("--cwin", type=int, default=16, help="canvas_window (kind sprite)")
    ap.add_argument("--place", type=float, default=1.0, help="canvas_place_weight (kind sprite)")
    ap.add_argument("--sil", type=float, default=0.0, help="canvas_silhouette_weight (kind sprite)")
    ap.add_argument("--skip", type=int, default=0, help="canvas_skip (0/1): x0 = canvas image + UNet residual")
    ap.add_argument("--mlr", type=float, default=None, help="learning rate of the merger and the canvas (default: --lr)")
    ap.add_argument("--channels", default="32,64,64", help="UNet block widths")
    ap.add_argument("--res", type=int, default=32, help="UNet resolution")
    ap.add_argument("--pred", default="sample", help="prediction_type")
    ap.add_argument("--steps", type=int, default=700, help="training steps")
    ap.add_argument("--bs", type=int, default=16, help="batch size")
    ap.add_argument("--lr", type=float, default=2e-3, help="learning rate")
    ap.add_argument("--ntest", type=int, default=100, help="images scored")
    ap.add_argument("--sample_steps", type=int, default=20, help="DDIM steps")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    return ap.parse_args(argv)


def build(a: argparse.Namespace) -> tuple[SeTok, Detokenizer]:
    cfg = SeTokConfig(encoder="builtin", image_size=a.size, image_policy="squash", k=a.k, bandwidth=a.bw,
                      max_tokens=a.maxtok, merger_dim=a.mdim, merger_depth=a.mdepth, merger_cross_depth=1,
                      token_dim=a.tdim, merger_relative_pe=a.rel, merger_relative_hidden=a.relh,
                      merger_crop=a.crop, merger_crop_width=a.cropw)
    ch = tuple(int(c) for c in a.channels.split(","))
    mapper = MapperConfig(token_dim=a.tdim, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128,
                          num_queries=a.queries, output_dim=64, append_tokens=bool(a.append))
    dcfg = DetokenizerConfig(
        space="pixel", image_size=a.res, unet_preset="tiny", coord_channels=a.coord,
        unet=dict(block_out_channels=ch) if ch != (32, 64, 64) else {}, mapper=mapper,
        canvas_channels=a.canvas, canvas_recon_weight=a.crw, canvas_kind=a.ckind, canvas_hidden=a.chid,
        canvas_grid=a.cgrid, canvas_mask_weight=a.cmw, canvas_octaves=a.coct, canvas_mask_target=a.ctarget,
        canvas_window=a.cwin, canvas_place_weight=a.place, canvas_silhouette_weight=a.sil,
        canvas_skip=bool(a.skip), prediction_type=a.pred, sample_steps=a.sample_steps,
        beta_schedule="squaredcos_cap_v2")
    return SeTok(cfg), Detokenizer(dcfg)


def merge(setok: SeTok, cache: dict, ii: torch.Tensor, grid: tuple[int, int], crop: bool):
    """The cached clustering of images ii through the (training) merger -> tokens (B, K, T),
    token_mask (B, K), clustering masks (B, K, h, w)."""
    lab, nt = cache["l"][ii], cache["nt"][ii]
    K = int(nt.max())
    masks = F.one_hot(lab.clamp_min(0), K).permute(0, 2, 1).float()
    tokens = setok.merger(cache["f"][ii], masks, lab, nt, grid, hard=True, pixels=cache["x"][ii] if crop else None)
    token_mask = torch.arange(K).view(1, K) < nt.view(-1, 1)
    return tokens, token_mask, masks.view(masks.shape[0], K, *grid)


def train(a: argparse.Namespace, setok: SeTok, det: Detokenizer, cache: dict, instances) -> tuple[float, float]:
    """The merger and the detokenizer on the denoising loss alone -> (seconds, last loss)."""
    grid = (a.size // 14,) * 2
    fast = list(setok.merger.parameters()) + (list(det.canvas.parameters()) if det.canvas is not None else [])
    rest = [p for p in det.parameters() if all(p is not q for q in fast)]
    opt = torch.optim.AdamW([dict(params=fast, lr=a.mlr or a.lr), dict(params=rest, lr=a.lr)], weight_decay=1e-3)
    from transformers import get_cosine_schedule_with_warmup
    sch = get_cosine_schedule_with_warmup(opt, int(0.05 * a.steps), a.steps)
    wants_masks = a.canvas > 0 and (a.cmw > 0 or a.ckind == "sprite")  # the sprites learn their boxes from them
    g = torch.Generator().manual_seed(0)
    n = cache["x"].shape[0]
    t0, loss = time.time(), torch.zeros(())
    det.train(), setok.train()
    for step in range(a.steps):
        ii = torch.randint(0, n, (a.bs,), generator=g)
        tok, tm, masks = merge(setok, cache, ii, grid, bool(a.crop))
        if wants_masks and instances is not None:
            masks = instance_canvas_targets(masks, instances[ii])
        loss = det(cache["x"][ii], tok, tm, generator=g, masks=masks if wants_masks else None)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(fast + rest, 1.0)
        opt.step()
        sch.step()
        if step % 50 == 0 or step == a.steps - 1:
            print(f"step {step} loss {loss.item():.4f} t {time.time() - t0:.0f}s", flush=True)
    return time.time() - t0, loss.item()


def main(argv=None) -> dict:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    out = ensure_dir(Path(a.out))
    setok, det = build(a)
    print("params", sum(p.numel() for p in det.parameters()), flush=True)
    cache = cluster_cache(setok, a.data, out, a.size, a.k, a.bw, a.maxtok)["train"]
    instances = None
    if a.ctarget == "instances":
        ds = PairsDataset(f"{a.data}/train/pairs.json", image_size=64)
        instances = torch.stack([ds[i]["instances"] for i in cache["idx"]])
    seconds, last = train(a, setok, det, cache, instances)
    det.eval(), setok.eval()
    res = evaluate_reconstruction(setok, det, data=f"{a.data}/{a.split}/pairs.json", limit=a.ntest,
                                  steps=a.sample_steps, image_size=64, grid=out / f"{a.tag}.png")
    res = dict(tag=a.tag, args=vars(a), train_s=round(seconds), final_loss=last, **res)
    print(json.dumps(res), flush=True)
    log = out / "results.jsonl"
    atomic_write_text(log, (log.read_text() if log.exists() else "") + json.dumps(res) + "\n")
    return res


if __name__ == "__main__":
    main()
