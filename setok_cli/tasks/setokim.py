"""Setokim's pipelines: caption, generate, edit, ask, segment (library calls behind the commands).

    model = load_setokim("runs/tiny-stage2")                   # run folder, checkpoint or setokim/ folder
    caption(model, ["a.png", "b.png"])                          # -> ["a red circle and ...", ...]
    generate(model, ["two red circles"], num_images=2, opts)   # -> [[image (S, S, 3) uint8, ...]]
    edit(model, ["a.png"], ["make the red circle blue"])        # -> [image (S, S, 3) uint8]
    ask(model, ["a.png"], ["How many objects are there?"])      # -> ["3"]
    segment(model, ["a.png"], ["the red circle"])               # -> [Segmented(mask (H, W) bool, ...)]

Each runs in batches with the KV cache and asks the way stage-II training asked
(`TASK_PROMPTS`): the caption prompt and the image; "Generate an image: ..." then `[Img]`
(the model writes the image's tokens until its stop head ends it); the source image and
the instruction then `[Img]`. Images come back from the stage-1 detokenizer the checkpoint
holds, resized to `size` (None: the detokenizer's own resolution).

Questions are asked as "<image>\n{question}" and segmentation as "<image>\nSegment
{query}." then `[Img]`: the one visual token written is decoded by the stage-1 mask
decoder over the input image (models/setokim/regions.py), optionally snapped first to the
nearest token of the input image.

Over a data file (`run_file`), each writes the prediction JSON that `setok eval` reads:
caption `{"image", "caption"}`, generate `{"caption", "image": png}`, edit `{"source",
"instruction", "image": png}`, vqa `{"question_id", "answer"}`, segment `{"image",
"expression", "mask": png}`; PNGs go to `<pred_out stem>_images/`, every file written
atomically.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from ..files import atomic_write, atomic_write_json, ensure_dir
from .sampling import CAPTION_BEAMS, Sampling

__all__ = ["Sampling", "CAPTION_BEAMS", "load_setokim", "caption", "generate", "edit", "keep_source_pixels", "ask",
           "segment", "Segmented", "overlay", "run_file", "side_by_side", "TASKS"]

TASKS = ("caption", "generate", "edit", "vqa", "segment")
_KIND = {"caption": "pairs", "generate": "pairs", "edit": "edits", "vqa": "instruct", "segment": "referring"}


def load_setokim(path):
    """A Setokim from a stage-2/3 run folder (its latest checkpoint), a checkpoint folder,
    or a saved Setokim folder; eval mode. A folder without one is one UserError line."""
    from ..models.setokim import Setokim
    model = Setokim.from_pretrained(path)
    if model.setok is None:
        raise UserError(f"{path}: this Setokim has no SeTok saved with it (setok/), so it cannot read images")
    return model.eval()


def _kw(opts: Sampling, generator: torch.Generator) -> dict:
    return dict(max_new_tokens=opts.max_new_tokens, temperature=opts.temperature, top_p=opts.top_p,
                visual_steps=opts.visual_steps, visual_temperature=opts.visual_temperature, copy=opts.copy,
                generator=generator, bank=opts.bank, source_margin=opts.source_margin,
                bank_layouts=opts.bank_layouts if opts.bank is not None else None, max_overlap=opts.max_overlap,
                snap_metric=opts.snap_metric, place_temperature=opts.place_temperature,
                place=opts.place)


def _decode(model, token_sets: list[torch.Tensor], opts: Sampling, generator: torch.Generator,
            size: Optional[int]) -> list[np.ndarray]:
    """Produced token sets -> images (S, S, 3) uint8 through the stage-1 detokenizer.
    Generation gives every image at least one token; a row that produced no image at all
    (it never reached `[Img]`) is decoded from one zero token, so each entry gets a picture."""
    from ..models.setokim import decode_images
    if not token_sets:
        return []
    T = int(model.config.token_dim)
    sets = [t if t.shape[0] else torch.zeros(1, T) for t in token_sets]
    x = decode_images(model, sets, steps=opts.decode_steps, generator=generator)        # (N, 3, s, s)
    if size is not None and x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return [(im.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8) for im in x]


def _check_texts(texts: Sequence[str], what: str) -> None:
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise UserError(f"empty {what}" + (f" (item {i})" if len(texts) > 1 else ""))


@torch.no_grad()
def caption(model, images: Sequence, opts: Optional[Sampling] = None) -> list[str]:
    """Images (paths, PIL images or uint8 arrays) -> one caption each, the most likely of
    `opts.caption_beams` beams (models/setokim/beam.py; 1: sampled as `opts` says). With `opts.rerank`
    R > 1, R - 1 more captions are sampled at `opts.rerank_temperature` (caption c with seed + c)
    and the one the model would draw the image from best is kept (tasks/rerank.py)."""
    from ..models.setokim import TASK_PROMPTS, prompt_batch
    from ..models.setokim.beam import beam_texts
    from .rerank import pick_captions
    opts = opts or Sampling()
    sets = model.read_sets(list(images))
    args = prompt_batch(model, [TASK_PROMPTS["caption"]] * len(sets), [[s] for s in sets])
    cands = []
    for c in range(opts.rerank):
        g = torch.Generator().manual_seed(opts.seed + c)
        if c == 0 and opts.caption_beams > 1:
            cands.append(beam_texts(model, *args, num_beams=opts.caption_beams, max_new_tokens=opts.max_new_tokens))
            continue
        at = opts if c == 0 else replace(opts, temperature=opts.rerank_temperature)
        cands.append([o.text for o in model.generate(*args, **_kw(at, g))])
    return cands[0] if opts.rerank == 1 else pick_captions(model, sets, cands)


@torch.no_grad()
def generate(model, prompts: Sequence[str], num_images: int = 1, opts: Optional[Sampling] = None,
             size: Optional[int] = None, stats: Optional[dict] = None) -> list[list[np.ndarray]]:
    """Prompts (captions) -> `num_images` images each. Image j of the prompts is drawn with
    seed + j. With `opts.rerank` R > 1, up to R candidates of image j are drawn (seeds
    seed + j + c * num_images) and the one the model reads back as its prompt best is kept
    (tasks/rerank.best_of; with `opts.rerank_stop` a prompt stops drawing once a candidate
    scores at most that, and the prompts still drawing are drawn as one batch). `stats`: filled
    with "drawn", the number of candidates drawn per image (a list over images, prompt-major)."""
    from ..models.setokim import TASK_PROMPTS, UNCOND_GENERATE, prompt_batch
    from .rerank import best_of
    opts = opts or Sampling()
    _check_texts(prompts, "prompt")
    if num_images < 1:
        raise UserError(f"--num-images must be >= 1, got {num_images}")
    texts = [TASK_PROMPTS["generate"].format(caption=p.strip()) for p in prompts]
    # a sized model says the number of objects first (models/setokim/sized.py): its prompt does not open the image
    start = not model.config.sized_images
    rows = prompt_batch(model, texts, start_image=start)
    # classifier-free guidance: rows without a caption, all alike (so any len(idx) of them serve idx)
    uncond = prompt_batch(model, [UNCOND_GENERATE] * len(texts), start_image=True)[:2] if opts.guidance != 1 else None

    def draw(idx: list[int], c: int, j: int) -> list[np.ndarray]:
        """Candidate c of image j of the prompts idx (all of them: the batch's prompt rows)."""
        sub = rows if len(idx) == len(texts) else prompt_batch(model, [texts[i] for i in idx], start_image=start)
        cfg = {} if uncond is None else dict(guidance=opts.guidance, uncond=tuple(u[:len(idx)] for u in uncond))
        g = torch.Generator().manual_seed(opts.seed + j + c * num_images)
        gen = model.generate(*sub, **_kw(opts, g), **cfg)
        return _decode(model, [o.images[0] if o.images else _empty(model) for o in gen], opts, g, size)

    per_image = [best_of(model, prompts, lambda idx, c: draw(idx, c, j), opts.rerank, opts.rerank_stop)
                 for j in range(num_images)]                # (images, candidates drawn) per image j
    if stats is not None:
        stats["drawn"] = [drawn[i] for i in range(len(texts)) for _, drawn in per_image]
    return [[imgs[i] for imgs, _ in per_image] for i in range(len(texts))]


def _empty(model) -> torch.Tensor:
    return torch.zeros(0, int(model.config.token_dim))


@torch.no_grad()
def edit(model, images: Sequence, instructions: Sequence[str], opts: Optional[Sampling] = None,
         size: Optional[int] = None) -> list[np.ndarray]:
    """Source images + instructions -> the edited images."""
    from ..models.setokim import TASK_PROMPTS, prompt_batch
    opts = opts or Sampling()
    _check_texts(instructions, "instruction")
    if len(images) != len(instructions):
        raise UserError(f"{len(images)} image(s) but {len(instructions)} instruction(s)")
    if opts.diff:
        from .edit_diff import edit_diff
        return edit_diff(model, images, instructions, opts, size)
    lay = {}
    if opts.bank is not None and opts.bank_layouts is not None:      # the source's tokens are kept apart too
        from ..models.setokim.bank import token_sets_with_layouts
        sets, lay["image_layouts"], seeds = token_sets_with_layouts(model, list(images), seeds=True)
        sets = model.readable(sets, seeds)
    else:
        sets = model.read_sets(list(images))
    if opts.keep_pixels is not None and "image_layouts" not in lay:
        raise UserError("keep_pixels needs a bank that stores token layouts (--bank FILE from `setok bank`, "
                        "--max-overlap under 1)")
    source_sets = [s[0] if isinstance(s, tuple) else s for s in sets]
    texts = [TASK_PROMPTS["edit"].format(instruction=t.strip()) for t in instructions]
    g = torch.Generator().manual_seed(opts.seed)
    gen = model.generate(*prompt_batch(model, texts, [[s] for s in sets], start_image=True), **_kw(opts, g), **lay)
    written = [o.images[0] if o.images else _empty(model) for o in gen]
    out = _decode(model, written, opts, g, size)
    if opts.keep_pixels is None:
        return out
    from ..images import as_image
    return [keep_source_pixels(np.asarray(as_image(im).resize(o.shape[1::-1])), o, src, layout, w, opts.keep_pixels)
            for im, o, src, layout, w in zip(images, out, source_sets, lay["image_layouts"], written)]


def keep_source_pixels(source: np.ndarray, edited: np.ndarray, source_tokens: torch.Tensor,
                       source_layouts: torch.Tensor, written: torch.Tensor, grow: int = 1,
                       rtol: float = 1e-3, exclude: Optional[torch.Tensor] = None) -> np.ndarray:
    """An edit's decoded image with the source's own pixels pasted back over every source object
    the edit copied token for token (not in the paper; `edit(opts.keep_pixels)`). The stage-1
    detokenizer redraws even a copied object only approximately, so an edit that keeps an object
    would otherwise still change it. A source token counts as copied when a written token equals
    it (L2 within `rtol` of its norm: a bank snap copies it exactly, up to standardising); only
    object tokens are pasted (layouts over at most `bank.OBJECT_SHARE` of the grid: the background token always
    comes from the decoder, so what the edit adds or removes shows). The pasted region grows by
    `grow` layout cells on every side, over the edge of the object the decoder drew slightly
    elsewhere (chosen on val: README, "Keeping the source's pixels"); cells of `exclude` (P,)
    bool are never pasted (an edit diff's dropped and new objects).

    source, edited (S, S, 3) uint8; source_tokens (K, T) and source_layouts (K, P) bool, P = G * G,
    as `bank.token_sets_with_layouts` gives them; written (K', T) -> (S, S, 3) uint8."""
    K = source_tokens.shape[0]
    if source_layouts.shape[0] != K:
        raise ValueError(f"{K} source tokens but {source_layouts.shape[0]} layouts")
    if K == 0 or written.shape[0] == 0:
        return edited
    d = torch.cdist(source_tokens.float(), written.float().to(source_tokens.device))          # (K, K')
    copied = (d.min(1).values <= rtol * source_tokens.float().norm(dim=1).clamp_min(1e-6)).cpu()
    from ..models.setokim.bank import OBJECT_SHARE
    objects = source_layouts.float().mean(1).cpu() <= OBJECT_SHARE
    keep = source_layouts.cpu()[copied & objects].any(0)                                     # (P,)
    G = int(round(keep.numel() ** 0.5))
    keep = keep.float().view(1, 1, G, G)
    keep = F.max_pool2d(keep, 2 * grow + 1, 1, grow) if grow > 0 else keep
    if exclude is not None:
        keep = keep * (~exclude.cpu().bool()).float().view(1, 1, G, G)
    m = F.interpolate(keep, size=edited.shape[:2], mode="nearest")[0, 0].numpy() > 0.5
    return np.where(m[..., None], source, edited).astype(np.uint8)


@torch.no_grad()
def ask(model, images: Sequence, questions: Sequence[str], opts: Optional[Sampling] = None,
        tokens: bool = False) -> list:
    """Images + questions (one each) -> answers, in words (`[Img]` is never sampled: ask
    for pictures with `generate`, `edit` or `chat`), except by a model whose answers look first
    (`config.look_answers`, models/setokim/look.py): it writes "<image> <image>: 2", one token per
    image, each at its most likely place (the part after the last ": " is the answer), with room for at least a
    scan of every image token (`look.scan_answer`: 3 text ids per token) whatever `max_new_tokens`. `tokens`:
    (answer, [each written token (T,)]) per question instead (`look.looked_masks` finds their regions)."""
    from ..models.setokim import TASK_PROMPTS, prompt_batch
    opts = opts or Sampling()
    _check_texts(questions, "question")
    if len(images) != len(questions):
        raise UserError(f"{len(images)} image(s) but {len(questions)} question(s)")
    sets = model.read_sets(list(images))
    texts = [TASK_PROMPTS["ask"].format(question=q.replace("<image>", " ").strip()) for q in questions]
    g = torch.Generator().manual_seed(opts.seed)
    look = bool(model.config.look_answers)
    kw = {**_kw(opts, g), **(dict(max_visual_tokens=1, place="draw", place_temperature=0.0,
                                  snap_source=opts.look_snap) if look else {})}
    if look:                                           # [Img] [/Img] and a number per token, then ": N" </s>
        K = max(int((s[0] if isinstance(s, tuple) else s).shape[0]) for s in sets)
        kw["max_new_tokens"] = max(kw["max_new_tokens"], 3 * K + 4)
    gen = model.generate(*prompt_batch(model, texts, [[s] for s in sets]), **kw, text_only=not look)
    return [(o.text, [im[0] for im in o.images if im.shape[0]]) if tokens else o.text for o in gen]


def show_look(model, image, question: str, opts: Optional[Sampling], path) -> tuple[str, Path]:
    """`setok ask --show-look`: the answer of a model whose answers look first, and `path`, a PNG of
    the image with each token's region it wrote (mask decoder) tinted in its own colour."""
    from ..images import as_image
    from ..models.setokim.look import looked_masks, looked_picture
    if not model.config.look_answers:
        raise UserError("this model answers without looking (no look row trained it): drop --show-look")
    answer, tokens = ask(model, [image], [question], opts, tokens=True)[0]
    ensure_dir(Path(path).parent)
    save_png(path, looked_picture(np.asarray(as_image(image)), looked_masks(model, image, tokens)))
    return answer, Path(path)


@dataclass
class Segmented:
    mask: np.ndarray            # (H, W) bool on the input image's own pixels
    probs: np.ndarray           # (H, W) float mask probability
    produced: bool              # the model wrote a visual token (else: no mask, all False)


@torch.no_grad()
def segment(model, images: Sequence, queries: Sequence[str], opts: Optional[Sampling] = None,
            snap_to_input: bool = False, threshold: float = 0.5) -> list[Segmented]:
    """Images + referring expressions -> one mask each: the prompt, `[Img]`, one visual
    token, the mask decoder (see the module docstring)."""
    from ..models.setokim.regions import read_images, region_probs, snap, to_original
    opts = opts or Sampling()
    _check_texts(queries, "query")
    if len(images) != len(queries):
        raise UserError(f"{len(images)} image(s) but {len(queries)} quer(ies)")
    if model.mask_decoder is None:
        raise UserError("this Setokim has no mask decoder (its stage-1 checkpoint saved none): it cannot segment")
    seen = read_images(model, list(images))
    sets = seen.token_sets(model)
    first, produced = referred_tokens(model, model.readable(sets, seen.seeds(model)), queries, opts)
    if snap_to_input:
        first = snap(model, first, sets)
    probs = region_probs(model, seen, first.unsqueeze(1))[:, 0]                    # (N, S, S)
    out = []
    for i, p in enumerate(produced):
        pr = to_original(probs[i:i + 1], seen, i)[0].cpu().numpy()
        out.append(Segmented(mask=(pr > threshold) & p, probs=pr if p else np.zeros_like(pr), produced=p))
    return out


def referred_tokens(model, readable: list, expressions: Sequence[str],
                    opts: Sampling) -> tuple[torch.Tensor, list[bool]]:
    """Input images as prompts read them (`Setokim.readable`) + referring expressions -> the
    visual token each segmentation answer writes, (N, T) (zeros where none was written), and
    whether one was: "Segment {expression}." answered `[Img] v [/Img]`."""
    from ..models.setokim import TASK_PROMPTS, prompt_batch
    texts = [TASK_PROMPTS["segment"].format(expression=q.strip().rstrip(".")) for q in expressions]
    g = torch.Generator().manual_seed(opts.seed)
    gen = model.generate(*prompt_batch(model, texts, [[s] for s in readable], start_image=True),
                         **{**_kw(opts, g), "max_visual_tokens": 1})
    produced = [bool(o.images and o.images[0].shape[0]) for o in gen]
    T = int(model.config.token_dim)
    first = torch.stack([o.images[0][0] if p else torch.zeros(T) for o, p in zip(gen, produced)]).to(model.device)
    return first, produced


def overlay(image: np.ndarray, mask: np.ndarray, color=(255, 40, 40), alpha: float = 0.5) -> np.ndarray:
    """image (H, W, 3) uint8 with the mask tinted and its outline drawn."""
    out = image.astype(np.float32).copy()
    m = mask.astype(bool)
    out[m] = (1 - alpha) * out[m] + alpha * np.asarray(color, np.float32)
    edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
    out[edge] = color
    return out.round().astype(np.uint8)


def side_by_side(source: np.ndarray, edited: np.ndarray, gap: int = 4) -> np.ndarray:
    """source | edited, both at the larger height (nearest), on a white gap."""
    from PIL import Image
    h = max(source.shape[0], edited.shape[0])

    def fit(a):
        return np.asarray(Image.fromarray(a).resize((round(a.shape[1] * h / a.shape[0]), h), Image.NEAREST))
    a, b = fit(source), fit(edited)
    return np.concatenate([a, np.full((h, gap, 3), 255, np.uint8), b], axis=1)


def save_png(path, image: np.ndarray) -> None:
    from PIL import Image
    atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))


# ---- over a data file -------------------------------------------------------------------

def run_file(model, task: str, data: str, pred_out: str, opts: Optional[Sampling] = None,
             batch_size: int = 16, size: Optional[int] = None, limit: Optional[int] = None,
             on_batch: Optional[Callable[[int], None]] = None, snap_to_input: bool = False) -> list[dict]:
    """Run `task` over a SPEC data file and write the prediction JSON `setok eval` reads
    (each prediction names its data entry by "index": captions repeat in the world).
    caption/generate read pairs, edit reads edits, vqa reads instruct (every question of
    every entry; an explained answer, "... at 5: yes", is written as "answer": "yes" and
    "reasons": the whole text), segment reads referring."""
    from ..data.formats import load
    from ..data.shapes_text import final_answer
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    opts = opts or Sampling()
    entries = load(data, _KIND[task])
    if task == "vqa":
        entries = _questions(entries)
    entries = entries[:limit] if limit else entries
    out_path = Path(pred_out)
    img_dir = out_path.parent / f"{out_path.stem}_images"
    ensure_dir(out_path.parent)
    if task not in ("caption", "vqa"):
        ensure_dir(img_dir)
    preds: list[dict] = []
    rel = lambda p: os.path.relpath(p, out_path.parent)               # noqa: E731 (paths relative to the JSON)
    for start in range(0, len(entries), batch_size):
        chunk = entries[start:start + batch_size]
        if task == "caption":
            for k, (e, text) in enumerate(zip(chunk, caption(model, [e["image"] for e in chunk], opts))):
                preds.append({"index": start + k, "image": rel(e["image"]), "caption": text})
        elif task == "vqa":
            for e, a in zip(chunk, ask(model, [e["image"] for e in chunk], [e["question"] for e in chunk], opts)):
                short = final_answer(a)
                preds.append({"question_id": e["id"], "question": e["question"], "answer": short,
                              **({"reasons": a} if short != a else {})})
        elif task == "segment":
            segs = segment(model, [e["image"] for e in chunk], [e["expression"] for e in chunk], opts,
                           snap_to_input=snap_to_input)
            for k, (e, sg) in enumerate(zip(chunk, segs)):
                png = img_dir / f"{start + k:06d}.png"
                save_png(png, sg.mask.astype(np.uint8) * 255)
                preds.append({"index": start + k, "image": rel(e["image"]), "expression": e["expression"],
                              "mask": rel(png)})
        elif task == "generate":
            stats: dict = {}
            imgs = generate(model, [e["caption"] for e in chunk], 1, opts, size, stats=stats)
            for k, (e, ims, n) in enumerate(zip(chunk, imgs, stats["drawn"])):
                png = img_dir / f"{start + k:06d}.png"
                save_png(png, ims[0])
                preds.append({"index": start + k, "caption": e["caption"], "image": rel(png),
                              **({"drawn": n} if opts.rerank > 1 else {})})     # candidates drawn (--rerank)
        else:
            imgs = edit(model, [e["source"] for e in chunk], [e["instruction"] for e in chunk], opts, size)
            for k, (e, im) in enumerate(zip(chunk, imgs)):
                png = img_dir / f"{start + k:06d}.png"
                save_png(png, im)
                preds.append({"index": start + k, "source": rel(e["source"]), "instruction": e["instruction"],
                              "image": rel(png)})
        if on_batch is not None:
            on_batch(len(chunk))
    atomic_write_json(out_path, preds)
    return preds


def _questions(entries: list[dict]) -> list[dict]:
    """Instruct entries -> one item per question {"id", "image", "question"} (multi-turn
    entries: each turn asked on its own, ids "<id>/<turn>", as `setok eval vqa` counts them)."""
    from ..eval.harness import vqa_questions
    return [{**q, "image": entries[q["entry"]]["image"]} for q in vqa_questions(entries)]


def count_entries(task: str, data: str, limit: Optional[int] = None) -> int:
    """How many items `run_file` will process (for a progress bar)."""
    from ..data.formats import load
    entries = load(data, _KIND.get(task, "pairs"), check_files=False)
    n = len(_questions(entries)) if task == "vqa" else len(entries)
    return min(n, limit) if limit else n
