"""Why Setokim misses VQA questions that find an object by its shape: two measurements.

    python benchmarks/setokim_binding_probe.py --model runs/tiny-stage3 --data data/shapes \\
        [--pred out/vqa.json --questions data/shapes/val/instruct_sub.json] [--images 640] [--threads 2]
        [--skip-probe]

1. Is the shape in the tokens? A linear probe (multinomial logistic regression, L-BFGS) names
   the shape (8 kinds) of the object under each SeTok token, from the standardised token and
   from the LM's hidden state at that token's position after each layer; trained on the
   tokens of the first --images train images, scored on the val images' tokens (a token is
   labelled with the object that holds most of its patches; background tokens are left out).
   Also: the share of the variance that the shape and the colour labels explain.
2. Where do the answers go wrong? With --pred (a `setok ask --pred-out` file) and the question
   file it answered: accuracy by question kind (counting all objects vs one shape; existence
   by answer; relations by how they name objects; colour questions by the number of objects
   in the image, with how often the answer is a colour present in the image).
3. Does the answer look at the right object? With --attention N: for the colour questions
   ("What color is the hexagon?", found by shape) and the shape questions ("What shape is the
   blue object?", found by colour) about the first N val images, the attention of the
   position that predicts the answer on the image's tokens, per layer (heads averaged, and
   the best head): the share that lands on the asked object's tokens, its chance level (the
   asked object's tokens / all the image's tokens), and how often the most-attended token is
   one of the asked object's.
"""
from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def token_labels(out, i, objects, instances, key):
    """The object attribute `key` of the object holding most of each token's patches (None
    where the token is mostly background), tokens in the tokenizer's order."""
    g = out.grid
    share = F.interpolate(F.one_hot(instances, len(objects) + 1).permute(2, 0, 1)[None].float(), size=g,
                          mode="area")[0]                                  # (n + 1, h, w)
    labels = []
    for t in range(out.tokens.shape[1]):
        m = (out.labels[i] == t).float()
        cnt = (share * m).flatten(1).sum(1)
        o = int(cnt.argmax())
        labels.append(objects[o - 1][key] if o > 0 and cnt[o] > 0.5 * m.sum() else None)
    return labels


def ordered(model, out):
    """The tokenizer's tokens in generation order (as order_tokens): (order (B, T) of tokenizer
    indices, tokens, mask)."""
    big = torch.iinfo(torch.int64).max // 4
    key = torch.where(out.seeds >= 0, out.seeds.long(), torch.full_like(out.seeds, big))
    key = torch.where(out.token_mask, key, torch.full_like(key, 2 * big))
    tokens, mask = model.order(out.tokens, out.token_mask, out.seeds)
    return key.argsort(dim=1, stable=True), tokens, mask


@torch.no_grad()
def collect(model, root: Path, n: int):
    """-> {"token": (M, T), "layer0".. : (M, H)}, shapes [M], colours [M] over the images' tokens."""
    from setok_cli.models.setokim.regions import read_images
    pairs = json.loads((root / "pairs.json").read_text())[:n]
    feats, shapes, colours = collections.defaultdict(list), [], []
    for a in range(0, len(pairs), 32):
        ents = pairs[a:a + 32]
        seen = read_images(model, [str(root / e["image"]) for e in ents])
        out = seen.out
        order, tokens, mask = ordered(model, out)
        for i, e in enumerate(ents):
            objects = json.loads((root / e["scene"]).read_text())["objects"]
            inst = torch.from_numpy(np.array(Image.open(root / e["instances"]))).long()
            s = token_labels(out, i, objects, inst, "shape")
            c = token_labels(out, i, objects, inst, "color")
            keep = order[i][mask[i]].tolist()
            shapes += [s[t] for t in keep]
            colours += [c[t] for t in keep]
        samples = [{"conversations": [{"from": "human", "value": "<image>\nDescribe the image briefly."},
                                      {"from": "gpt", "value": "."}], "images": [t[m]]} for t, m in zip(tokens, mask)]
        kw = model.collate(samples)
        sp = model.splice(kw["input_ids"], kw["labels"], kw["attention_mask"], kw["image_token_mask"])
        emb = model.embed(sp, kw["image_tokens"], kw["image_token_mask"])
        hs = model.lm.get_decoder()(inputs_embeds=emb, attention_mask=sp.attention_mask,
                                    position_ids=sp.position_ids, output_hidden_states=True).hidden_states
        rows = sp.vis_dst[sp.vis_src.argsort()]                          # positions of the packed tokens
        feats["token"].append(model.normalize(kw["image_tokens"][kw["image_token_mask"]].float()))
        for layer, h in enumerate(hs):
            feats[f"layer{layer}"].append(h.reshape(-1, h.shape[-1])[rows].float())
    return {k: torch.cat(v) for k, v in feats.items()}, shapes, colours


def linear_probe(xtr, ytr, xte, yte, classes: int) -> float:
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    W = torch.zeros(xtr.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xtr @ W + b, ytr) + 1e-3 * W.pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    with torch.no_grad():
        return float(((xte @ W + b).argmax(1) == yte).float().mean())


def explained(x: torch.Tensor, labels: torch.Tensor) -> float:
    """Between-class share of the total variance of x (M, D) under integer labels (M,)."""
    x = x - x.mean(0)
    between = sum(int((labels == v).sum()) * x[labels == v].mean(0).pow(2).sum() for v in labels.unique())
    return float(between / x.pow(2).sum())


def probe(model, data: Path, images: int) -> dict:
    from setok_cli.data.shapes import SHAPES
    xtr, str_, ctr = collect(model, data / "train", images)
    xte, ste, _ = collect(model, data / "val", images)
    ytr = torch.tensor([SHAPES.index(s) if s else -1 for s in str_])
    yte = torch.tensor([SHAPES.index(s) if s else -1 for s in ste])
    colours = sorted({c for c in ctr if c})
    ctr_i = torch.tensor([colours.index(c) if c else -1 for c in ctr])
    res = {"train_tokens": int((ytr >= 0).sum()), "val_tokens": int((yte >= 0).sum()), "layers": {}}
    for k in xtr:
        a, b = xtr[k][ytr >= 0], xte[k][yte >= 0]
        res["layers"][k] = {"shape_probe_val": round(linear_probe(a, ytr[ytr >= 0], b, yte[yte >= 0], len(SHAPES)), 3),
                            "variance_shape": round(explained(a, ytr[ytr >= 0]), 3),
                            "variance_colour": round(explained(xtr[k][ctr_i >= 0], ctr_i[ctr_i >= 0]), 3)}
    return res


def breakdown(pred_file: Path, questions: Path, data_root: Path) -> dict:
    qs = json.loads(questions.read_text())
    pred = {p["question_id"]: str(p["answer"]).strip().lower() for p in json.loads(pred_file.read_text())}
    pairs = {e["image"]: e for e in json.loads((data_root / "pairs.json").read_text())}
    acc = collections.defaultdict(lambda: [0, 0])
    colour = collections.defaultdict(lambda: [0, 0, 0])
    for e in qs:
        if e["id"] not in pred:                 # a --limit run answered only the first questions
            continue
        q = e["conversations"][0]["value"].split("\n")[-1]
        a = e["conversations"][1]["value"].strip().lower()
        p = pred[e["id"]]
        t = e["type"]
        kind = {"count": "count: all objects" if "objects" in q else "count: one shape",
                "exist": f"exist: answer {a}",
                "relation": f"relation: {'one named by colour alone' if 'object' in q else 'both named by shape'}, "
                            f"answer {a}",
                }.get(t, t)
        acc[kind][0] += 1
        acc[kind][1] += p == a
        if t == "color" and e["image"] in pairs:
            present = [x.split()[0] for x in pairs[e["image"]]["phrases"]]
            c = colour[len(present)]
            c[0] += 1
            c[1] += p == a
            c[2] += p in present
    return {"by_kind": {k: {"questions": n, "accuracy": round(r / n, 3)} for k, (n, r) in sorted(acc.items())},
            "colour_by_objects": {n: {"questions": q, "accuracy": round(r / q, 3),
                                      "answer_is_a_colour_in_the_image": round(p / q, 3)}
                                  for n, (q, r, p) in sorted(colour.items())}}


@torch.no_grad()
def attention(model, data: Path, images: int) -> dict:
    from setok_cli.data.shapes import SHAPES
    from setok_cli.models.setokim.regions import read_images
    root = data / "val"
    qs = json.loads((root / "instruct.json").read_text())
    pairs = json.loads((root / "pairs.json").read_text())[:images]
    dec = model.lm.get_decoder()
    dec.config._attn_implementation = "eager"                         # attention weights, not sdpa
    stats = collections.defaultdict(lambda: collections.defaultdict(list))
    for a in range(0, len(pairs), 16):
        ents = pairs[a:a + 16]
        seen = read_images(model, [str(root / e["image"]) for e in ents])
        out = seen.out
        order, tokens, mask = ordered(model, out)
        samples, targets = [], []
        for i, e in enumerate(ents):
            objects = json.loads((root / e["scene"]).read_text())["objects"]
            if len(objects) < 2:
                continue
            inst = torch.from_numpy(np.array(Image.open(root / e["instances"]))).long()
            keep = order[i][mask[i]].tolist()
            lab = {k: [token_labels(out, i, objects, inst, k)[t] for t in keep] for k in ("shape", "color")}
            for q in (x for x in qs if x["image"] == e["image"] and x["type"] in ("color", "shape")):
                text = q["conversations"][0]["value"].split("\n")[-1].rstrip("?").split()
                by, want = ("shape", text[-1]) if q["type"] == "color" else ("color", text[-2])
                if q["type"] == "color" and want not in SHAPES:
                    continue
                hit = [v == want for v in lab[by]]
                if not any(hit):
                    continue
                samples.append({"conversations": q["conversations"], "images": [tokens[i][mask[i]]]})
                targets.append((q["type"], torch.tensor(hit)))
        if not samples:
            continue
        kw = model.collate(samples)
        sp = model.splice(kw["input_ids"], kw["labels"], kw["attention_mask"], kw["image_token_mask"])
        emb = model.embed(sp, kw["image_tokens"], kw["image_token_mask"])
        att = dec(inputs_embeds=emb, attention_mask=sp.attention_mask, position_ids=sp.position_ids,
                  output_attentions=True).attentions                   # per layer (B, H, L, L)
        L = sp.labels.shape[1]
        pos = sp.vis_dst[sp.vis_src.argsort()]                          # packed tokens' flat positions
        rows = pos // L
        for b, (kind, hit) in enumerate(targets):
            q = int((sp.labels[b] != -100).nonzero()[0]) - 1              # predicts the first answer token
            cols = pos[rows == b] % L
            for layer, A in enumerate(att):
                w = A[b, :, q, cols].float()                                  # (H, K)
                share = (w[:, hit].sum(1) / w.sum(1).clamp_min(1e-9))         # (H,)
                s = stats[kind][layer]
                s.append((float(share.mean()), float(share.max()), float(hit.float().mean()),
                          bool(hit[int(w.mean(0).argmax())])))
    res = {}
    for kind, layers in stats.items():
        res[{"color": "colour, found by shape", "shape": "shape, found by colour"}[kind]] = {
            f"layer{layer}": {"questions": len(v), "share_on_object": round(float(np.mean([x[0] for x in v])), 3),
                              "best_head_share": round(float(np.mean([x[1] for x in v])), 3),
                              "chance": round(float(np.mean([x[2] for x in v])), 3),
                              "top_token_on_object": round(float(np.mean([x[3] for x in v])), 3)}
            for layer, v in sorted(layers.items())}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="a shapes world (train/ and val/)")
    ap.add_argument("--images", type=int, default=640)
    ap.add_argument("--pred", help="a `setok ask --pred-out` file")
    ap.add_argument("--questions", help="the question file it answered")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-probe", action="store_true", help="only the breakdown of --pred")
    ap.add_argument("--attention", type=int, default=0, metavar="N",
                    help="also: where the answer looks, on the first N val images")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    from setok_cli.models.setokim import Setokim
    model = None if a.skip_probe and not a.attention else Setokim.from_pretrained(a.model).eval()
    res = {"model": a.model}
    if not a.skip_probe:
        res["probe"] = probe(model, Path(a.data), a.images)
    if a.attention:
        res["attention"] = attention(model, Path(a.data), a.attention)
    if a.pred and a.questions:
        res["vqa"] = breakdown(Path(a.pred), Path(a.questions), Path(a.questions).parent)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
