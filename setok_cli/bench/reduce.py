"""The library behind `setok bench-reduce`: what each visual-token reducer costs and what it
keeps, side by side (integrations/llava.py).

Cost (`cost_table`). For each token count an image can reach the LLM with (the budgets 16,
32, 64, 144, 576 and SeTok's natural count), on a LLaVA-1.5-7B-shaped config built in the
process with random weights (`llava_7b_shaped`: the full width 4096 / 11008 / 32 heads /
vocabulary 32000, but `layers` of the 32 decoder layers, so it fits a CPU; fp32) and on a
real LLaVA-1.5 folder when one is given:
  - prefill FLOPs from the config (`prefill_flops`: every decoder layer's projections,
    the L x L attention products and the SwiGLU MLP, plus the LM head on the last token);
  - measured prefill latency (median of `repeats`, after a warm-up) and the KV cache it
    leaves (bytes of the cache tensors, measured);
  - each reducer's own time on the same images' tower features, at the tower's width and at
    CLIP-L's 1024 (the features through a fixed random 1024-wide map, which keeps their
    distances up to scale), reported apart: a reducer that costs more than the prefill it
    saves is no reducer;
  - end-to-end time to first token (tower + reducer + projector + prefill, timed as one
    call) at 576 tokens and at SeTok's natural count, on the synthetic world's images and
    on real photos, with the FLOP and time ratios the issue's goal names.

Accuracy (`accuracy_table`), the paper's Table 9 protocol without downloads: a tiny
LLaVA-architecture model (`LlavaForConditionalGeneration`, a tiny Llama text model, the
builtin encoder plus a 2-D sin-cos position embedding as its vision tower: `BuiltinTower`)
gets one short, identical fine-tune per reducer and budget on the synthetic world's VQA
(train/instruct.json): same initial weights (seed), same batches, same steps. The tower's
features are computed once and each reducer's tokens once per budget; training feeds them
through the model's own placeholder splice (`mm_encoder_outputs`), the projector trained
with the LLM. The fine-tune length is chosen on val (each run keeps the better of its
checkpoints at the `eval_steps`), and test is answered once with it (greedy `generate`) and
scored by `setok eval vqa`'s library function (`eval_vqa`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ..errors import UserError
from ..integrations.llava import (BuiltinTower, IMPORTANCE_SUBSTITUTE, METHODS, NEEDS_IMPORTANCE, reduce_features,
                                  splice_image_tokens)

BUDGETS = (16, 32, 64, 144, 576)
ACCURACY_BUDGETS = (16, 32, 64)
TEXT_TOKENS = 24  # a one-image question's text around the image (LLaVA-1.5 template + a short question)
FULL = 576


# ----------------------------------------------------------------------------- FLOPs

def prefill_flops(text_config, L: int, logits: int = 1) -> int:
    """Multiply-adds x 2 of a Llama-family prefill of L tokens (no batch), from its config.

    Per decoder layer: q and o projections 2 * 2 L d^2, k and v 2 * 2 L d (kv_heads * head_dim),
    attention scores Q K^T and their use on V 2 * 2 L^2 d (the full L x L products a dense
    kernel computes), SwiGLU MLP 3 * 2 L d I. Plus the LM head on `logits` positions,
    2 logits d V. Norms, softmax, RoPE and residuals are left out (O(L d))."""
    d = int(text_config.hidden_size)
    I = int(text_config.intermediate_size)
    heads = int(text_config.num_attention_heads)
    kv = int(getattr(text_config, "num_key_value_heads", None) or heads)
    hd = int(getattr(text_config, "head_dim", None) or d // heads)
    V = int(text_config.vocab_size)
    layers = int(text_config.num_hidden_layers)
    per_layer = 2 * L * d * heads * hd * 2 + 2 * L * d * kv * hd * 2 + 2 * 2 * L * L * heads * hd + 3 * 2 * L * d * I
    return layers * per_layer + 2 * logits * d * V


# ----------------------------------------------------------------------------- models

def _llava(text: dict, vision_dim: int, image_token_id: int, seed: int = 0, tower: Optional[torch.nn.Module] = None):
    """A LlavaForConditionalGeneration with a Llama text model and the builtin tower."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=vision_dim, intermediate_size=vision_dim, num_hidden_layers=1,
                              num_attention_heads=1, image_size=336, patch_size=14)
    cfg = LlavaConfig(vision_config=vision, text_config=LlamaConfig(**text), image_token_id=image_token_id,
                      vision_feature_layer=-1, vision_feature_select_strategy="default",
                      projector_hidden_act="gelu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(cfg)
    model.model.vision_tower = tower if tower is not None else BuiltinTower()
    return model.eval()


def llava_7b_shaped(layers: int = 2, seed: int = 0):
    """LLaVA-1.5-7B's text model at full width (4096, MLP 11008, 32 heads, vocabulary 32000)
    with `layers` of its 32 decoder layers, random weights, fp32, and the builtin tower."""
    text = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                num_hidden_layers=layers, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5)
    tower = BuiltinTower()
    return _llava(text, tower.hidden_size, 32000, seed, tower)


def tiny_llava(vocab_size: int, image_token_id: int, pad_token_id: int, hidden: int = 64, layers: int = 2,
               heads: int = 4, intermediate: int = 128, seed: int = 0, tower: Optional[torch.nn.Module] = None):
    """The accuracy protocol's model: a tiny Llama text model behind LLaVA's projector."""
    tower = tower if tower is not None else BuiltinTower()
    text = dict(hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads,
                num_key_value_heads=heads, num_hidden_layers=layers, vocab_size=vocab_size,
                max_position_embeddings=1024, pad_token_id=pad_token_id, tie_word_embeddings=False)
    return _llava(text, tower.hidden_size, image_token_id, seed, tower)


def image_outputs(model, tokens: Sequence[Tensor]):
    """Reduced tower features [(K_i, D)] -> the `mm_encoder_outputs` the model splices in
    (the projector applied, one entry per image)."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    counts = [int(t.shape[0]) for t in tokens]
    proj = model.model.multi_modal_projector(torch.cat(list(tokens), 0))
    return {"image": BaseModelOutputWithPooling(pooler_output=list(torch.split(proj, counts)))}


# ----------------------------------------------------------------------------- images

def load_pixels(paths: Sequence, size: int = 336, patch: int = 14) -> Tensor:
    """Images (paths / PIL) letterboxed onto size x size, border pixels repeated (the
    builtin encoder's padding). -> (B, 3, size, size) in [0, 1]."""
    from ..images import as_image, letterbox

    return torch.stack([letterbox(as_image(p), size, patch, "edge", name=str(p))[0] for p in paths])


def tower_features(tower: BuiltinTower, paths: Sequence, batch: int = 32,
                   progress: Optional[Callable[[int], None]] = None) -> Tensor:
    """(M, N, D) patch features of the images, batch by batch."""
    out = []
    for i in range(0, len(paths), batch):
        with torch.no_grad():
            out.append(tower.patch_features(load_pixels(paths[i:i + batch])))
        if progress:
            progress(len(paths[i:i + batch]))
    return torch.cat(out)


def photo_paths() -> list[str]:
    """Real photos available without a download: the shipped Chelsea, and scikit-image's
    astronaut and coffee when scikit-image is installed."""
    here = Path(__file__).resolve().parent.parent / "assets" / "chelsea.png"
    out = [str(here)]
    try:
        import skimage
        d = Path(skimage.__file__).parent / "data"
        out += [str(d / n) for n in ("astronaut.png", "coffee.png") if (d / n).is_file()]
    except ImportError:
        pass
    return out


# ----------------------------------------------------------------------------- timing

def _median_ms(fn: Callable[[], object], repeats: int) -> tuple[float, list[float]]:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts), ts


def _cache_bytes(cache) -> int:
    """Bytes of every tensor a transformers cache holds (its layers' keys and values)."""
    total = 0
    for layer in getattr(cache, "layers", None) or []:
        for v in vars(layer).values():
            if isinstance(v, Tensor):
                total += v.numel() * v.element_size()
    return total


def measure_prefill(model, L: int, repeats: int) -> dict:
    """Prefill of one sequence of L tokens (random embeddings; the cost does not depend on
    their values): median ms, all samples, KV cache bytes left, FLOPs."""
    d = model.config.text_config.hidden_size
    dtype = next(model.parameters()).dtype
    emb = torch.randn(1, L, d, generator=torch.Generator().manual_seed(L), dtype=torch.float32).to(dtype)
    box = {}

    def run():
        with torch.no_grad():
            box["out"] = model(inputs_embeds=emb, logits_to_keep=1, use_cache=True)

    ms, all_ms = _median_ms(run, repeats)
    kv = _cache_bytes(box["out"].cache if hasattr(box["out"], "cache") else box["out"].past_key_values)
    return {"tokens": L, "prefill_ms": ms, "prefill_ms_all": [round(t, 2) for t in all_ms], "kv_cache_bytes": kv,
            "prefill_flops": prefill_flops(model.config.text_config, L)}


def time_to_first_token(model, pixels: Tensor, method: Optional[str], budget: Optional[int], repeats: int,
                        text_tokens: int = TEXT_TOKENS) -> dict:
    """One image's question, end to end (tower, reducer, projector, splice, prefill, the first
    token's logits) through the patched model; method None: the unpatched model, all 576
    tokens. -> median ms and the image's token count."""
    from ..integrations.llava import reduce_visual_tokens, restore_visual_tokens

    tid = model.config.image_token_id
    n_img = FULL if method is None else 1  # the unpatched model needs the processor's run of 576
    ids = torch.cat([torch.full((1, text_tokens // 2), 1), torch.full((1, n_img), tid),
                     torch.full((1, text_tokens - text_tokens // 2), 2)], 1)
    restore_visual_tokens(model)
    if method is not None:
        reduce_visual_tokens(model, method, budget)
    try:
        def run():
            with torch.no_grad():
                model(input_ids=ids, pixel_values=pixels, logits_to_keep=1, use_cache=True)

        ms, all_ms = _median_ms(run, repeats)
        count = FULL if method is None else model.visual_token_reducer["counts"][0]
    finally:
        restore_visual_tokens(model)
    return {"ttft_ms": ms, "ttft_ms_all": [round(t, 2) for t in all_ms], "tokens": count}


def reducer_times(feats: Tensor, methods: Sequence[str], budgets: Sequence[Optional[int]], repeats: int) -> list[dict]:
    """Each reducer's own time on one image's features (1, N, D), median over repeats; budget
    None: the natural count (setok, prumerge only)."""
    rows = []
    for m in methods:
        for b in budgets:
            if (b is None and m not in ("setok", "prumerge")) or (b is not None and b >= feats.shape[1]):
                continue
            ms, _ = _median_ms(lambda: reduce_features(feats, m, b), repeats)
            k = int(reduce_features(feats, m, b)[0].shape[0])
            rows.append({"method": m, "budget": b, "D": int(feats.shape[-1]), "tokens": k, "reducer_ms": ms})
    return rows


def _widen(feats: Tensor, width: int = 1024, seed: int = 0) -> Tensor:
    """Features through a fixed random width-wide map (orthonormal columns: distances kept)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(width, feats.shape[-1], generator=g))
    return feats @ q.T


def cost_table(layers: int = 2, repeats: int = 3, budgets: Sequence[int] = BUDGETS,
               methods: Sequence[str] = METHODS, world_images: Sequence[str] = (),
               photos: Optional[Sequence[str]] = None, model_folder: Optional[str] = None,
               progress: Optional[Callable[[str], None]] = None, model=None, ttft_images: int = 3) -> dict:
    """The cost half of the benchmark (see the module docstring). model: another
    Llava model with the builtin tower to time instead of the 7B-shaped one (tests)."""
    say = progress or (lambda s: None)
    photos = list(photo_paths() if photos is None else photos)
    say("building the LLaVA-1.5-7B-shaped model")
    shaped = model is None
    model = llava_7b_shaped(layers) if shaped else model
    tower = model.model.vision_tower
    groups = {"synthetic world": list(world_images), "real photos": photos}
    groups = {k: v for k, v in groups.items() if v}
    # natural counts per image
    natural = {}
    for g, paths in groups.items():
        f = tower_features(tower, paths)
        natural[g] = [int(t.shape[0]) for t in reduce_features(f, "setok")]
    counts = sorted(set(budgets) | {c for v in natural.values() for c in v})
    say(f"prefill at {len(counts)} token counts")
    prefill = []
    for K in counts:
        say(f"prefill, {K} visual tokens")
        prefill.append({"visual_tokens": K, **measure_prefill(model, K + TEXT_TOKENS, repeats)})
    by_k = {r["visual_tokens"]: r for r in prefill}
    # the reducers' own time, on the first photo (or world image)
    probe = (photos or list(world_images))[:1]
    f1 = tower_features(tower, probe)
    say("reducer times")
    rb = [None] + [b for b in budgets if b < FULL]
    red = reducer_times(f1, methods, rb, repeats) + reducer_times(_widen(f1), methods, rb, repeats)
    tower_ms, _ = _median_ms(lambda: tower(load_pixels(probe)), repeats)
    # end to end, per image group: 576 against SeTok's natural count
    goal = []
    for g, paths in groups.items():
        say(f"time to first token, {g}")
        full, red_t = [], []
        for p in paths[:ttft_images]:
            px = load_pixels([p])
            full.append(time_to_first_token(model, px, None, None, repeats))
            red_t.append(time_to_first_token(model, px, "setok", None, repeats))
        k_med = statistics.median(natural[g])
        fl_full = prefill_flops(model.config.text_config, FULL + TEXT_TOKENS)
        fl_red = statistics.median([prefill_flops(model.config.text_config, k + TEXT_TOKENS) for k in natural[g]])
        t_full = statistics.median([r["ttft_ms"] for r in full])
        t_red = statistics.median([r["ttft_ms"] for r in red_t])
        goal.append({"images": g, "n_images": len(paths), "setok_tokens_median": k_med,
                     "setok_tokens_all": natural[g], "flops_576": fl_full, "flops_setok": fl_red,
                     "flops_ratio": fl_full / fl_red, "ttft_576_ms": t_full, "ttft_setok_ms": t_red,
                     "ttft_ratio": t_full / t_red, "ttft_images": len(full),
                     "flops_goal_met": fl_full / fl_red >= 5.0, "ttft_goal_met": t_full / t_red >= 4.0})
    # the reducer's time next to the prefill it saves at the count it gives (a count not
    # measured above, e.g. prumerge's natural one, is measured now)
    for r in red:
        k = r["tokens"]
        if k not in by_k and FULL in by_k:
            by_k[k] = measure_prefill(model, k + TEXT_TOKENS, repeats)
        r["prefill_saved_ms"] = by_k[FULL]["prefill_ms"] - by_k[k]["prefill_ms"] if FULL in by_k else None
    tc = model.config.text_config
    out = {"config": {"name": "LLaVA-1.5-7B-shaped" if shaped else "given model", "hidden_size": tc.hidden_size,
                      "intermediate_size": tc.intermediate_size, "heads": tc.num_attention_heads,
                      "layers": tc.num_hidden_layers, "layers_of_real_model": 32 if shaped else tc.num_hidden_layers,
                      "vocab_size": tc.vocab_size, "weights": "random", "dtype": "float32",
                      "tower": "builtin encoder + 2-D sin-cos PE (48-d)", "text_tokens": TEXT_TOKENS},
           "prefill": prefill, "reducers": red, "tower_ms": tower_ms, "goal": goal,
           "importance": IMPORTANCE_SUBSTITUTE, "real_model": None}
    del model
    if model_folder:
        out["real_model"] = real_model_cost(model_folder, counts, repeats, say, photos)
    else:
        out["real_model"] = {"skipped": "no --model LLAVA_FOLDER given (a local LLaVA-1.5-7B folder)"}
    return out


def real_model_cost(folder: str, counts: Sequence[int], repeats: int, say=None,
                    photos: Optional[Sequence[str]] = None, dtype=torch.bfloat16) -> dict:
    """A local LLaVA-1.5 folder (bf16 on CPU): prefill at each token count, SeTok's natural
    count on the real photos through its own tower (CLIP: the real CLS attention for the
    importance-based reducers), and the end-to-end time to first token of a one-photo
    question (the processor's prompt, `generate` of one token) unpatched against setok."""
    from ..integrations.llava import reduce_visual_tokens, restore_visual_tokens
    from ..tasks.llava import llava_prompt, load_llava
    from ..images import load_image

    say = say or (lambda s: None)
    say(f"loading {folder}")
    model, processor = load_llava(folder, dtype=dtype)
    photos = list(photo_paths() if photos is None else photos)
    rows = [{"visual_tokens": K, **measure_prefill(model, K + TEXT_TOKENS, repeats)} for K in counts]
    ttft = []
    for p in photos:
        inputs = processor(images=load_image(p), text=llava_prompt(processor, "What is in the image?"),
                           return_tensors="pt")

        def run():
            with torch.no_grad():
                model.generate(**inputs, max_new_tokens=1, do_sample=False)

        full_ms, _ = _median_ms(run, repeats)
        reduce_visual_tokens(model, "setok")
        try:
            red_ms, _ = _median_ms(run, repeats)
            k = model.visual_token_reducer["counts"][0]
        finally:
            restore_visual_tokens(model)
        ttft.append({"image": Path(p).name, "setok_tokens": k, "ttft_full_ms": full_ms, "ttft_setok_ms": red_ms,
                     "ttft_ratio": full_ms / red_ms})
    return {"folder": str(folder), "dtype": str(dtype).replace("torch.", ""), "prefill": rows, "photos": ttft}


# ----------------------------------------------------------------------------- accuracy

@dataclass
class Protocol:
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    intermediate: int = 128
    steps: int = 400
    eval_steps: tuple = (200, 400)  # val checkpoints: the run keeps the better one
    batch_size: int = 24  # conversations (all questions about one image) per step
    lr: float = 3e-3
    warmup: int = 30
    seed: int = 0
    train_limit: Optional[int] = None  # images of each split at most (quick runs)
    val_limit: Optional[int] = None
    test_limit: Optional[int] = None
    eval_batch: int = 128


def quick_protocol() -> "Protocol":
    """--quick: 300 / 40 / 60 images of train / val / test, 60 steps of 16."""
    return Protocol(steps=60, eval_steps=(30, 60), batch_size=16, warmup=10, train_limit=300, val_limit=40,
                    test_limit=60)


@dataclass
class World:
    """The VQA data of the three splits, tokenized once, and their tower features."""
    tokenizer: object
    image_token_id: int
    pad_id: int
    splits: dict = field(default_factory=dict)  # split -> {"entries", "ids", "labels", "prompts", "image_of", "feats", "json"}


def _render(entries, tok, image_token_id, prompt_only: bool):
    from ..models.setokim.text import IMAGE_TOKEN_INDEX, render_conversation

    ids_all, lab_all = [], []
    for e in entries:
        conv = e["conversations"][:1] if prompt_only else e["conversations"]
        ids, labels = render_conversation(conv, tok, system="")
        ids = [image_token_id if i == IMAGE_TOKEN_INDEX else i for i in ids]
        ids_all.append(ids)
        lab_all.append(labels)
    return ids_all, lab_all


def per_image_conversations(entries: Sequence[dict]) -> list[dict]:
    """Single-question instruct entries -> one multi-turn entry per image (first-seen order;
    the image mark stays in the first question only)."""
    from ..models.setokim.text import IMAGE_TOKEN

    by_image: dict = {}
    for e in entries:
        conv = e["conversations"]
        c = by_image.setdefault(e["image"], {"image": e["image"], "conversations": []})
        if c["conversations"]:
            conv = [{**conv[0], "value": conv[0]["value"].replace(IMAGE_TOKEN, "").strip()}] + list(conv[1:])
        c["conversations"] += conv
    return list(by_image.values())


def load_world(data: str, protocol: Protocol, tower: BuiltinTower,
               progress: Optional[Callable[[str, int, int], None]] = None) -> World:
    from ..data import formats
    from ..models.setokim.text import build_word_tokenizer

    root = Path(data)
    files = {s: root / s / "instruct.json" for s in ("train", "val", "test")}
    for s, f in files.items():
        if not f.is_file():
            raise UserError(f"{f}: not found (make the world with `setok data shapes --out {data}`)")
    tok = build_word_tokenizer([files["train"]])
    image_token_id = len(tok)
    world = World(tok, image_token_id, tok.pad_token_id)
    limits = {"train": protocol.train_limit, "val": protocol.val_limit, "test": protocol.test_limit}
    for s, f in files.items():
        entries = formats.load(f, "instruct", check_files=False)
        images = sorted({e["image"] for e in entries})
        if limits[s]:
            keep = set(images[: limits[s]])
            images = images[: limits[s]]
            entries = [e for e in entries if e["image"] in keep]
        index = {p: i for i, p in enumerate(images)}
        cb = (lambda n, s=s, tot=len(images): progress(f"tower features, {s}", n, tot)) if progress else None
        feats = tower_features(tower, images, progress=cb)
        # training sequences: all questions about an image as one multi-turn conversation (the
        # image's tokens paid once for ~5 answers); questions are asked one at a time
        convs = per_image_conversations(entries)
        ids, labels = _render(convs, tok, image_token_id, prompt_only=False)
        prompts, _ = _render(entries, tok, image_token_id, prompt_only=True)
        for i, e in enumerate(entries):
            e.setdefault("id", str(i))
        world.splits[s] = {"entries": entries, "ids": ids, "labels": labels, "prompts": prompts,
                           "conv_image": [index[c["image"]] for c in convs],
                           "image_of": [index[e["image"]] for e in entries], "feats": feats, "json": f}
    return world


def reduce_world(feats: Tensor, method: str, budget: Optional[int], batch: int = 64) -> list[Tensor]:
    """Every image's tokens [(K_i, D)] (the stated importance substitute where needed)."""
    out = []
    for i in range(0, feats.shape[0], batch):
        out += reduce_features(feats[i:i + batch], method, budget)
    return out


def _batch(world: World, split: str, rows: Sequence[int], tokens: Sequence[Tensor], prompt: bool):
    from ..models.setokim.text import collate_conversations

    sp = world.splits[split]
    if prompt:
        rendered = [(sp["prompts"][r], [0] * len(sp["prompts"][r])) for r in rows]
        ids, _, mask = collate_conversations(rendered, world.pad_id, padding_side="left")
        labels = None
    else:
        ids, labels, mask = collate_conversations([(sp["ids"][r], sp["labels"][r]) for r in rows], world.pad_id)
    toks = [tokens[sp["image_of" if prompt else "conv_image"][r]] for r in rows]
    ids, mask, labels = splice_image_tokens(ids, [int(t.shape[0]) for t in toks], world.image_token_id, mask,
                                            labels, world.pad_id)
    return ids, mask, labels, toks


def answer(model, world: World, split: str, tokens: Sequence[Tensor], batch: int = 128,
           max_new_tokens: int = 3) -> list[dict]:
    """Greedy answers to every question of a split -> [{"question_id", "answer"}]."""
    sp = world.splits[split]
    tok = world.tokenizer
    preds = []
    model.eval()
    for i in range(0, len(sp["entries"]), batch):
        rows = list(range(i, min(i + batch, len(sp["entries"]))))
        ids, mask, _, toks = _batch(world, split, rows, tokens, prompt=True)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, mm_encoder_outputs=image_outputs(model, toks),
                                 max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                                 pad_token_id=world.pad_id)
        new = out[:, ids.shape[1]:]
        for r, seq in zip(rows, new.tolist()):
            seq = [t for t in seq if t not in (tok.eos_token_id, world.pad_id)]
            preds.append({"question_id": str(sp["entries"][r]["id"]),
                          "answer": tok.decode(seq, skip_special_tokens=True).strip()})
    return preds


def score(world: World, split: str, preds: list[dict], out_dir: Path, name: str) -> dict:
    """`setok eval vqa` on the predictions (written to out_dir/name.json)."""
    from ..eval.harness import eval_vqa
    from ..files import atomic_write_json

    sp = world.splits[split]
    pred_file = out_dir / f"{name}.json"
    atomic_write_json(pred_file, preds)
    data_file = sp["json"]
    if len(sp["entries"]) != len(json.loads(Path(data_file).read_text())):
        data_file = out_dir / f"{split}_subset.json"  # a --quick subset: score the questions asked
        atomic_write_json(data_file, sp["entries"])  # (image paths are absolute after formats.load)
    return eval_vqa(str(data_file), str(pred_file))


def finetune(world: World, tokens: dict, protocol: Protocol, out_dir: Path, name: str,
             progress: Optional[Callable[[int], None]] = None) -> dict:
    """One run of the protocol: a fresh tiny LLaVA (seeded), `steps` AdamW steps on train with
    these reduced tokens, val scored at each eval step (the better checkpoint kept), test
    answered once. tokens: split -> [(K_i, D)] per image."""
    p = protocol
    tok = world.tokenizer
    model = tiny_llava(len(tok) + 1, world.image_token_id, world.pad_id, p.hidden, p.layers, p.heads,
                       p.intermediate, p.seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / p.warmup) * 0.5 *
                                              (1 + math.cos(math.pi * min(s, p.steps) / p.steps)))
    n = len(world.splits["train"]["ids"])
    g = torch.Generator().manual_seed(p.seed)  # the same batches for every run
    order = torch.randperm(n, generator=g).tolist()
    pos = 0
    best = None
    t0 = time.perf_counter()
    losses = []
    for step in range(1, p.steps + 1):
        if pos + p.batch_size > n:
            order = torch.randperm(n, generator=g).tolist()
            pos = 0
        rows = order[pos:pos + p.batch_size]
        pos += p.batch_size
        ids, mask, labels, toks = _batch(world, "train", rows, tokens["train"], prompt=False)
        out = model(input_ids=ids, attention_mask=mask, labels=labels, mm_encoder_outputs=image_outputs(model, toks))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(out.loss.detach()))
        if progress:
            progress(1)
        if step in p.eval_steps:
            val = score(world, "val", answer(model, world, "val", tokens["val"], p.eval_batch), out_dir,
                        f"{name}.val{step}")
            if best is None or val["accuracy"] > best[1]:
                best = (step, val["accuracy"], {k: v.detach().clone() for k, v in model.state_dict().items()})
            model.train()
    train_s = time.perf_counter() - t0
    model.load_state_dict(best[2])
    test = score(world, "test", answer(model, world, "test", tokens["test"], p.eval_batch), out_dir,
                 f"{name}.test")
    return {"val_accuracy": best[1], "steps_chosen": best[0], "test": test, "train_seconds": train_s,
            "final_loss": statistics.mean(losses[-20:])}


def accuracy_table(data: str, out_dir: Path, protocol: Protocol, budgets: Sequence[int] = ACCURACY_BUDGETS,
                   methods: Sequence[str] = METHODS, progress=None) -> dict:
    """The accuracy half (see the module docstring). progress(kind, ...) for the CLI's bars."""
    tower = BuiltinTower()
    say = progress or (lambda *a: None)
    world = load_world(data, protocol, tower, progress=lambda what, n, tot: say("features", what, n, tot))
    runs = [("full", FULL)] + [(m, None) for m in ("setok",) if m in methods] + \
        [(m, b) for b in budgets for m in methods]
    results = []
    done = {}  # identical token sets (setok's counts under a budget it never reaches) reuse a run
    for method, budget in runs:
        tokens = {s: reduce_world(sp["feats"], "random" if method == "full" else method,
                                  FULL if method == "full" else budget) for s, sp in world.splits.items()}
        key = tuple(tuple(t.shape[0] for t in tokens[s]) for s in ("train", "val", "test"))
        sig = (method, key, float(sum(float(t.double().sum()) for t in tokens["train"][:50])))
        counts = torch.tensor([t.shape[0] for t in tokens["test"]], dtype=torch.float32)
        row = {"method": method, "budget": budget, "tokens_mean": float(counts.mean()),
               "tokens_min": int(counts.min()), "tokens_max": int(counts.max())}
        if method in NEEDS_IMPORTANCE:
            row["importance"] = IMPORTANCE_SUBSTITUTE
        if sig in done:
            row.update({k: v for k, v in done[sig].items() if k not in row})
            row["same_tokens_as"] = done[sig]["run"]
        else:
            name = f"{method}_{budget if budget is not None else 'natural'}"
            say("run", name, protocol.steps)
            r = finetune(world, tokens, protocol, out_dir, name, progress=lambda n: say("step", n))
            row.update({"run": name, "accuracy": r["test"]["accuracy"], "val_accuracy": r["val_accuracy"],
                        "steps_chosen": r["steps_chosen"], "train_seconds": r["train_seconds"],
                        "final_loss": r["final_loss"],
                        "per_type": {k.split("/")[1]: v for k, v in r["test"].items() if k.startswith("accuracy/")}})
            done[sig] = row
        results.append(row)
    return {"protocol": dataclasses.asdict(protocol), "runs": results, "questions": {
        s: len(sp["entries"]) for s, sp in world.splits.items()}, "images": {
        s: int(sp["feats"].shape[0]) for s, sp in world.splits.items()}, "vocab": len(world.tokenizer) + 1}


def accuracy_goals(acc: dict, budgets: Sequence[int] = ACCURACY_BUDGETS) -> dict:
    """SeTok against the best baseline at each budget, and its natural count against 576."""
    runs = acc["runs"]
    full = next(r for r in runs if r["method"] == "full")
    out = {"per_budget": []}
    for b in budgets:
        at = [r for r in runs if r["budget"] == b]
        s = next((r for r in at if r["method"] == "setok"), None)
        base = [r for r in at if r["method"] != "setok"]
        if s is None or not base:
            continue
        best = max(base, key=lambda r: r["accuracy"])
        out["per_budget"].append({"budget": b, "setok": s["accuracy"], "best_baseline": best["method"],
                                  "best_baseline_accuracy": best["accuracy"],
                                  "margin_points": 100 * (s["accuracy"] - best["accuracy"]),
                                  "met": s["accuracy"] >= best["accuracy"]})
    nat = next((r for r in runs if r["method"] == "setok" and r["budget"] is None), None)
    if nat is not None:
        gap = 100 * (full["accuracy"] - nat["accuracy"])
        out["natural"] = {"setok": nat["accuracy"], "tokens_mean": nat["tokens_mean"], "full_576": full["accuracy"],
                          "gap_points": gap, "met": gap <= 2.0}
    return out


# ----------------------------------------------------------------------------- plot

COLOURS = {"setok": (214, 39, 40), "pool2d": (31, 119, 180), "random": (127, 127, 127), "tome": (44, 160, 44),
           "visionzip": (148, 103, 189), "prumerge": (255, 127, 14), "full": (0, 0, 0)}


def plot(acc: dict, path, title: str = "VQA accuracy vs visual tokens per image (synthetic world, tiny LLaVA)") -> None:
    """Accuracy against tokens per image (log axis), one line per method, the 576-token model
    as a dashed line; PNG via matplotlib when installed, else drawn with PIL."""
    from ..files import atomic_write_bytes

    runs = acc["runs"]
    series = {}
    for r in runs:
        if r.get("accuracy") is None or r["method"] == "full":
            continue
        series.setdefault(r["method"], []).append((r["tokens_mean"], r["accuracy"], r["budget"]))
    full = next((r for r in runs if r["method"] == "full"), None)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
    import io
    buf = io.BytesIO()
    if plt is not None:  # pragma: no cover (matplotlib is optional)
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
        for m, pts in series.items():
            pts = sorted(pts, key=lambda p: p[0])
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], "o-", label=m,
                    color=[c / 255 for c in COLOURS.get(m, (0, 0, 0))])
        if full is not None:
            ax.axhline(100 * full["accuracy"], ls="--", color="k", label="all 576 tokens")
        ax.set_xscale("log")
        ax.set_xlabel("visual tokens per image (mean)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(buf, format="png")
        plt.close(fig)
    else:
        _plot_pil(series, full, title, buf)
    atomic_write_bytes(path, buf.getvalue())


def _plot_pil(series, full, title, buf) -> None:
    from PIL import Image, ImageDraw

    W, H, L, R, T, B = 820, 520, 70, 150, 40, 60
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    xs = [p[0] for pts in series.values() for p in pts] + ([FULL] if full else [])
    ys = [p[1] for pts in series.values() for p in pts] + ([full["accuracy"]] if full else [])
    if not xs:
        xs, ys = [1, FULL], [0, 1]
    x0, x1 = math.log(max(min(xs), 1) * 0.8), math.log(max(xs) * 1.25)
    y0 = max(0.0, math.floor(min(ys) * 10) / 10 - 0.05)
    y1 = min(1.0, math.ceil(max(ys) * 10) / 10 + 0.02)
    if y1 <= y0:
        y1 = y0 + 0.1

    def px(x, y):
        return (L + (math.log(max(x, 1e-9)) - x0) / (x1 - x0) * (W - L - R),
                H - B - (y - y0) / (y1 - y0) * (H - T - B))

    d.rectangle([L, T, W - R, H - B], outline="black")
    for t in (1, 2, 4, 8, 16, 32, 64, 128, 256, 576):
        if math.log(t) < x0 or math.log(t) > x1:
            continue
        x, _ = px(t, y0)
        d.line([x, H - B, x, H - B + 5], fill="black")
        d.text((x - 8, H - B + 8), str(t), fill="black")
    step = 0.02 if y1 - y0 <= 0.2 else 0.05  # gridlines at whole percents
    y = math.ceil(y0 / step - 1e-9) * step
    while y <= y1 + 1e-9:
        _, yy = px(1, y)
        d.line([L - 5, yy, L, yy], fill="black")
        d.line([L, yy, W - R, yy], fill=(235, 235, 235))
        d.text((L - 40, yy - 6), f"{100 * y:.0f}%", fill="black")
        y += step
    d.rectangle([L, T, W - R, H - B], outline="black")
    d.text((L, 12), title, fill="black")
    d.text(((W - R + L) // 2 - 90, H - 25), "visual tokens per image (mean, log scale)", fill="black")
    ly = T + 5
    if full is not None:
        _, yy = px(1, full["accuracy"])
        for xx in range(L, W - R, 12):
            d.line([xx, yy, min(xx + 6, W - R), yy], fill="black", width=2)
        x, _ = px(FULL, full["accuracy"])
        d.ellipse([x - 4, yy - 4, x + 4, yy + 4], fill="black")
        d.line([W - R + 10, ly + 6, W - R + 30, ly + 6], fill="black", width=2)
        d.text((W - R + 35, ly), "all 576 tokens", fill="black")
        ly += 18
    for m, pts in series.items():
        c = COLOURS.get(m, (0, 0, 0))
        pts = sorted(pts, key=lambda p: p[0])
        coords = [px(p[0], p[1]) for p in pts]
        if len(coords) > 1:
            d.line(coords, fill=c, width=2)
        for (x, y) in coords:
            d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=c)
        d.line([W - R + 10, ly + 6, W - R + 30, ly + 6], fill=c, width=3)
        d.text((W - R + 35, ly), m, fill="black")
        ly += 18
    im.save(buf, format="PNG")


# ----------------------------------------------------------------------------- all of it

def run(data: Optional[str], out_dir, quick: bool = False, model_folder: Optional[str] = None,
        methods: Sequence[str] = METHODS, skip_accuracy: bool = False, skip_cost: bool = False,
        protocol: Optional[Protocol] = None, layers: Optional[int] = None, repeats: Optional[int] = None,
        progress=None) -> dict:
    """The whole benchmark; returns the JSON object the command prints and writes."""
    import platform

    out_dir = Path(out_dir)
    from ..files import ensure_dir
    ensure_dir(out_dir)
    for m in methods:
        if m not in METHODS:
            raise UserError(f"unknown reducer {m!r}; choose one of {', '.join(METHODS)}")
    if protocol is None:
        protocol = quick_protocol() if quick else Protocol()
    result = {"quick": quick, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "cpu": cpu_name(), "machine": platform.machine()}
    t0 = time.perf_counter()
    if not skip_accuracy:
        if data is None or not Path(data).is_dir():
            raise UserError(f"--data {data}: no such folder (make the world with `setok data shapes --out {data}`)")
        acc = accuracy_table(data, out_dir / "predictions", protocol, ACCURACY_BUDGETS if not quick else (16, 64),
                             methods, progress)
        result["accuracy"] = acc
        result["accuracy_goals"] = accuracy_goals(acc, ACCURACY_BUDGETS if not quick else (16, 64))
    if not skip_cost:
        world_images = []
        if data is not None and (Path(data) / "test" / "instruct.json").is_file():
            from ..data import formats
            ents = formats.load(Path(data) / "test" / "instruct.json", "instruct", check_files=False)
            world_images = sorted({e["image"] for e in ents})[: (3 if quick else 8)]
        say = (lambda s: progress("cost", s)) if progress else None
        result["cost"] = cost_table(layers or (1 if quick else 2), repeats or (1 if quick else 3),
                                    (16, 64, FULL) if quick else BUDGETS, methods, world_images,
                                    photo_paths()[: (1 if quick else 3)], model_folder, say,
                                    ttft_images=1 if quick else 3)
    result["seconds"] = time.perf_counter() - t0
    return result


def cpu_name() -> str:
    """The CPU's model name (lscpu / /proc/cpuinfo), or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "unknown"
