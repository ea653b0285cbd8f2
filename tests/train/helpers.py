"""Shared helpers of the training tests: a tiny SPEC-format data set and a toy stage."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from setok_cli.data.datasets import build_dataset
from setok_cli.train.recipe import recipe_from_dict

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 220), "yellow": (230, 220, 30)}


def make_pairs(root: Path, n: int = 10, size: int = 32, seed: int = 0) -> Path:
    """n images with one or two coloured squares on grey; pairs.json with captions, phrases, instances."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    records = []
    names = list(COLOURS)
    for i in range(n):
        img = np.full((size, size, 3), 128, np.uint8)
        ids = np.zeros((size, size), np.uint8)
        phrases = []
        for j in range(1 + i % 2):
            c = names[int(rng.integers(len(names)))]
            s = size // 3
            y, x = (int(rng.integers(0, size - s)), int(rng.integers(0, size - s))) if j == 0 else (0, 0)
            img[y:y + s, x:x + s] = COLOURS[c]
            ids[y:y + s, x:x + s] = j + 1
            phrases.append(f"{c} square")
        Image.fromarray(img).save(root / "images" / f"{i}.png")
        Image.fromarray(ids).save(root / "images" / f"{i}_ids.png")
        records.append({"image": f"images/{i}.png", "instances": f"images/{i}_ids.png",
                        "caption": "a picture of " + " and ".join(phrases), "phrases": phrases})
    (root / "pairs.json").write_text(json.dumps(records))
    return root / "pairs.json"


class ToyStage(nn.Module):
    """Predicts each image's mean colour through a noisy, dropout-using conv net, so that
    resume-equality also checks the RNG and the data order."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GELU(), nn.Dropout(0.2),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
        self.unused = nn.Linear(2, 2)    # exercises find_unused_parameters under DDP

    def forward(self, batch):
        x = batch["pixel_values"]
        x = x + 0.05 * torch.randn_like(x)
        pred = self.net(x)
        loss = (pred - batch["pixel_values"].mean((2, 3))).pow(2).mean()
        return {"loss": loss, "mse": loss.detach()}

    def save_parts(self, folder):
        torch.save(self.state_dict(), Path(folder) / "toy.pt")


def toy_builder(recipe, accelerator=None):
    return ToyStage(), build_dataset(recipe.data.train[0], "pairs", None, cache=True)


def toy_builder_uncached(recipe, accelerator=None):
    """As toy_builder, reading every image when it is needed (in the DataLoader's workers)."""
    return ToyStage(), build_dataset(recipe.data.train[0], "pairs", None, cache=False)


def toy_recipe(data_json: Path, out: Path, **train) -> object:
    # fp32 unless asked: `auto` may time a step both ways and pick by the clock (test_trainer)
    t = dict(max_steps=6, checkpoint_every=3, keep_last=2, log_every=1, progress=False, grad_accum=2,
             mixed_precision="no")
    t.update(train)
    return recipe_from_dict({"stage": "stage1", "seed": 3, "output_dir": str(out),
                             "data": {"train": [str(data_json)], "batch_size": 4},
                             "optim": {"lr": 1e-2, "warmup_steps": 2},
                             "train": t})


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().float() for p in model.parameters()])
