"""Training: recipes (strict YAML schema), the accelerate-based loop, atomic checkpoints,
and the stages (stage 1: tokenizer pretraining).

    from setok_cli.train import load_recipe, run
    run(load_recipe("recipes/tiny/stage1.yaml", ["train.max_steps=100"]))
"""
from .checkpoint import latest_checkpoint, list_checkpoints
from .recipe import Recipe, dump_recipe, load_recipe, recipe_from_dict
from .trainer import Trainer, TrainResult, run

__all__ = ["Recipe", "load_recipe", "recipe_from_dict", "dump_recipe", "Trainer", "TrainResult", "run",
           "latest_checkpoint", "list_checkpoints"]
