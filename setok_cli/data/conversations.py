"""Setokim's training data (stages II and III): SPEC files as LLaVA conversations with images.

    ConversationDataset("data/shapes/train/pairs.json", task="caption", image_size=64)
    MixtureDataset([(caption_set, 1.0), (generate_set, 1.0), (edit_set, 0.5)], seed=0)
    collate_conversations_batch(items) -> {"index", "conversations", "pixel_values", "image_keys", "image_counts"}

Tasks, one conversation per entry (the prompts are `TASK_PROMPTS`, shared with the
inference pipelines so that training and inference ask the same way):

    caption   pairs     USER: <image>\\nDescribe the image briefly.  ASSISTANT: {caption}
    generate  pairs     USER: Generate an image: {caption}           ASSISTANT: <image>
    generate_uncond     USER: Generate an image:                     ASSISTANT: <image>   (no caption: the
              pairs     unconditional side of classifier-free guidance)
    edit      edits     USER: <image>\\n{instruction}                 ASSISTANT: <image>   (source, then target)
    edit_diff edits     USER: <image>\\n{instruction} Segment the object.   ASSISTANT: Make <image> to <image>
                        (the changed object's old and new token, a new place first in words:
                        "Move <image> to 5 3 <image>"; models/setokim/edit_diff.py)
    instruct  instruct  the entry's own `conversations`, its image at the `<image>` mark
    chat      instruct  the entries of one image as one multi-turn conversation (the image
                        in the first turn, then each entry's turns in file order)
    segment   referring USER: <image>\nSegment {expression}.           ASSISTANT: <image>   (one token:
                        the source's token whose decoded mask fits the referred mask best,
                        chosen by the stage model; the item carries the mask)

An item's images are in reading order: an `<image>` in a user turn is an input, one in an
assistant turn an output the model must write (its tokens are the visual targets).
Images are read at `image_size` and keyed by (path, size), so the frozen tokenizer's tokens
can be cached per image across tasks (the caption and generate tasks share images).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch.utils.data import Dataset

from ..errors import UserError
from ..models.setokim.text import IMAGE_TOKEN, TASK_PROMPTS, UNCOND_GENERATE
from .datasets import _read_rgb
from .formats import load

__all__ = ["CONVERSATION_TASKS", "ConversationDataset", "MixtureDataset", "collate_conversations_batch", "image_key",
           "read_mask", "recipe_mixture", "task_conversation"]

# task -> the SPEC kind of the file it reads
CONVERSATION_TASKS = {"caption": "pairs", "generate": "pairs", "generate_uncond": "pairs", "edit": "edits",
                      "edit_diff": "edits", "instruct": "instruct", "chat": "instruct", "segment": "referring"}


def task_conversation(task: str, entry: dict) -> tuple[list[dict], list[str]]:
    """One SPEC entry -> (LLaVA conversations, image paths in reading order)."""
    if task == "caption":
        return ([{"from": "human", "value": TASK_PROMPTS["caption"]}, {"from": "gpt", "value": entry["caption"]}],
                [entry["image"]])
    if task == "generate":
        return ([{"from": "human", "value": TASK_PROMPTS["generate"].format(caption=entry["caption"])},
                 {"from": "gpt", "value": IMAGE_TOKEN}], [entry["image"]])
    if task == "generate_uncond":
        return [{"from": "human", "value": UNCOND_GENERATE}, {"from": "gpt", "value": IMAGE_TOKEN}], [entry["image"]]
    if task == "edit":
        return ([{"from": "human", "value": TASK_PROMPTS["edit"].format(instruction=entry["instruction"])},
                 {"from": "gpt", "value": IMAGE_TOKEN}], [entry["source"], entry["target"]])
    if task == "edit_diff":
        from ..models.setokim.edit_diff import diff_conversation
        return diff_conversation(entry)
    if task == "segment":
        return ([{"from": "human", "value": TASK_PROMPTS["segment"].format(expression=entry["expression"])},
                 {"from": "gpt", "value": IMAGE_TOKEN}], [entry["image"]])
    if task == "instruct":
        conv = entry["conversations"]
        marks = sum(str(t.get("value", "")).count(IMAGE_TOKEN) for t in conv if t.get("from") in ("human", "user"))
        if marks != 1:
            raise UserError(f"instruct entry {entry.get('id', '?')}: {marks} '<image>' marks, expected 1")
        return list(conv), [entry["image"]]
    raise UserError(f"unknown conversation task {task!r}; choose from {', '.join(CONVERSATION_TASKS)}")


def group_by_image(entries: Sequence[dict], turns: Optional[int] = None) -> list[list[dict]]:
    """Instruct entries -> groups of the entries of one image, in order of first appearance;
    with `turns`, each image's entries cut in file order into groups of at most `turns`."""
    groups: dict[str, list[dict]] = {}
    for e in entries:
        groups.setdefault(e["image"], []).append(e)
    if turns is None:
        return list(groups.values())
    return [g[i:i + turns] for g in groups.values() for i in range(0, len(g), turns)]


def chat_conversation(group: Sequence[dict]) -> tuple[list[dict], list[str]]:
    """Entries of one image -> one multi-turn conversation (the `<image>` mark only in the
    first user turn) and its image."""
    conv: list[dict] = []
    for e in group:
        turns, _ = task_conversation("instruct", e)
        for t in turns:
            v = str(t["value"])
            if t["from"] in ("human", "user"):
                v = v.replace(IMAGE_TOKEN, "").strip() if conv else v
            conv.append({"from": t["from"], "value": v})
    return conv, [group[0]["image"]]


def read_mask(path: str, shape):
    """A 0/255 mask PNG -> (H, W) bool at `shape` (nearest)."""
    import numpy as np
    from PIL import Image
    with Image.open(path) as im:
        im = im.convert("L")
        H, W = int(shape[0]), int(shape[1])
        if im.size != (W, H):
            im = im.resize((W, H), Image.Resampling.NEAREST)
        return np.asarray(im) > 127


def world_files(image) -> tuple[Path, Path]:
    """A world image's path -> (its scene JSON, its instance-map PNG), where the world writes them
    (`<split>/scenes/<stem>.json`, `<split>/instances/<name>`); they may not exist."""
    img = Path(image)
    return img.parent.parent / "scenes" / f"{img.stem}.json", img.parent.parent / "instances" / img.name


def question_objects(conv: Sequence[dict], image: str) -> Optional[dict]:
    """A question conversation about a world image -> {"instances": the image's instance-map
    PNG, "turns": per answer turn the instance ids (object index + 1) its question is about
    (`shapes_text.referred_objects`; [] for none)}, read from the scene the world writes beside
    the image (`scenes/`, `instances/`); None where there is none."""
    import json

    from .shapes_text import referred_objects
    scene, inst = world_files(image)
    if not (scene.is_file() and inst.is_file()):
        return None
    objects = json.loads(scene.read_text())["objects"]
    turns, question = [], ""
    for t in conv:
        if t["from"] in ("human", "user"):
            question = str(t["value"]).replace(IMAGE_TOKEN, " ")
        else:
            turns.append([j + 1 for j in referred_objects(question, objects)])
    return {"instances": str(inst), "turns": turns}


def image_key(path, size: Optional[int]) -> str:
    """The key an image (or a mask) is cached under in training: its resolved path and the size it is read at."""
    return f"{Path(path).resolve()}@{size}"


class ConversationDataset(Dataset):
    """One SPEC file read as one task. Items: {"index", "conversations", "pixel_values":
    [(3, S, S) float in [0, 1]], "image_keys": [str]}. `turns` (chat only): at most this many
    entries of an image per conversation (an image with more gives several conversations).
    `names` (edit_diff only): the answers write the instruction's words before each token
    (`edit_diff.diff_conversation`). `look` (instruct and chat): the answers first write the tokens
    of the objects their question is about (`models/setokim/look.py`): true for every question type,
    or a list of types (["color", "shape"]; "count_by": counts of one colour or shape only); items carry "look";
    `look_places` (with `look`): a relation's answer writes each object's place after its token
    (`look.relation_places`; "chain": and counts from the first place toward the second, `look.chained_answer`);
    `look_numbers` (with `look`): a count's answer numbers its tokens ("<image> 1 <image> 2: 2"); `look_scan`
    (with `look`): a looking count's answer goes through every token of the image, each with what it holds and the
    running count ("<image> red 1 <image> no 1: 1", `look.scan_answer`). `sized`
    (generate): the answer says the number of objects before the image, "two objects <image>"
    (`models/setokim/sized.py`)."""

    def __init__(self, path: str | Path, task: str, image_size: Optional[int] = None, turns: Optional[int] = None,
                 names: bool = False, look: bool | Sequence[str] = False, sized: bool = False,
                 look_places: bool | str = False, look_numbers: bool = False, look_scan: bool = False):
        if task not in CONVERSATION_TASKS:
            raise UserError(f"unknown conversation task {task!r}; choose from {', '.join(CONVERSATION_TASKS)}")
        if turns is not None and (task != "chat" or not isinstance(turns, int) or isinstance(turns, bool)
                                  or turns < 1):
            raise UserError(f"{path}: turns is for the chat task, an integer >= 1; got {turns!r} for {task}")
        if names is not False and (task != "edit_diff" or names is not True):
            raise UserError(f"{path}: names is for the edit_diff task, true or false; got {names!r} for {task}")
        from ..models.setokim.look import LOOK_TYPES
        if look is not False and (task not in ("instruct", "chat") or not (look is True or (
                isinstance(look, (list, tuple)) and look and set(look) <= set(LOOK_TYPES)))):
            raise UserError(f"{path}: look is for the instruct and chat tasks, true, false or a list of question "
                            f"types ({', '.join(LOOK_TYPES)}); got {look!r} for {task}")
        if look_places is not False and (look_places not in (True, "chain") or not look):
            raise UserError(f"{path}: look_places is true, false or chain and needs look; "
                            f"got {look_places!r} with look {look!r}")
        if look_numbers is not False and (look_numbers is not True or not look):
            raise UserError(f"{path}: look_numbers is true or false and needs look; "
                            f"got {look_numbers!r} with look {look!r}")
        if look_scan is not False and (look_scan is not True or not look or look_numbers):
            raise UserError(f"{path}: look_scan is true or false and needs look, without look_numbers; "
                            f"got {look_scan!r} with look {look!r}")
        if sized is not False and (task != "generate" or sized is not True):
            raise UserError(f"{path}: sized is for the generate task, true or false; got {sized!r} for {task}")
        self.path, self.task, self.image_size = str(path), task, image_size
        self.entries = load(path, CONVERSATION_TASKS[task])
        if not self.entries:
            raise UserError(f"{path}: no entries")
        self.looks: Optional[list] = None
        if look:                                                          # scenes read once, up front
            from ..models.setokim.look import look_entry
            looked = [look_entry(e, None if look is True else look, look_places, look_numbers, look_scan)
                      for e in self.entries]
            self.entries = [e for e, _ in looked]
            by_id = {id(e): lk for e, lk in looked}
        if task == "chat":
            self.entries = group_by_image(self.entries, turns)
            self.items = [chat_conversation(g) for g in self.entries]
            if look:
                from ..models.setokim.look import look_turns
                self.looks = [look_turns([by_id[id(e)] for e in g]) for g in self.entries]
        elif task == "edit_diff":                                         # scenes read once, up front
            from ..models.setokim.edit_diff import diff_conversation, diff_spec
            self.diff_specs = [diff_spec(e) for e in self.entries]
            self.items = [diff_conversation(e, sp, names) for e, sp in zip(self.entries, self.diff_specs)]
        else:
            self.items = [task_conversation(task, e) for e in self.entries]   # checked once, up front
            if sized:
                from ..models.setokim.sized import entry_objects, sized_answer
                self.items = [([c[0], {**c[1], "value": sized_answer(entry_objects(e))}], paths)
                              for (c, paths), e in zip(self.items, self.entries)]
            self.looks = [by_id[id(e)] for e in self.entries] if look else None
        self.index_offset = 0

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict:
        conv, paths = self.items[i]
        pix = [torch.from_numpy(_read_rgb(p, self.image_size)).permute(2, 0, 1).float() / 255.0 for p in paths]
        keys = [image_key(p, self.image_size) for p in paths]
        item = {"index": self.index_offset + i, "conversations": conv, "pixel_values": pix, "image_keys": keys,
                "task": self.task, "segment": None}
        if self.task == "segment":
            _, mask, key = self.segment_entry(i)
            item["segment"] = {"mask": torch.from_numpy(read_mask(mask, pix[0].shape[-2:])), "key": key}
        if self.task in ("instruct", "chat"):
            item["attend"] = question_objects(conv, paths[0])
            item["look"] = self.looks[i] if self.looks is not None else None
        if self.task == "edit_diff":
            item["edit_diff"] = self.diff_specs[i]
        return item

    def segment_entry(self, i: int) -> tuple[str, str, str]:
        """A segment item's (image path, mask path, target key): the key its region target is
        cached under (the mask's resolved path and the image size)."""
        if self.task != "segment":
            raise ValueError(f"{self.path}: a {self.task} set has no segment entries")
        e = self.entries[i]
        return self.items[i][1][0], e["mask"], image_key(e["mask"], self.image_size)


def recipe_mixture(rows, image_size: Optional[int], seed: int = 0) -> "MixtureDataset":
    """A recipe's `data.mixture`, [{task, path, weight[, turns|names|look|look_places|look_numbers|look_scan|
    sized|text_weight]}], -> the MixtureDataset over its rows, named "<task>:<file stem>" ("#<row>" appended where
    two share a name). `text_weight` (default 1) weighs the row's text cross-entropy in the loss
    (`MixtureDataset.text_weights`)."""
    parts, weights = [], []
    if not rows:
        raise UserError("data.mixture lists no data: give [{task: caption|generate|edit|instruct|chat|segment, "
                        "path, weight}]")
    keys = {"task", "path", "weight", "turns", "names", "look", "look_places", "look_numbers", "look_scan", "sized",
            "text_weight"}
    for j, m in enumerate(rows):
        if not isinstance(m, dict) or set(m) - keys or not {"task", "path"} <= set(m):
            raise UserError(f"data.mixture[{j}] must be {{task, path, weight[, turns|names|look|look_places|"
                            f"look_numbers|look_scan|sized|text_weight]}}, got {m!r}")
        if m["task"] not in CONVERSATION_TASKS:
            raise UserError(f"data.mixture[{j}].task {m['task']!r}: choose from {', '.join(CONVERSATION_TASKS)}")
        tw = m.get("text_weight", 1.0)
        if isinstance(tw, bool) or not isinstance(tw, (int, float)) or not math.isfinite(tw) or tw < 0:
            raise UserError(f"data.mixture[{j}].text_weight must be a number >= 0, got {tw!r}")
        opts = {k: m[k] for k in ("turns", "names", "look", "look_places", "look_numbers", "look_scan", "sized")
                if k in m}
        parts.append((ConversationDataset(m["path"], m["task"], image_size, **opts), m.get("weight", 1.0)))
        weights.append(float(tw))
    offset = 0
    for ds, _ in parts:
        ds.index_offset = offset
        offset += len(ds)
    names = [f"{m['task']}:{Path(m['path']).stem}" for m in rows]
    out = MixtureDataset(parts, seed=seed, names=[f"{n}#{j}" if names.count(n) > 1 else n for j, n in enumerate(names)])
    out.text_weights = weights
    return out


class MixtureDataset(Dataset):
    """The weighted union of data sets: set j contributes round(w_j * len_j) items per
    epoch (whole copies, then a seeded subset for the fraction), fixed by `seed`, so the
    trainer's seeded sampler shuffles it and resumes it exactly like any data set. Each item
    carries "source": j, its set's index in `names`."""

    def __init__(self, parts: Sequence[tuple[Dataset, float]], seed: int = 0, names: Optional[Sequence[str]] = None):
        if not parts:
            raise UserError("data.mixture is empty: list at least one {task, path, weight}")
        g = torch.Generator().manual_seed(seed)
        self.sets, owner, local = [], [], []
        for j, (ds, w) in enumerate(parts):
            if not (isinstance(w, (int, float)) and w >= 0 and math.isfinite(w)):
                raise UserError(f"data.mixture[{j}].weight must be a number >= 0, got {w!r}")
            n = len(ds)
            count = int(round(w * n))
            whole, frac = divmod(count, n)
            idx = torch.arange(n).repeat(whole)
            if frac:
                idx = torch.cat([idx, torch.randperm(n, generator=g)[:frac].sort().values])
            self.sets.append(ds)
            owner.append(torch.full((len(idx),), j, dtype=torch.long))
            local.append(idx)
        self.owner, self.local = torch.cat(owner), torch.cat(local)
        self.names = list(names) if names is not None else [f"set{j}" for j in range(len(parts))]
        self.text_weights = [1.0] * len(parts)      # each set's weight on its text loss (`recipe_mixture`)
        if len(self.owner) == 0:
            raise UserError("data.mixture: every weight is 0")

    def __len__(self) -> int:
        return len(self.owner)

    def __getitem__(self, i: int) -> dict:
        j = int(self.owner[i])
        return {**self.sets[j][int(self.local[i])], "source": j}

    @staticmethod
    def collate(items: Sequence[dict]) -> dict:
        return collate_conversations_batch(items)

    def counts(self) -> list[int]:
        """Items per epoch from each set."""
        return torch.bincount(self.owner, minlength=len(self.sets)).tolist()


def collate_conversations_batch(items: Sequence[dict]) -> dict:
    """Items -> {"index" (B,), "conversations": B lists, "pixel_values" (N, 3, S, S) every
    image of the batch in reading order, "image_keys": N, "image_counts" (B,), "task": B, "source" (B,):
    each item's set in a `MixtureDataset` (-1 outside one),
    "segment": B x (None | {"mask": (S, S) bool, "key"}), "attend": B x (None | `question_objects`),
    "edit_diff": B x (None | `edit_diff.diff_spec`), "look": B x (None | `look.look_entry`'s look)}."""
    pix = [p for it in items for p in it["pixel_values"]]
    if pix and any(p.shape != pix[0].shape for p in pix):
        raise UserError("images of one batch differ in size: set data.image_size")
    return {"index": torch.tensor([it["index"] for it in items]),
            "conversations": [it["conversations"] for it in items],
            "pixel_values": torch.stack(pix) if pix else torch.zeros(0, 3, 1, 1),
            "image_keys": [k for it in items for k in it["image_keys"]],
            "image_counts": torch.tensor([len(it["pixel_values"]) for it in items]),
            "task": [it["task"] for it in items],
            "source": torch.tensor([it.get("source", -1) for it in items]),
            "segment": [it.get("segment") for it in items],
            "attend": [it.get("attend") for it in items],
            "edit_diff": [it.get("edit_diff") for it in items],
            "look": [it.get("look") for it in items]}
