"""Text side of Setokim: the Vicuna v1 conversation format, the tiny word-level tokenizer,
and the collation of rendered conversations into padded batches.

A conversation (LLaVA JSON `conversations`) renders to ids and labels:

    <s> SYSTEM USER: <image>\\nWhat is this? ASSISTANT: a red circle</s>USER: ... ASSISTANT: ...</s>

Only the assistant's answers and their `</s>` count (labels elsewhere are IGNORE_INDEX).
`<image>` becomes one IMAGE_TOKEN_INDEX placeholder in the ids (LLaVA's
`tokenizer_image_token`), which the model splices into `[Img] v_1 .. v_K [/Img]`; its
label says what the image is: IGNORE_INDEX for an image the model reads (in a user turn),
IMAGE_TOKEN_INDEX for an image it must write (in an assistant turn).

Segments are tokenized one by one (the prompt of a round, each answer), at both scales, so
training and inference cut the text the same way.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import Tensor

from ...errors import UserError

__all__ = ["IMAGE_TOKEN", "IMAGE_TOKEN_INDEX", "IGNORE_INDEX", "IMG_START", "IMG_END", "VICUNA_SYSTEM",
           "TASK_PROMPTS", "UNCOND_GENERATE",
           "IMAGE_PLACEMENTS", "place_images", "tokenize_with_images", "render_conversation",
           "collate_conversations", "pack_token_sets", "world_texts", "build_word_tokenizer"]

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_INDEX = -200       # LLaVA's placeholder id
IGNORE_INDEX = -100
IMG_START, IMG_END = "[Img]", "[/Img]"
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
ROLES = {"human": "USER", "user": "USER", "gpt": "ASSISTANT", "assistant": "ASSISTANT"}
# The task prompts (the pipelines and the stage-2/3 data use these; the tiny tokenizer's
# vocabulary includes their words). A question (`setok ask`, VQA data) is asked as written,
# after the image: "<image>\n{question}".
TASK_PROMPTS = {
    "caption": "<image>\nDescribe the image briefly.",
    "generate": "Generate an image: {caption}",
    "edit": "<image>\n{instruction}",
    "segment": "<image>\nSegment {expression}.",
    "ask": "<image>\n{question}",
}
# the generation request without its caption: the unconditional side of classifier-free
# guidance (the data task `generate_uncond`, `generate(..., guidance=)`)
UNCOND_GENERATE = TASK_PROMPTS["generate"].format(caption="").strip()


# Where a user turn's input images sit: "before_text" as written ("<image>\n{question}", LLaVA),
# or "after_text" ("{question}\n<image>": in a causal LM the image's tokens then see the
# question, so each can mark itself as the object asked about). A model's config fixes one;
# training and inference render through it alike.
IMAGE_PLACEMENTS = ("before_text", "after_text")


def place_images(value: str, placement: str = "before_text") -> str:
    """A user turn's text -> the same turn with its `<image>` marks where `placement` puts
    them (their order kept). "before_text" returns the turn as written."""
    if placement == "before_text" or IMAGE_TOKEN not in value:
        return value
    if placement != "after_text":
        raise UserError(f"image_placement must be one of {', '.join(IMAGE_PLACEMENTS)}, got {placement!r}")
    text = " ".join(value.replace(IMAGE_TOKEN, " ").split())
    marks = IMAGE_TOKEN * value.count(IMAGE_TOKEN)
    return f"{text}\n{marks}" if text else marks


def tokenize_with_images(text: str, tokenizer) -> list[int]:
    """Text with `<image>` marks -> ids, each mark one IMAGE_TOKEN_INDEX (no BOS / EOS)."""
    ids: list[int] = []
    for i, piece in enumerate(text.split(IMAGE_TOKEN)):
        if i:
            ids.append(IMAGE_TOKEN_INDEX)
        if piece.strip():
            ids.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
    return ids


def render_conversation(conversations: Sequence[dict], tokenizer, *, system: str = VICUNA_SYSTEM,
                        add_generation_prompt: bool = False, where: str = "",
                        image_placement: str = "before_text") -> tuple[list[int], list[int]]:
    """LLaVA `conversations` -> (ids, labels), Vicuna v1. A conversation that ends with
    a user turn is a prompt: it ends with "ASSISTANT:" (then `add_generation_prompt` is
    implied). User turns' input images are placed by `place_images(.., image_placement)`.
    An empty user turn is one UserError line."""
    pre = f"{where}: " if where else ""
    if not conversations:
        raise UserError(f"{pre}empty conversation")
    ids, labels = [tokenizer.bos_token_id], [IGNORE_INDEX]
    pending = f"{system} " if system else ""
    expect = "USER"
    for n, turn in enumerate(conversations):
        role = ROLES.get(str(turn.get("from", "")).lower()) if isinstance(turn, dict) else None
        value = turn.get("value") if isinstance(turn, dict) else None
        if role is None or not isinstance(value, str):
            raise UserError(f"{pre}turn {n}: need {{'from': 'human' | 'gpt', 'value': str}}, got {turn!r}")
        if role != expect:
            raise UserError(f"{pre}turn {n}: expected a {expect} turn, got {role} (turns alternate, user first)")
        if role == "USER":
            if not value.strip():
                raise UserError(f"{pre}empty prompt (turn {n})")
            pending += f"USER: {place_images(value, image_placement)} ASSISTANT:"
            expect = "ASSISTANT"
            continue
        p = tokenize_with_images(pending, tokenizer)
        a = tokenize_with_images(value, tokenizer) + [tokenizer.eos_token_id]
        ids += p + a
        labels += [IGNORE_INDEX] * len(p) + a          # a target image keeps IMAGE_TOKEN_INDEX as its label
        pending, expect = "", "USER"
    if expect == "ASSISTANT":                           # ends with the user: a prompt
        p = tokenize_with_images(pending, tokenizer)
        ids += p
        labels += [IGNORE_INDEX] * len(p)
    elif add_generation_prompt:
        raise UserError(f"{pre}a generation prompt must end with a user turn")
    return ids, labels


def collate_conversations(rendered: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int,
                          padding_side: str = "right") -> tuple[Tensor, Tensor, Tensor]:
    """[(ids, labels)] -> input_ids (B, L), labels (B, L), attention_mask (B, L), padded."""
    if not rendered:
        raise UserError("no conversations to collate")
    L = max(len(i) for i, _ in rendered)
    B = len(rendered)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    for b, (i, lab) in enumerate(rendered):
        n = len(i)
        sl = slice(0, n) if padding_side == "right" else slice(L - n, L)
        input_ids[b, sl] = torch.as_tensor(list(i), dtype=torch.long)
        labels[b, sl] = torch.as_tensor(list(lab), dtype=torch.long)
        mask[b, sl] = 1
    return input_ids, labels, mask


def pack_token_sets(sets: Sequence[Tensor], token_dim: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """[tokens (K_i, T)] -> tokens (N, K_max, T) zero-padded, token_mask (N, K_max)."""
    if not sets:
        T = token_dim or 1
        return torch.zeros(0, 1, T), torch.zeros(0, 1, dtype=torch.bool)
    K = max(max(int(s.shape[0]) for s in sets), 1)
    T = int(sets[0].shape[-1])
    out = sets[0].new_zeros(len(sets), K, T)
    mask = torch.zeros(len(sets), K, dtype=torch.bool, device=sets[0].device)
    for i, s in enumerate(sets):
        out[i, : s.shape[0]] = s
        mask[i, : s.shape[0]] = True
    return out, mask


def world_texts(files: Iterable[Union[str, Path]]) -> Iterable[str]:
    """Every text of SPEC-format JSON lists: captions, phrases, instructions, referring
    expressions, conversation turns."""
    from ...data.formats import read_json_list
    for f in files:
        data = read_json_list(f)
        for e in data:
            if not isinstance(e, dict):
                continue
            for key in ("caption", "instruction", "expression"):
                if isinstance(e.get(key), str):
                    yield e[key]
            for p in e.get("phrases") or []:
                if isinstance(p, str):
                    yield p
            for t in e.get("conversations") or []:
                if isinstance(t, dict) and isinstance(t.get("value"), str):
                    yield t["value"].replace(IMAGE_TOKEN, " ")


def build_word_tokenizer(files: Iterable[Union[str, Path]] = (), extra_texts: Iterable[str] = ()):
    """A word-level `PreTrainedTokenizerFast` over the words of `files` (SPEC JSON lists),
    `extra_texts`, the Vicuna template and TASK_PROMPTS. Words are split at spaces and
    punctuation; a word keeps a leading "▁" (SentencePiece style), so decoding gives the
    text back with its spacing (runs of whitespace become one space)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"),
                                                 pre_tokenizers.Punctuation()])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    template = [VICUNA_SYSTEM, "USER: x ASSISTANT:"] + [re.sub(r"\{\w+\}", " ", p.replace(IMAGE_TOKEN, " "))
                                                         for p in TASK_PROMPTS.values()]

    def texts():
        yield from template
        yield from extra_texts
        yield from world_texts(files)

    tok.train_from_iterator(texts(), trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>", "<pad>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
