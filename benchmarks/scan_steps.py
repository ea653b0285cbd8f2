"""Which steps of a scanning count a run has learnt, under teacher forcing.

    python benchmarks/scan_steps.py --model runs/RUN --data data/shapes/train/instruct.json [--n 48] [--json]

A scanning count (`look_scan`, models/setokim/look.py) answers "How many red objects are there?" with
`<image> blue 0 <image> red 1 <image> no 1: 1`: every token of the image in order, the colours (or shapes)
it holds, and the running count. This builds the first N scanning count answers of the data file as the
stage rows train them (the frozen SeTok reads each image), runs the model over them with the true answer as
its input (teacher forcing), and scores its most likely next text id at each kind of step:

    words       the colour or shape words after a token ("blue", "no"): reading the token
    same        a running number that stays (the token holds none of the counted objects)
    increment   a running number that grows: reading the token, comparing with the question's word, adding
    go_on       "[Img]" after a number (the scan goes on to the next token)
    stop        ":" after the last number (the scan ends after the image's last token)
"""
from __future__ import annotations

import argparse
import json

import torch

STEPS = ("words", "same", "increment", "go_on", "stop")
MARKS = ("[Img]", "[/Img]", "</s>", ":")


def step_kinds(words: list[str]) -> list[str | None]:
    """The text ids of one scanning answer, as words ("▁" stripped), in order -> the kind of step each one is
    (one of STEPS, or None for the rest: "[/Img]", the final count, "</s>")."""
    kinds: list[str | None] = []
    last, after_number, done = "0", False, False
    for w in words:
        kind = None
        if w == ":":
            kind, done = "stop", True
        elif w == "[Img]" and after_number:
            kind = "go_on"
        elif w.isdigit() and not done:
            kind, last = ("same" if w == last else "increment"), w
        elif w not in MARKS and not w.isdigit():
            kind = "words"
        if w != "[/Img]":                            # fed as given, not trained: no step of its own
            after_number = w.isdigit() and not done
        kinds.append(kind)
    return kinds


@torch.no_grad()
def score(model, data: str, n: int = 48, image_size: int = 64) -> dict:
    """A Setokim and an instruct file -> {step: {"steps", "right"}} over its first `n` scanning counts
    (the counts of a colour or shape)."""
    from setok_cli.data.conversations import ConversationDataset, collate_conversations_batch
    from setok_cli.train.stage2 import Stage2Model
    ds = ConversationDataset(data, "instruct", image_size, look=["count_by"], look_scan=True)
    items = [ds[i] for i in range(len(ds)) if isinstance(ds[i]["look"]["turns"][0], dict)][:n]
    if not items:
        raise SystemExit(f"error: {data} has no count of a colour or shape")
    samples = Stage2Model(model).samples(collate_conversations_batch(items))
    kw = model.collate(samples)
    sp = model.splice(kw["input_ids"], kw["labels"], kw["attention_mask"], kw["image_token_mask"])
    h = model.hidden_in_groups(model.embed(sp, kw["image_tokens"], kw["image_token_mask"],
                                           kw.get("image_token_seeds")), sp.attention_mask, sp.position_ids, 1)
    labels = sp.labels[:, 1:]
    pred = model.lm.get_output_embeddings()(h[:, :-1]).argmax(-1)                # (B, L - 1)
    out = {s: {"steps": 0, "right": 0} for s in STEPS}
    tok = model.text_tokenizer
    for b in range(labels.shape[0]):
        at = (labels[b] != -100).nonzero()[:, 0]
        truth = [w.lstrip("▁") for w in tok.convert_ids_to_tokens(labels[b][at].tolist())]
        for kind, t, p in zip(step_kinds(truth), labels[b][at].tolist(), pred[b][at].tolist()):
            if kind is not None:
                out[kind]["steps"] += 1
                out[kind]["right"] += int(t == p)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a stage-3 run, checkpoint or Setokim folder")
    ap.add_argument("--data", required=True, help="an instruct file of the world (its scenes beside it)")
    ap.add_argument("--n", type=int, default=48, help="how many scanning counts (the first N)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    from setok_cli.tasks.setokim import load_setokim
    res = score(load_setokim(a.model), a.data, a.n)
    if a.json:
        print(json.dumps(res, indent=1))
        return
    print(f"{'step':<10} {'steps':>6} {'right':>6}")
    for s in STEPS:
        print(f"{s:<10} {res[s]['steps']:>6} {res[s]['right']:>6}")


if __name__ == "__main__":
    main()
