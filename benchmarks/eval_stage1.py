"""Score a stage-1 checkpoint on the shapes world's test split.

    python benchmarks/eval_stage1.py --checkpoint runs/tiny-stage1/checkpoints/step_00000500 \
        --data data/shapes/test/pairs.json [--limit 250] [--steps 20] [--json out.json] [--grid grid.png]

Reports:
  - reconstructions (tokens -> detokenizer samples, upsampled to the data's size) scored
    by the scene parser: the share of objects right in shape and colour (and position
    within 10% of the side); the same for the ground truth squeezed through the
    detokenizer's resolution, the ceiling the reconstructions can reach; and the token
    canvas alone (its image channels, where the recipe trains them: canvas_recon_weight);
  - the mask decoder's mIoU over objects (each pixel to its arg-max token, segments
    matched to objects by IoU);
  - FG-ARI / mBO of the trained clustering against the untrained builtin-encoder
    clustering (same config, cluster head at its identity initialisation).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from setok_cli.data.datasets import PairsDataset, collate  # noqa: E402
from setok_cli.data.scene_parser import score_scene  # noqa: E402
from setok_cli.eval.tasks import eval_tokenizer  # noqa: E402
from setok_cli.models.detokenizer import Detokenizer  # noqa: E402
from setok_cli.models.mask_decoder import MaskDecoder, segment_miou  # noqa: E402
from setok_cli.models.setok import SeTok, SeTokConfig  # noqa: E402


def _u8(x: torch.Tensor) -> np.ndarray:
    return (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", required=True, help="a pairs.json with instances and scenes (the test split)")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the recipe's)")
    ap.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (default: the recipe's)")
    ap.add_argument("--sampler", default=None, help="ddim | dpm | ddpm (default: the recipe's)")
    ap.add_argument("--batch-size", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--grid", default=None, help="write originals / reconstructions / segments as a PNG")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    ck = Path(a.checkpoint)
    recipe = yaml.safe_load((ck / "recipe.yaml").read_text())
    tok_size = recipe["model"]["tokenizer"].get("image_size")
    setok = SeTok.from_pretrained(ck / "setok").eval()
    detok = Detokenizer.from_pretrained(ck / "detokenizer").eval() if (ck / "detokenizer").exists() else None
    if detok is not None and a.sampler:
        detok.config.sampler = a.sampler
    mdec = MaskDecoder.from_pretrained(ck / "mask_decoder").eval() if (ck / "mask_decoder").exists() else None

    ds = PairsDataset(a.data, image_size=recipe["data"].get("image_size"))
    n = len(ds) if a.limit is None else min(a.limit, len(ds))
    g = torch.Generator().manual_seed(a.seed)
    rec_ok = rec_n = ceil_ok = can_ok = 0
    # the token canvas alone (its first channels learn the image: canvas_recon_weight > 0)
    with_canvas = detok is not None and detok.canvas is not None and detok.config.canvas_recon_weight > 0
    ious: list[float] = []
    grid_rows = []
    t0 = time.perf_counter()
    for start in range(0, n, a.batch_size):
        batch = collate([ds[i] for i in range(start, min(n, start + a.batch_size))])
        x = batch["pixel_values"]
        S = x.shape[-1]
        xt = F.interpolate(x, size=(tok_size,) * 2, mode="bilinear", antialias=True) if tok_size else x
        with torch.no_grad():
            out = setok(xt)
            if mdec is not None:
                logits = mdec(x, out.tokens, out.features if mdec.config.feature_dim > 0 else None)
                ious += segment_miou(logits, out.token_mask, batch["instances"])[1]
            if detok is not None:
                rec = detok.sample(out.tokens, out.token_mask, steps=a.steps, generator=g, guidance_scale=a.guidance)
                rec = F.interpolate(rec, size=(S, S), mode="bilinear", align_corners=False)
                s = detok.config.image_size
                if with_canvas:
                    can = detok.decode(detok.canvas(out.tokens, out.token_mask)[:, :detok._channels()])
                    can = F.interpolate(can, size=(S, S), mode="bilinear", align_corners=False)
                ceil = F.interpolate(F.interpolate(x, size=(s, s), mode="bilinear", antialias=True),
                                     size=(S, S), mode="bilinear", align_corners=False)
        for j, idx in enumerate(batch["index"].tolist()):
            r = ds.records[idx]
            scene = json.loads((ds.root / r["scene"]).read_text())
            if detok is not None:
                sc = score_scene(_u8(rec[j]), scene)
                rec_ok += sc["correct"]
                rec_n += sc["n_gt"]
                ceil_ok += score_scene(_u8(ceil[j]), scene)["correct"]
                if with_canvas:
                    can_ok += score_scene(_u8(can[j]), scene)["correct"]
        if a.grid and not grid_rows and detok is not None:
            k = min(8, x.shape[0])
            seg = None
            if mdec is not None:
                lab = logits.masked_fill(~out.token_mask[:, :, None, None], -1e9).argmax(1)
                pal = torch.rand(64, 3, generator=torch.Generator().manual_seed(1))
                seg = pal[lab % 64].permute(0, 3, 1, 2)
            rows = [x[:k], rec[:k]] + ([can[:k]] if with_canvas else []) + ([seg[:k]] if seg is not None else [])
            grid_rows = [np.concatenate([_u8(t) for t in row], axis=1) for row in rows]
    result = {"checkpoint": str(ck), "images": n, "seconds": round(time.perf_counter() - t0, 1)}
    if detok is not None:
        result.update(recon_objects_right=rec_ok / max(1, rec_n), recon_objects=rec_n,
                      ceiling_objects_right=ceil_ok / max(1, rec_n), detok_resolution=detok.config.image_size,
                      sample_steps=a.steps or detok.config.sample_steps, sampler=detok.config.sampler,
                      guidance_scale=a.guidance if a.guidance is not None else detok.config.guidance_scale)
        if with_canvas:
            result["canvas_objects_right"] = can_ok / max(1, rec_n)
    if mdec is not None:
        result["mask_decoder_miou"] = float(np.mean(ious)) if ious else None
    trained = eval_tokenizer(a.data, tokenizer=setok, limit=n)
    fresh = SeTok(SeTokConfig.from_dict(json.loads((ck / "setok" / "config.json").read_text()))).eval()
    untrained = eval_tokenizer(a.data, tokenizer=fresh, limit=n)
    result.update(fg_ari_trained=trained["fg_ari"], fg_ari_untrained=untrained["fg_ari"],
                  mbo_trained=trained["mbo"], mbo_untrained=untrained["mbo"],
                  tokens_per_image_trained=trained["tokens_per_image"],
                  tokens_per_image_untrained=untrained["tokens_per_image"])
    log = ck.parent.parent / "log.jsonl"
    step = json.loads((ck / "trainer_state.json").read_text())["step"]
    if log.exists():
        recs = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
        at = [x for x in recs if x["step"] == step] or recs[-1:]
        result.update(train_steps=step, train_wall_s=round(at[-1]["elapsed_s"], 1),
                      train_peak_mem_mb=round(max(x["peak_mem_mb"] for x in recs if x["step"] <= step), 1))
    if a.grid and grid_rows:
        from PIL import Image
        Image.fromarray(np.concatenate(grid_rows, axis=0)).resize(
            (grid_rows[0].shape[1] * 2, len(grid_rows) * grid_rows[0].shape[0] * 2), Image.NEAREST).save(a.grid)
    print(json.dumps(result, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
