"""Training recipes: a strict YAML schema made of dataclasses.

    recipe = load_recipe("recipes/tiny/stage1.yaml", overrides=["optim.lr=3e-4", "train.max_steps=10"])

Every key is checked against the schema: an unknown key is a `UserError` that names the
key (with its full path) and the closest valid key. Values are coerced to the field's
type (YAML reads `1e-3` as a string; a float field takes it). `--set a.b=c` overrides go
through the same checks. A section whose type is `Optional[<dataclass>]` is switched off
with `null` (e.g. `model.mask_decoder: null`).

The model sections reuse the models' own config dataclasses (DetokenizerConfig,
MaskDecoderConfig, AlignmentConfig), so a recipe cannot drift from the code. The
tokenizer's keys are those of `SeTokConfig` (checked when it is importable).
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from ..errors import UserError
from ..files import atomic_write_text
from ..models.alignment import AlignmentConfig
from ..models.detokenizer import DetokenizerConfig
from ..models.mask_decoder import MaskDecoderConfig
from ..models.setokim.config import LoraSpec, SetokimConfig

__all__ = ["Recipe", "ModelRecipe", "TextFirstRecipe", "TokenizerRecipe", "LossRecipe", "DataRecipe", "OptimRecipe",
           "TrainRecipe", "load_recipe", "recipe_from_dict", "recipe_to_dict", "dump_recipe", "apply_overrides"]


@dataclass
class TokenizerRecipe:
    pretrained: Optional[str] = None     # a SeTok `save_pretrained` folder to start from
    config: dict = field(default_factory=dict)   # SeTokConfig fields (when not starting from `pretrained`)
    image_size: Optional[int] = None     # images are resized to this for the tokenizer (a multiple of the patch)


@dataclass
class TextFirstRecipe:
    """Stage III: the LM first learns these text-only rows (train/text_first.py), then stage III."""
    path: str = ""                       # a conversation file (instruct format); its images are not read
    steps: int = 600
    lr: float = 1e-3
    batch_size: int = 32


@dataclass
class ModelRecipe:
    tokenizer: TokenizerRecipe = field(default_factory=TokenizerRecipe)
    detokenizer: Optional[DetokenizerConfig] = field(default_factory=DetokenizerConfig)
    mask_decoder: Optional[MaskDecoderConfig] = field(default_factory=MaskDecoderConfig)
    alignment: Optional[AlignmentConfig] = field(default_factory=AlignmentConfig)
    setokim: Optional[SetokimConfig] = None        # stage II: the MLLM over SeTok tokens
    setokim_from: Optional[str] = None             # stage III: the stage-2 run / checkpoint / Setokim folder to tune
    stage1_from: Optional[str] = None              # stage I: start each part from this stage-1 run / checkpoint's
                                                   # weights (the recipe's architecture; e.g. to refine the
                                                   # detokenizer over a frozen tokenizer)
    lora: Optional[LoraSpec] = None                # stage III: LoRA adapters on the LM (peft)
    system_prompt: Optional[str] = None            # stage III: replaces the stage-2 Setokim's ("" for none)
    text_first: Optional[TextFirstRecipe] = None   # stage III: a text-only phase of the LM before it (LoRA, merged)


@dataclass
class LossRecipe:
    """Weights of the stage-1 loss terms (0 switches a term off)."""
    diffusion: float = 1.0     # eq. 3
    bce: float = 1.0           # eq. 4
    dice: float = 1.0          # eq. 4
    kl: float = 1.0            # eq. 4, KL(M || stopgrad(pi))
    # The KL target pi is only worth pulling the clustering towards once the mask decoder
    # has learned: the KL weight is 0 before optimizer step `kl_start`, then rises linearly
    # to `kl` over `kl_ramp` steps (0: at once). 0 / 0 is the paper's always-on term.
    kl_start: int = 0
    kl_ramp: int = 0
    # average the KL over the patches that overlap an object only (needs instance masks;
    # FG-ARI scores the foreground, and the background is where pi is least informative)
    kl_foreground: bool = False
    # which terms reach the clustering (the cluster head) through the masks M: "all" (the
    # tokens are pooled with the straight-through masks, so every term pulls on it) or "kl"
    # (the merger sees the masks as constants: only the mask-consistency term moves it)
    clustering_grad: str = "all"
    contrastive: float = 1.0   # image <-> caption InfoNCE
    phrase: float = 1.0        # token <-> phrase
    # stages II / III: attention supervision of question answers (models/setokim/attend.py;
    # 0: off), the LM layer it supervises, and whether one head ("max") or all ("mean") must look
    attend: float = 0.0
    attend_layer: int = -1
    attend_heads: str = "max"
    # stages II / III, MSE head: the weight of a written token that no token of the images its
    # row read matches (an edit's changed or added object; `changed_token_weights`), against 1
    # for the tokens it copies; the visual loss stays a weighted mean (1: every token alike)
    edit_changed: float = 1.0
    # stage III: the Setokim's own loss weights for this stage (null: the stage-2 model's
    # visual_loss_weight, place_loss_weight, stop_loss_weight); the text loss weighs 1
    visual: Optional[float] = None
    place: Optional[float] = None
    stop: Optional[float] = None


@dataclass
class DataRecipe:
    train: list = field(default_factory=list)   # SPEC-format JSON files (concatenated)
    # stages II / III: [{task: caption | generate | edit | instruct | chat | segment, path: JSON,
    # weight: 1.0}], a
    # weighted union (weight w: round(w * len) items of that file per epoch)
    mixture: list = field(default_factory=list)
    # stage II with a from-scratch LM: more SPEC files whose words the word-level text
    # tokenizer must know (the later stages' data: questions, referring expressions)
    vocab_files: list = field(default_factory=list)
    format: str = "pairs"                       # "pairs" | "objects"
    image_size: Optional[int] = None            # resize on load (None: as stored)
    batch_size: int = 16                        # per process
    num_workers: int = 0
    cache: bool = False                         # keep decoded images in memory
    cache_features: bool = False                # keep the frozen encoder's features of every image in
                                                # memory (filled during the first epoch; same results)
    shuffle: bool = True


@dataclass
class OptimRecipe:
    lr: float = 1e-3
    weight_decay: float = 1e-3
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_ratio: float = 0.1
    warmup_steps: Optional[int] = None          # overrides warmup_ratio
    schedule: str = "cosine"                    # "cosine" | "constant"
    max_grad_norm: Optional[float] = 1.0
    # [{"params": [glob, ...], "lr": .., "weight_decay": ..}]: the first group a parameter matches
    param_groups: list = field(default_factory=list)


@dataclass
class TrainRecipe:
    max_steps: int = 1000                       # optimizer steps
    grad_accum: int = 1
    mixed_precision: str = "auto"               # "auto" (bf16 where native and timed faster) | "no" | "fp16" | "bf16"
    log_every: int = 10
    checkpoint_every: int = 500
    keep_last: int = 2
    trainable: list = field(default_factory=lambda: ["*"])   # globs over parameter names
    frozen: list = field(default_factory=list)               # globs removed from `trainable`
    tensorboard: bool = False
    progress: bool = True
    threads: Optional[int] = None               # torch.set_num_threads on CPU
    sample_every: int = 0                       # save detokenizer samples every N steps (0: never)
    # stages II / III: the LM runs over a batch's rows in up to this many groups of similar
    # length, each cut to its longest row (the same loss and gradients; less padding computed)
    length_groups: int = 1
    # stages II / III: the prefix every row shares (BOS and the system prompt) runs once per batch (the same loss)
    shared_prefix: bool = True


@dataclass
class Recipe:
    stage: str = "stage1"
    seed: int = 0
    output_dir: str = "runs/stage1"
    model: ModelRecipe = field(default_factory=ModelRecipe)
    loss: LossRecipe = field(default_factory=LossRecipe)
    data: DataRecipe = field(default_factory=DataRecipe)
    optim: OptimRecipe = field(default_factory=OptimRecipe)
    train: TrainRecipe = field(default_factory=TrainRecipe)


# ---- strict conversion --------------------------------------------------------------------

def _did_you_mean(key: str, valid) -> str:
    m = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.0)
    return f"; did you mean {m[0]!r}?" if m else ""


def _unknown(path: str, key: str, valid) -> UserError:
    full = f"{path}.{key}" if path else key
    return UserError(f"unknown recipe key {full!r}{_did_you_mean(key, valid)} "
                     f"(valid keys{' of ' + repr(path) if path else ''}: {', '.join(sorted(valid))})")


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp, path: str) -> Any:
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise UserError(f"recipe key {path!r} cannot be null")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"recipe key {path!r} must be a mapping, got {value!r}")
        return _from_dict(tp, value, path)
    origin = typing.get_origin(tp) or tp
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
                return value.lower() in ("true", "yes", "on", "1")
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise ValueError
        if tp is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, str):
                f = float(value)
                if not f.is_integer():
                    raise ValueError
                return int(f)
            if isinstance(value, int):
                return value
            raise ValueError
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            if isinstance(value, bool):  # YAML 1.1 reads unquoted no / off / yes / on as booleans
                if path.endswith("mixed_precision") and not value:
                    return "no"
                raise UserError(f"recipe key {path!r} must be a string, got the YAML boolean {value!r}: "
                                f"quote the value")
            return str(value)
        if origin is list:
            if isinstance(value, tuple):
                value = list(value)
            if not isinstance(value, list):
                value = [value]
            return value
        if origin is dict:
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
    except (TypeError, ValueError):
        name = getattr(tp, "__name__", str(tp))
        raise UserError(f"recipe key {path!r} must be {name}, got {value!r}") from None
    return value


def _from_dict(cls, data: dict, path: str = ""):
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise _unknown(path, str(key), names)
    kwargs = {}
    for name in names:
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], f"{path}.{name}" if path else name)
    return cls(**kwargs)


def recipe_from_dict(data: dict) -> Recipe:
    if not isinstance(data, dict):
        raise UserError("a recipe must be a YAML mapping at the top level")
    recipe = _from_dict(Recipe, data)
    _check_tokenizer_keys(recipe)
    _check_values(recipe)
    return recipe


def _check_tokenizer_keys(recipe: Recipe) -> None:
    try:
        from ..models.setok import SeTokConfig
    except ImportError:
        return
    valid = [f.name for f in dataclasses.fields(SeTokConfig)]
    for key in recipe.model.tokenizer.config:
        if key not in valid:
            raise _unknown("model.tokenizer.config", key, valid)


def _check_values(r: Recipe) -> None:
    def need(cond, msg):
        if not cond:
            raise UserError(msg)
    need(r.train.max_steps >= 1, f"train.max_steps must be >= 1, got {r.train.max_steps}")
    need(r.train.grad_accum >= 1, f"train.grad_accum must be >= 1, got {r.train.grad_accum}")
    need(r.train.keep_last >= 1, f"train.keep_last must be >= 1, got {r.train.keep_last}")
    need(r.train.log_every >= 1, f"train.log_every must be >= 1, got {r.train.log_every}")
    need(r.train.mixed_precision in ("auto", "no", "fp16", "bf16"),
         f"train.mixed_precision must be 'auto', 'no', 'fp16' or 'bf16', got {r.train.mixed_precision!r}")
    need(r.optim.schedule in ("cosine", "constant"),
         f"optim.schedule must be 'cosine' or 'constant', got {r.optim.schedule!r}")
    need(0 <= r.optim.warmup_ratio < 1, f"optim.warmup_ratio must be in [0, 1), got {r.optim.warmup_ratio}")
    need(r.data.batch_size >= 1, f"data.batch_size must be >= 1, got {r.data.batch_size}")
    need(len(r.optim.betas) == 2, f"optim.betas must be two numbers, got {r.optim.betas}")
    for i, g in enumerate(r.optim.param_groups):
        need(isinstance(g, dict) and "params" in g, f"optim.param_groups[{i}] must be a mapping with 'params'")
        for k in g:
            if k not in ("params", "lr", "weight_decay"):
                raise _unknown(f"optim.param_groups[{i}]", k, ["params", "lr", "weight_decay"])
    r.data.train = [str(p) for p in r.data.train]


def recipe_to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


def dump_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write the resolved recipe (every default filled in) as YAML, atomically."""
    atomic_write_text(path, yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False, default_flow_style=None))


# ---- overrides -------------------------------------------------------------------------------

def _schema_at(path: list[str]):
    """Walk the schema along `path`; returns the type at its end (None: free-form below)."""
    tp: Any = Recipe
    for i, key in enumerate(path):
        base, _ = _unwrap_optional(tp)
        if dataclasses.is_dataclass(base):
            names = [f.name for f in dataclasses.fields(base)]
            if key not in names:
                raise _unknown(".".join(path[:i]), key, names)
            tp = _hints(base)[key]
        elif (typing.get_origin(base) or base) is dict:
            return None      # free-form mapping (e.g. UNet keyword overrides)
        else:
            raise UserError(f"recipe key {'.'.join(path[:i])!r} is a value, not a section: cannot set "
                            f"{'.'.join(path)!r}")
    return tp


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b=c` overrides to a raw recipe mapping (values parsed as YAML)."""
    data = dict(data or {})
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise UserError(f"--set expects key=value, got {item!r}")
        _schema_at(parts)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = data
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {} if node.get(p) is None else node[p]
                if not isinstance(node[p], dict):
                    raise UserError(f"cannot set {key!r}: {p!r} is not a section")
            node[p] = dict(node[p])
            node = node[p]
        node[parts[-1]] = value
    return data


def load_recipe(path: str | Path, overrides: Optional[list[str]] = None) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"recipe {path} is not valid YAML: {e}") from None
    data = apply_overrides(data, list(overrides or []))
    recipe = recipe_from_dict(data)
    # data paths are taken from the working directory; failing that, from the recipe's folder
    recipe.data.train = [str(path.parent / p) if not Path(p).is_absolute() and not Path(p).exists()
                         and (path.parent / p).exists() else p for p in recipe.data.train]
    return recipe
