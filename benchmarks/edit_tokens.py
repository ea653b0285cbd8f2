"""Are an edit's changed tokens written? Setokim's edit rows teacher forced, token by token.

    python benchmarks/edit_tokens.py RUN [RUN ...] --data data/shapes/val [--limit 150] [--places true|unknown]

Each written token of an edit's target is "changed" when no token of the source matches it
(cosine < 0.9 after standardising: the recoloured, moved or added object; for a removal, the
tokens that moved with it) and "kept" otherwise. Per edit op and kind, the script prints the
visual head's MSE to the target token (standardised, the training loss) and the share of
tokens whose prediction lies closer to the target than to every source token: near 0 for a
changed token means the model writes the source's token there, the edit undone. The rows are
fed as the trainer feeds them, at the true places (`--places true`) or with every image at the
"unknown place" (`--places unknown`, how `setok edit --place auto` reads and writes edits).
"""
import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from setok_cli.data.conversations import ConversationDataset
from setok_cli.models.setokim.place import UNKNOWN_SEED, flat_seeds
from setok_cli.tasks.setokim import load_setokim


def edit_token_stats(model, data: Path, limit: int, places: str = "true", batch: int = 25) -> dict:
    """-> {"op/changed|kept": {"tokens", "mse", "closer_to_target"}} over the first `limit` edits."""
    ds = ConversationDataset(str(data / "edits.json"), "edit", 64)
    raw = json.loads((data / "edits.json").read_text())
    acc: dict[str, list[float]] = {}
    n = min(limit, len(ds))
    with torch.no_grad():
        for i in range(0, n, batch):
            items = [ds[j] for j in range(i, min(i + batch, n))]
            samples = []
            for it in items:
                ims = [(x.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy() for x in it["pixel_values"]]
                sets, seeds = model.image_token_sets(ims, seeds=True)
                samples.append({"conversations": it["conversations"], "images": sets, "seeds": seeds})
            kw = model.collate(samples)
            tok, mask, seeds = kw["image_tokens"], kw["image_token_mask"], kw.get("image_token_seeds")
            given = None if seeds is None or places == "true" else torch.full_like(seeds, UNKNOWN_SEED)
            sp = model.splice(kw["input_ids"], kw["labels"], kw["attention_mask"], mask)
            h = model.hidden_in_groups(model.embed(sp, tok, mask, given), sp.attention_mask, sp.position_ids)
            hp = h.reshape(-1, h.shape[-1])[sp.pred_pos].to(model.head_dtype)
            if model.place_head is not None:
                hp = model.place_head.condition(hp, flat_seeds(given if given is not None else seeds, mask,
                                                               sp.pred_src, hp))
            pred = model.visual_head(hp).float()
            target = model.normalize(tok[mask][sp.pred_src].float())
            img_of = torch.arange(mask.shape[0]).unsqueeze(1).expand_as(mask)[mask][sp.pred_src]
            for r in range(pred.shape[0]):
                ti = int(img_of[r])                 # images per row: source, target
                src = model.normalize(tok[ti - 1][mask[ti - 1]].float())
                kind = "changed" if F.cosine_similarity(target[r:r + 1], src).max().item() < 0.9 else "kept"
                to_target = (pred[r] - target[r]).pow(2).mean().item()
                to_source = (pred[r:r + 1] - src).pow(2).mean(1).min().item()
                s = acc.setdefault(f"{raw[i + ti // 2]['edit']['op']}/{kind}", [0, 0.0, 0])
                s[0] += 1
                s[1] += to_target
                s[2] += int(to_target < to_source)
    return {k: {"tokens": c, "mse": d / c, "closer_to_target": w / c} for k, (c, d, w) in sorted(acc.items())}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--data", default="data/shapes/val")
    ap.add_argument("--limit", type=int, default=150)
    ap.add_argument("--places", choices=["true", "unknown"], default="true")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for run in args.runs:
        stats = edit_token_stats(load_setokim(run), Path(args.data), args.limit, args.places)
        for k, v in stats.items():
            print(f"{run}: {k:16s} tokens {v['tokens']:4d}  mse {v['mse']:.3f}  closer to target "
                  f"than to every source token {v['closer_to_target']:.2f}")


if __name__ == "__main__":
    main()
