"""The cost half of `setok bench-reduce` (the package docstring's "Cost"): the prefill FLOPs
formula, the LLaVA-shaped models, the images, and the timings (prefill, KV cache, each
reducer's own time, time to first token) on the 7B-shaped model and on a real LLaVA-1.5
folder. The model builders and the image loading serve the accuracy half as well.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ...integrations.llava import BuiltinTower
from ...integrations.reducers import IMPORTANCE_SUBSTITUTE, METHODS, reduce_features

BUDGETS = (16, 32, 64, 144, 576)
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
    from ...images import as_image, letterbox

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
    here = Path(__file__).resolve().parents[2] / "assets" / "chelsea.png"
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
    from ...integrations.llava import reduce_visual_tokens, restore_visual_tokens

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
    """The cost half of the benchmark (see the package docstring). model: another
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
    from ...integrations.llava import reduce_visual_tokens, restore_visual_tokens
    from ...tasks.llava import llava_prompt, load_llava
    from ...images import load_image

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
