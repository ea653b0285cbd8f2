"""Setokim's configuration: the LM, the stage-1 parts it reads and writes with, the heads."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from ...errors import UserError
from .text import IMAGE_PLACEMENTS, VICUNA_SYSTEM

__all__ = ["SetokimConfig", "DiffusionHeadConfig", "CodebookHeadConfig", "LoraSpec", "LM_PRESETS", "VISUAL_HEADS",
           "TOKEN_ORDERS",
           "LLAMA_LINEARS"]

VISUAL_HEADS = ("mse", "diffusion", "codebook")
TOKEN_ORDERS = ("raster", "given")

# Llama-family shapes for sizing a model whose folder is not on disk (`setok train --dry-run`
# of the paper recipe); matched by the start of the folder's / hub id's last name, lower case.
LM_PRESETS: dict[str, dict] = {
    "vicuna-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
                      rms_norm_eps=1e-5, tie_word_embeddings=False),
    "vicuna-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                       num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, tie_word_embeddings=False),
}


@dataclass
class DiffusionHeadConfig:
    """MAR's per-token diffusion loss (Li et al. 2024, the authors' released code): a small
    MLP denoiser with AdaLN conditioned on the LM's hidden state, trained on the noised
    target token and sampled with a few DDIM steps."""
    width: int = 256
    depth: int = 3                    # residual AdaLN blocks
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"   # MAR's cosine schedule
    # what the denoiser predicts: "v_prediction" | "sample" (x0) | "epsilon" (MAR). Under the
    # cosine schedule abar(999) = 2.4e-9, so an epsilon model's x0 = (x - sqrt(1-abar) eps) /
    # sqrt(abar) multiplies its error by 2e4 on a step from pure noise: on a toy conditional
    # set (8 classes, 16-d, 1500 steps) epsilon sampled from t = 999 missed by RMS 1290,
    # v_prediction by 0.067 and sample by 0.051 (8 DDIM steps; data spread 0.1)
    prediction_type: str = "v_prediction"
    sample_steps: int = 8             # DDIM steps when sampling
    # DDIM timesteps: None = "trailing" (the first step from pure noise, t = 999) for v / x0,
    # "leading" for epsilon (starts at t = 1000 - 1000 / steps, off the singular end: RMS 0.073
    # on the toy set above)
    timestep_spacing: Optional[str] = None
    batch_mul: int = 4                # MAR's diffusion_batch_mul: noise draws per target token
    temperature: float = 1.0          # scale of the initial noise when sampling (0: deterministic)

    def __post_init__(self):
        if self.prediction_type not in ("epsilon", "sample", "v_prediction"):
            raise UserError(f"diffusion.prediction_type must be 'epsilon', 'sample' or 'v_prediction', "
                            f"got {self.prediction_type!r}")
        for name in ("width", "depth", "num_train_timesteps", "sample_steps", "batch_mul"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                raise UserError(f"diffusion.{name} must be an integer >= 1, got {v!r}")
        if self.timestep_spacing not in (None, "trailing", "leading", "linspace"):
            raise UserError(f"diffusion.timestep_spacing must be trailing, leading or linspace, "
                            f"got {self.timestep_spacing!r}")
        if not self.temperature >= 0:
            raise UserError(f"diffusion.temperature must be >= 0, got {self.temperature!r}")


@dataclass
class CodebookHeadConfig:
    """A classifier over a codebook of real tokens (not in the paper): k-means centres of the
    standardised tokens of the training images, fitted once before stage II. The head predicts
    which centre comes next (cross-entropy) and sampling draws one, so a token the caption leaves
    open (where, how large) is one real mode instead of the mean of all of them."""
    # k-means centres; 0: every distinct token of the fitted images is a code (with `keyed`; the
    # saved config then records their count)
    codes: int = 512
    # logits <q(h), k(code)> from the code's own features (a retrieval head: codes that look
    # alike score alike, so a code need not be seen in training to be drawn) instead of a
    # Linear with one independent row per code
    keyed: bool = False
    width: Optional[int] = None       # the classifier MLP's width; None: the LM's hidden size
    temperature: float = 1.0          # sampling temperature over the codes (0: the most likely code)
    fit_images: int = 2048            # training images whose tokens the k-means sees (at most)
    fit_seed: int = 0
    # a residual MLP (hidden, code) -> offset from the code's centre, trained with MSE beside the
    # cross-entropy: the drawn code picks the mode, the offset regresses the token within it
    refine: bool = False
    refine_weight: float = 1.0

    def __post_init__(self):
        for name, low in (("codes", 0), ("fit_images", 1)):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= low):
                raise UserError(f"codebook.{name} must be an integer >= {low}, got {v!r}")
        if self.codes == 0 and not self.keyed:
            raise UserError("codebook.codes: 0 (every token a code) needs codebook.keyed: true")
        if self.width is not None and not (isinstance(self.width, int) and self.width >= 1):
            raise UserError(f"codebook.width must be an integer >= 1 or null, got {self.width!r}")
        for name in ("temperature", "refine_weight"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0):
                raise UserError(f"codebook.{name} must be a number >= 0, got {v!r}")


LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraSpec:
    """LoRA on the LM (stage III, `peft`): W + (alpha / r) B A on `target_modules` (names of
    the LM's linear layers; every linear of a Llama block by default, as LLaVA-1.5's
    `--lora_enable`). The paper names no rank; LLaVA-1.5 uses r 128, alpha 256.

    modules_to_save: LM modules trained in full beside the adapters (peft's option of that
    name), e.g. `[embed_tokens, lm_head]` where stage III's text uses words whose rows stage II
    never trained (a word-level tokenizer learnt from scratch: "yes", "no" and the question
    words only occur in stage III). A pretrained LM (Vicuna) knows its words and needs none."""
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list = field(default_factory=lambda: list(LLAMA_LINEARS))
    modules_to_save: list = field(default_factory=list)

    def __post_init__(self):
        for name in ("r", "alpha"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                raise UserError(f"lora.{name} must be an integer >= 1, got {v!r}")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise UserError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise UserError(f"lora.target_modules must list module names, got {self.target_modules!r}")
        if not isinstance(self.modules_to_save, (list, tuple)) or not all(
                isinstance(t, str) and t for t in self.modules_to_save):
            raise UserError(f"lora.modules_to_save must list module names, got {self.modules_to_save!r}")
        self.modules_to_save = list(self.modules_to_save)

    def peft_config(self):
        from peft import LoraConfig
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=float(self.dropout),
                          target_modules=list(self.target_modules), bias="none", task_type="CAUSAL_LM",
                          modules_to_save=list(self.modules_to_save) or None)


@dataclass
class SetokimConfig:
    # the causal LM: a local folder or a model id in the local HF cache (any Llama-family
    # AutoModelForCausalLM, e.g. Vicuna-7B-v1.5), or an inline LlamaConfig dict for a model
    # trained from scratch (vocab_size is then the text tokenizer's)
    lm: Union[str, dict] = field(default_factory=dict)
    lm_dtype: Optional[str] = None          # "bfloat16" | "float16" | "float32"; None: as saved
    # the text tokenizer's folder; None: the LM folder's own
    text_tokenizer: Optional[str] = None
    # the stage-1 checkpoint (or run folder: its latest checkpoint) whose SeTok tokenizes
    # the images and whose detokenizer / mask decoder decode them
    stage1: Optional[str] = None
    freeze_tokenizer: bool = True
    token_dim: Optional[int] = None         # T; taken from the SeTok (checked against it when set)
    # "mse" (the paper) | "diffusion" (the authors' code) | "codebook" (a classifier over k-means codes)
    visual_head: str = "mse"
    mse_hidden: Optional[int] = None        # width of the MSE head's MLP; None: the LM's hidden size
    diffusion: DiffusionHeadConfig = field(default_factory=DiffusionHeadConfig)
    codebook: CodebookHeadConfig = field(default_factory=CodebookHeadConfig)
    # a pointer from the tokens being written to the tokens of the images read (heads.CopyHead):
    # an edit copies what it leaves alone. Not in the paper; 0 = none, else the pointer's width (MSE head)
    copy_head: int = 0
    # with a copy head: weight of the visual head's own MSE on every written token, beside the
    # mixed token's (so the LM still regresses what the pointer copies); 0 = the mixed loss only
    copy_head_own_loss: float = 0.0
    token_order: str = "raster"             # see the package docstring
    # choose where each written token's seed lies before regressing it (place.PlaceHead; not in the
    # paper): 0 = no, else the tokenizer's patch cells (h * w of its grid; 256 at tiny scale)
    place_head: int = 0
    place_loss_weight: float = 1.0
    # with a place head: every visual token the LM reads (input images, and the written tokens fed
    # back) also carries its seed cell's embedding, so the LM sees where objects lie (an edit can
    # keep its source's places, a question can ask what is left of what)
    place_input: bool = False
    # in training, this share of the images is read and conditioned on at the "unknown place"
    # (their place loss still counts): the mode edits are written in (`generate(place="auto")`)
    place_dropout: float = 0.0
    # the projector reads the standardised tokens whitened (ZCA fitted with the token statistics;
    # not in the paper), so directions of little variance enter as strongly as the rest
    projector_whiten: bool = False
    # where a user turn's input images sit: "before_text" (LLaVA: "<image>\n{question}") or
    # "after_text" (the question first, so the image's tokens can attend to it); text.place_images
    image_placement: str = "before_text"
    # the system prompt that opens every conversation (Vicuna v1's; "" for none, as LLaVA's "plain"
    # template). Training and every pipeline render through it alike; a stage III may replace it
    # (`model.system_prompt`)
    system_prompt: str = VICUNA_SYSTEM
    max_visual_tokens: int = 64             # tokens per generated image at most
    max_length: int = 2048                  # spliced sequence length at most (longer ones are cut)
    visual_loss_weight: float = 1.0
    stop_loss_weight: float = 1.0
    init_seed: int = 0                      # projector, heads and a from-scratch LM start from this seed
    lora: Optional[LoraSpec] = None         # stage III: LoRA adapters on the LM (its base weights frozen)
    # answers first write the tokens their question is about (a `look: true` mixture row trained
    # it; look.py): `setok ask` lets them, one token per image, each read at its drawn place
    look_answers: bool = False
    # a generation answer says its number of objects before the image ("two objects <image>"; a
    # `sized: true` generate row trained it; sized.py): the image then has that many tokens plus one
    sized_images: bool = False

    def __post_init__(self):
        if not isinstance(self.lm, (str, dict)) or (isinstance(self.lm, str) and not self.lm.strip()):
            raise UserError(f"lm must be a model folder / id or a LlamaConfig dict, got {self.lm!r}")
        if self.lm_dtype not in (None, "bfloat16", "float16", "float32"):
            raise UserError(f"lm_dtype must be bfloat16, float16 or float32, got {self.lm_dtype!r}")
        if self.visual_head not in VISUAL_HEADS:
            raise UserError(f"visual_head must be one of {', '.join(VISUAL_HEADS)}, got {self.visual_head!r}")
        if self.token_order not in TOKEN_ORDERS:
            raise UserError(f"token_order must be one of {', '.join(TOKEN_ORDERS)}, got {self.token_order!r}")
        if self.image_placement not in IMAGE_PLACEMENTS:
            raise UserError(f"image_placement must be one of {', '.join(IMAGE_PLACEMENTS)}, "
                            f"got {self.image_placement!r}")
        if not isinstance(self.system_prompt, str):
            raise UserError(f"system_prompt must be a string (\"\" for none), got {self.system_prompt!r}")
        if isinstance(self.diffusion, dict):
            self.diffusion = DiffusionHeadConfig(**self.diffusion)
        if isinstance(self.codebook, dict):
            self.codebook = CodebookHeadConfig(**self.codebook)
        if isinstance(self.lora, dict):
            self.lora = LoraSpec(**self.lora)
        for name in ("max_visual_tokens", "max_length"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                raise UserError(f"{name} must be an integer >= 1, got {v!r}")
        if not (isinstance(self.copy_head, int) and not isinstance(self.copy_head, bool) and self.copy_head >= 0):
            raise UserError(f"copy_head must be 0 (none) or the pointer's width (an integer >= 1), "
                            f"got {self.copy_head!r}")
        if not (isinstance(self.copy_head_own_loss, (int, float)) and self.copy_head_own_loss >= 0):
            raise UserError(f"copy_head_own_loss must be a number >= 0, got {self.copy_head_own_loss!r}")
        if not (isinstance(self.place_head, int) and not isinstance(self.place_head, bool) and self.place_head >= 0):
            raise UserError(f"place_head must be 0 (none) or the tokenizer's patch cells (an integer), "
                            f"got {self.place_head!r}")
        if not (isinstance(self.place_dropout, (int, float)) and 0 <= self.place_dropout <= 1):
            raise UserError(f"place_dropout must be in [0, 1], got {self.place_dropout!r}")
        if self.place_input and not self.place_head:
            raise UserError("place_input needs a place head (place_head: the tokenizer's patch cells)")
        if self.place_head and self.token_order != "raster":
            raise UserError("place_head needs token_order: raster (a token's place is drawn after the previous one's)")
        if self.copy_head and self.visual_head != "mse":
            raise UserError("copy_head works with visual_head: mse (it mixes the regressed token with the copied one)")
        if self.token_dim is not None and not (isinstance(self.token_dim, int) and self.token_dim >= 1):
            raise UserError(f"token_dim must be a positive integer, got {self.token_dim!r}")
