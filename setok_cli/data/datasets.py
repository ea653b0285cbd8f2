"""torch Datasets for the SPEC section 4 formats, a collator, and a resumable sampler.

Paths inside a JSON file are relative to that file. Every record is checked when the
file is read, so a bad record is one clear `UserError` naming the file, the record and
the key, before any training starts.

    PairsDataset   {"image", "caption", "phrases"?: [str], "instances"?: png}
    ObjectsDataset {"image", "instances": png}   (0 = background, 1..n objects)

An item is a dict: pixel_values (3, S, S) float in [0, 1], instances (S, S) int64
(when the record has them), caption (str), phrases (list[str]), index (int).

`SeededSampler` is the only source of data order: a permutation drawn from
(seed, epoch), sharded across processes, that can start mid-epoch. Its state (epoch,
position) goes into every checkpoint, so a resumed run reads the same batches as an
uninterrupted one.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from ..errors import UserError
from ..files import load_ids

__all__ = ["load_records", "PairsDataset", "ObjectsDataset", "collate", "SeededSampler", "build_dataset",
           "FORMATS"]

FORMATS = {"pairs": ("image", "caption"), "objects": ("image", "instances")}


def load_records(json_path: str | Path, fmt: str) -> tuple[list[dict], Path]:
    """Read and validate a SPEC-format JSON list -> (records with absolute paths, folder)."""
    path = Path(json_path)
    if fmt not in FORMATS:
        raise UserError(f"unknown data format {fmt!r}; choose from {sorted(FORMATS)}")
    if not path.is_file():
        raise UserError(f"data file {path} does not exist")
    try:
        records = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"data file {path} is not valid JSON: {e}") from None
    if not isinstance(records, list) or not records:
        raise UserError(f"data file {path} must hold a non-empty JSON list of {fmt} records")
    root = path.parent
    out = []
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise UserError(f"{path}: record {i} is not an object")
        for key in FORMATS[fmt]:
            if key not in r:
                raise UserError(f"{path}: record {i} has no {key!r} (a {fmt} record needs {list(FORMATS[fmt])})")
        r = dict(r)
        for key in ("image", "instances"):
            if key in r and r[key] is not None:
                r[key] = str(root / r[key])
        if "phrases" in r and not (isinstance(r["phrases"], list) and all(isinstance(p, str) for p in r["phrases"])):
            raise UserError(f"{path}: record {i}: 'phrases' must be a list of strings")
        out.append(r)
    return out, root


def _read_rgb(path: str, size: Optional[int]) -> np.ndarray:
    from PIL import Image
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8).copy()
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read image {path}: {e}") from None


class _ImageRecords(Dataset):
    fmt = "pairs"

    def __init__(self, json_path: str | Path, image_size: Optional[int] = None, cache: bool = False):
        self.records, self.root = load_records(json_path, self.fmt)
        self.image_size = image_size
        self.cache = {} if cache else None
        self.index_offset = 0  # added to `index`: unique keys across concatenated data sets

    def __len__(self) -> int:
        return len(self.records)

    def _arrays(self, i: int) -> tuple[np.ndarray, Optional[np.ndarray]]:
        if self.cache is not None and i in self.cache:
            return self.cache[i]
        r = self.records[i]
        img = _read_rgb(r["image"], self.image_size)
        ids = load_ids(r["instances"], img.shape[0] if self.image_size else None) if r.get("instances") else None
        if ids is not None and ids.shape != img.shape[:2]:
            raise UserError(f"instance mask {r['instances']} is {ids.shape} but its image is {img.shape[:2]}")
        if self.cache is not None:
            self.cache[i] = (img, ids)
        return img, ids

    def __getitem__(self, i: int) -> dict:
        img, ids = self._arrays(i)
        r = self.records[i]
        item = {"pixel_values": torch.from_numpy(img).permute(2, 0, 1).float() / 255.0, "index": self.index_offset + i,
                "caption": r.get("caption", ""), "phrases": list(r.get("phrases", []))}
        if ids is not None:
            item["instances"] = torch.from_numpy(ids)
        return item


class PairsDataset(_ImageRecords):
    fmt = "pairs"


class ObjectsDataset(_ImageRecords):
    fmt = "objects"


def build_dataset(json_path: str | Path, fmt: str = "pairs", image_size: Optional[int] = None,
                  cache: bool = False) -> Dataset:
    cls = {"pairs": PairsDataset, "objects": ObjectsDataset}.get(fmt)
    if cls is None:
        raise UserError(f"unknown data format {fmt!r}; choose from {sorted(FORMATS)}")
    return cls(json_path, image_size, cache)


def collate(items: Sequence[dict]) -> dict:
    """Stack tensors; keep texts as lists. `instances` (-1 where an item has none) and
    `has_instances` when any item has instance masks."""
    out = {"pixel_values": torch.stack([it["pixel_values"] for it in items]),
           "index": torch.tensor([it["index"] for it in items]),
           "caption": [it["caption"] for it in items],
           "phrases": [it["phrases"] for it in items]}
    has = [("instances" in it) for it in items]
    if any(has):
        # mixed sources (captions only + instance masks): missing masks are -1 and
        # `has_instances` says which images the mask losses may use
        H, W = items[0]["pixel_values"].shape[-2:]
        out["instances"] = torch.stack([it["instances"] if h else torch.full((H, W), -1, dtype=torch.long)
                                        for it, h in zip(items, has)])
        out["has_instances"] = torch.tensor(has)
    return out


class SeededSampler(Sampler[int]):
    """A permutation of range(n) drawn from (seed, epoch), this process's shard of it,
    starting at `position` within the shard. Every process sees the same number of
    samples (the permutation is cut to a multiple of world_size)."""

    def __init__(self, n: int, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        if n < world_size:
            raise UserError(f"the data set has {n} samples, fewer than the {world_size} processes")
        self.n, self.seed, self.rank, self.world_size, self.shuffle = n, seed, rank, world_size, shuffle
        self.epoch = 0
        self.position = 0

    def shard(self, epoch: int) -> Tensor:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.n, generator=g)
        else:
            perm = torch.arange(self.n)
        usable = self.n - self.n % self.world_size
        return perm[:usable][self.rank::self.world_size]

    def __len__(self) -> int:
        return self.n // self.world_size - self.position

    def __iter__(self) -> Iterator[int]:
        return iter(self.shard(self.epoch)[self.position:].tolist())

    def set_position(self, epoch: int, position: int) -> None:
        self.epoch, self.position = int(epoch), int(position)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "n": self.n,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if state.get("n", self.n) != self.n:
            raise UserError(f"the checkpoint was trained on {state['n']} samples but the data now has {self.n}")
        self.set_position(state["epoch"], state["position"])
