"""Detokenizer ablations on the shapes world, fast: the frozen clustering is computed once
(and cached), then only the merger and the detokenizer train, on the denoising loss alone.

    python benchmarks/detok_ablation.py --data DATA --coord 2 --append 1 --tag coord_append
        [--canvas 8 --crw 1.0] [--size 224] [--steps 700] [--ntest 100]
        [--canvas 8 --ckind sprite --cgrid 32 --chid 256 --crw 1 --ctarget instances --sil 1 --mlr 1e-2]

DATA is `setok data shapes --out DATA --n 2500 --size 64 --seed 0`. Prints and appends to
OUT/results.jsonl: recon (objects right in shape, colour and position by the scene
parser, DDIM samples), recon_nopos (position ignored), x0T (the one-step x0 prediction
from pure noise); writes OUT/TAG.png (originals / samples / one-step predictions).
"""
import argparse, json, time, sys
import numpy as np, torch, torch.nn.functional as F
from pathlib import Path
from setok_cli.data.datasets import PairsDataset
from setok_cli.data.scene_parser import score_scene
from setok_cli.models.setok import SeTok, SeTokConfig
from setok_cli.models.detokenizer import Detokenizer, DetokenizerConfig, MapperConfig
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cluster_cache import cluster_cache  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--data", required=True, help="a shapes-world folder (setok data shapes)")
ap.add_argument("--out", default="ablation_out", help="cache, pictures and results.jsonl")
ap.add_argument("--tag", default="x", help="name of this run")
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
ap.add_argument("--truebox", type=int, default=1, help="canvas_true_boxes (0/1): teacher-forced boxes in training")
ap.add_argument("--mlr", type=float, default=None, help="learning rate of the merger and the canvas (default: --lr)")
ap.add_argument("--channels", default="32,64,64", help="UNet block widths")
ap.add_argument("--res", type=int, default=32, help="UNet resolution")
ap.add_argument("--pred", default="sample", help="prediction_type")
ap.add_argument("--steps", type=int, default=700, help="training steps")
ap.add_argument("--bs", type=int, default=16, help="batch size")
ap.add_argument("--lr", type=float, default=2e-3, help="learning rate")
ap.add_argument("--ntest", type=int, default=100, help="test images scored")
ap.add_argument("--sample_steps", type=int, default=20, help="DDIM steps")
ap.add_argument("--threads", type=int, default=1, help="torch threads")
a = ap.parse_args()
torch.set_num_threads(a.threads); torch.manual_seed(0)
D = a.data
OUT = Path(a.out); OUT.mkdir(parents=True, exist_ok=True)
cfg = SeTokConfig(encoder="builtin", image_size=a.size, image_policy="squash", k=a.k, bandwidth=a.bw, max_tokens=a.maxtok,
                  merger_dim=a.mdim, merger_depth=a.mdepth, merger_cross_depth=1, token_dim=a.tdim,
                  merger_relative_pe=a.rel, merger_relative_hidden=a.relh,
                  merger_crop=a.crop, merger_crop_width=a.cropw)
setok = SeTok(cfg)
C = cluster_cache(setok, D, OUT, a.size, a.k, a.bw, a.maxtok)
tr, te = C["train"], C["test"]
grid = (a.size // 14,) * 2
ch = tuple(int(c) for c in a.channels.split(","))
dcfg = DetokenizerConfig(space="pixel", image_size=a.res, unet_preset="tiny", coord_channels=a.coord,
                         unet=dict(block_out_channels=ch) if ch != (32, 64, 64) else {},
                         mapper=MapperConfig(token_dim=a.tdim, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128,
                                             num_queries=a.queries, output_dim=64, append_tokens=bool(a.append)), canvas_channels=a.canvas, canvas_recon_weight=a.crw, canvas_kind=a.ckind, canvas_hidden=a.chid, canvas_grid=a.cgrid, canvas_mask_weight=a.cmw, canvas_octaves=a.coct,
                         canvas_mask_target=a.ctarget, canvas_window=a.cwin,
                         canvas_place_weight=a.place, canvas_silhouette_weight=a.sil, canvas_skip=bool(a.skip), canvas_true_boxes=bool(a.truebox),
                         prediction_type=a.pred, sample_steps=a.sample_steps, beta_schedule="squaredcos_cap_v2")
det = Detokenizer(dcfg)
params = list(setok.merger.parameters()) + list(det.parameters())
print("params", sum(p.numel() for p in det.parameters()), flush=True)
fast = list(setok.merger.parameters()) + (list(det.canvas.parameters()) if det.canvas is not None else [])
rest = [p for p in det.parameters() if all(p is not q for q in fast)]
opt = torch.optim.AdamW([dict(params=fast, lr=a.mlr or a.lr), dict(params=rest, lr=a.lr)], weight_decay=1e-3)
from transformers import get_cosine_schedule_with_warmup
sch = get_cosine_schedule_with_warmup(opt, int(0.05 * a.steps), a.steps)
def tokens(C, ii):
    l = C["l"][ii]; nt = C["nt"][ii]; K = int(nt.max())
    masks = F.one_hot(l.clamp_min(0), K).permute(0, 2, 1).float()
    t = setok.merger(C["f"][ii], masks, l, nt, grid, hard=True, pixels=C["x"][ii] if a.crop else None)
    tm = torch.arange(K).view(1, K) < nt.view(-1, 1)
    tokens.masks = masks.view(masks.shape[0], K, *grid)
    return t, tm
if a.ctarget == "instances" and (a.cmw > 0 or a.ckind == "sprite"):
    from setok_cli.models.detokenizer import instance_canvas_targets
    _ds = PairsDataset(f"{D}/train/pairs.json", image_size=64)
    tr["inst"] = torch.stack([_ds[i]["instances"] for i in tr["idx"]])
def canvas_masks(ii):
    if a.cmw <= 0 and a.ckind != "sprite":  # the sprite canvas learns its boxes from the targets
        return None
    return instance_canvas_targets(tokens.masks, tr["inst"][ii]) if a.ctarget == "instances" else tokens.masks
g = torch.Generator().manual_seed(0)
t0 = time.time(); n = tr["x"].shape[0]
det.train(); setok.train()
for step in range(a.steps):
    ii = torch.randint(0, n, (a.bs,), generator=g)
    tok, tm = tokens(tr, ii)
    loss = det(tr["x"][ii], tok, tm, generator=g, masks=canvas_masks(ii))
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step(); sch.step()
    if step % 50 == 0 or step == a.steps - 1:
        print(f"step {step} loss {loss.item():.4f} t {time.time()-t0:.0f}s", flush=True)
train_s = time.time() - t0
torch.save({'det': det.state_dict(), 'merger': setok.merger.state_dict()}, f'{OUT}/{a.tag}.pt')
det.eval(); setok.eval()
ds = PairsDataset(f"{D}/test/pairs.json", image_size=64)
ok = tot = okc = okr = okcv = 0; gs = torch.Generator().manual_seed(0); imgs = []
with torch.no_grad():
    for s in range(0, a.ntest, 25):
        ii = torch.arange(s, min(a.ntest, s + 25))
        tok, tm = tokens(te, ii)
        rec = det.sample(tok, tm, generator=gs)
        cond = det.mapper(tok, tm)
        xT = torch.randn(tok.shape[0], 3, a.res, a.res, generator=gs)
        x0hat = det._unet(xT, torch.full((tok.shape[0],), 999), cond, det.mapper.condition_mask(tm), det.canvas(tok, tm) if det.canvas is not None else None)
        x0hat = F.interpolate(((x0hat + 1) / 2).clamp(0, 1), size=(64, 64), mode="bilinear", align_corners=False)
        cv = det.canvas(tok, tm)[:, :3] if det.canvas is not None and a.crw > 0 else None
        if cv is not None:
            cv = F.interpolate(((cv + 1) / 2).clamp(0, 1), size=(64, 64), mode="bilinear", align_corners=False)
        rec = F.interpolate(rec, size=(64, 64), mode="bilinear", align_corners=False)
        for j, i in enumerate(ii.tolist()):
            r = ds.records[te["idx"][i]]
            scene = json.loads((ds.root / r["scene"]).read_text())
            u8 = (rec[j].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            sc = score_scene(u8, scene); ok += sc["correct"]; tot += sc["n_gt"]
            sc2 = score_scene(u8, scene, use_position=False); okc += sc2["correct"]
            u8r = (x0hat[j].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            okr += score_scene(u8r, scene)["correct"]
            if cv is not None:
                okcv += score_scene((cv[j].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), scene)["correct"]
        if s == 0: imgs = [te["x"][:8], rec[:8], x0hat[:8]] + ([cv[:8]] if cv is not None else [])
from PIL import Image
row = lambda t: np.concatenate([(x.clamp(0,1).permute(1,2,0).numpy()*255).astype(np.uint8) for x in t], 1)
Image.fromarray(np.concatenate([row(i) for i in imgs], 0)).resize((8*128, 128 * len(imgs)), Image.NEAREST).save(f"{OUT}/{a.tag}.png")
res = dict(tag=a.tag, args=vars(a), recon=ok / tot, recon_nopos=okc / tot, x0T=okr / tot, canvas=okcv / tot, n=tot, train_s=round(train_s), final_loss=loss.item())
print(json.dumps(res), flush=True)
with open(OUT / "results.jsonl", "a") as fh: fh.write(json.dumps(res) + "\n")
