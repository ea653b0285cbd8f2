"""Setokim (paper §2.2, Fig. 2): a causal LM that reads and writes SeTok tokens.

    model = Setokim.from_config(SetokimConfig(lm="lmsys/vicuna-7b-v1.5", stage1="runs/stage1"))
    tokens, mask = model.encode_images(pixel_values)                  # frozen SeTok, generation order
    batch = model.collate([{"conversations": conv, "images": [tokens[0][mask[0]]]}])   # Vicuna v1, padded
    out = model(**batch)                                              # out.loss, .text_loss, .visual_loss, .stop_loss
    gen = model.generate(*prompt_batch(model, ["Generate an image: a red circle."], start_image=True))
    pictures = decode_images(model, gen[0].images)                    # the stage-1 detokenizer

Parts. `lm`: any Llama-family `AutoModelForCausalLM` (Vicuna-7B-v1.5 from a local folder
or the HF cache; at tiny scale a LlamaConfig trained from scratch with the word-level
tokenizer of `build_word_tokenizer`). `projector`: LLaVA-1.5's 2-layer GELU MLP, token
width T -> hidden H. `visual_head`: `mse` (the paper: regression to the tokenizer's
tokens) or `diffusion` (the authors' released code: MAR's per-token diffusion loss, an
AdaLN MLP denoiser conditioned on the hidden state, DDIM with a few steps; it predicts v
by default, see DiffusionHeadConfig.prediction_type for why not MAR's eps) or `codebook`
(not in the paper: a classifier over k-means centres of the training tokens, cross-entropy,
sampled; CodebookHeadConfig). `stop_head`:
Linear(H, 1). `setok`, `detokenizer`, `mask_decoder`: the stage-1 checkpoint's parts
(frozen; the SeTok trainable only with `freeze_tokenizer: false`). `[Img]` and `[/Img]`
are added to the text tokenizer and the LM's embeddings are resized.

Sequence. `<image>` becomes `[Img] v_1 .. v_K [/Img]` with K the image's own token count
(splice.py: cumsum/scatter, no loop over images or tokens). Images the model reads carry
no loss; for an image it writes, `[Img]` is a text target (the LM learns where an image
starts), and the hidden state at `[Img]`, v_1, .., v_{K-1} predicts the next token through
the visual head (teacher forcing: the target tokens are the inputs).

How an image ends: a stop head, not `[/Img]` through the LM head. At each visual
position (`[Img]` and v_1 .. v_K) the stop head answers "is this image complete?" with a
BCE target 0 before v_K and 1 at v_K; at inference a probability above 0.5 after at least
one token (or `max_visual_tokens`) ends the image and `[/Img]` is fed as given. It keeps the image's
length decision a binary question trained at every visual position, leaves the LM head's
vocabulary distribution to text only (`[/Img]` is never sampled), and is one small
module that stage III's LoRA leaves trainable like the other heads.

Copying (`copy_head: W`, not in the paper; 0 = off). An edit rewrites one object and
leaves the rest; regressing every kept token through the LM loses them. With a copy head,
each token being written also points at the tokens of the images its row has read
(heads.CopyHead: a softmax over them from the hidden state and the token's index) and a
gate mixes the pointed-at token with the MSE head's (pointer-generator). Rows with nothing
read (generation from text) get the head alone, as without the pointer. At inference the
pointer copies its argmax source (`generate(copy="hard")`, the default) or, as trained,
the weighted mean (`copy="soft"`).

Placing (`place_head: P`, not in the paper; 0 = off). A prompt names what to draw, not
where, and the MSE head writes the mean over the places it allows. With a place head the
hidden state first classifies the next token's seed among the tokenizer's P patch cells (and
"no seed"), the true seed in training (cross-entropy), one drawn after the previous token's
cell at inference (`generate(place_temperature=)`); the visual head then reads the hidden
state plus that cell's embedding (place.PlaceHead). With `place_input: true` every visual
token the LM reads, an input image's or a written one fed back, also carries an embedding
of its seed cell (a second table of the head), so the LM sees where objects lie: an edit can
keep its source's places and a question can ask what is left of what. Prompts then take
(tokens, seeds) pairs (`Setokim.read_sets` / `readable`).

Token order. An image's tokens are a set; the model writes them by their seed's position
in raster order (row, then column, of the patch grid), tokens without a seed (the scope
remainder) last, padding never (`token_order: raster`, heads.order_tokens). Training
targets and the prompt's input images use the same order (`encode_images`); generated
tokens are decoded as a set, so the detokenizer needs no order.

Scale. Tokens are standardised per channel (`fit_token_stats`, saved with the heads)
before the projector and both heads. `on_meta` builds the paper architecture without
memory; `parameter_table` lists (part, parameters, trainable).

Saving. `save_pretrained(folder)`: config.json + model.safetensors (projector, heads, token
statistics), lm/ (the LM's own save_pretrained, resized embeddings included), tokenizer/,
and the stage-1 parts in setok/, detokenizer/, mask_decoder/ (their own save_pretrained),
so the folder is self-contained; `from_pretrained` reads it back (a run folder stands for
its latest checkpoint). config.json keeps the `lm`, `text_tokenizer` and `stage1` it was
built from as a record; loading reads the folder's own copies.
"""
from .config import LM_PRESETS, CodebookHeadConfig, DiffusionHeadConfig, LoraSpec, SetokimConfig
from .generate import Generated, decode_images, generate, prompt_batch, sample_logits
from .heads import CodebookHead, CopyHead, DiffusionHead, MSEHead, Projector, order_tokens
from .place import PlaceHead
from .loading import load_stage1, stage1_folder, use_detokenizer
from .model import Setokim, SetokimOutput
from .report import parameter_table
from .splice import Spliced, splice
from .text import (IGNORE_INDEX, IMAGE_PLACEMENTS, IMAGE_TOKEN, IMAGE_TOKEN_INDEX, IMG_END, IMG_START, TASK_PROMPTS,
                   UNCOND_GENERATE,
                   VICUNA_SYSTEM, place_images,
                   build_word_tokenizer, collate_conversations, pack_token_sets, render_conversation,
                   tokenize_with_images, world_texts)

__all__ = ["SetokimConfig", "DiffusionHeadConfig", "CodebookHeadConfig", "LoraSpec", "LM_PRESETS", "Setokim",
           "SetokimOutput", "parameter_table", "stage1_folder", "load_stage1", "use_detokenizer", "Projector",
           "MSEHead", "DiffusionHead",
           "CodebookHead", "CopyHead", "PlaceHead", "order_tokens",
           "Spliced", "splice", "Generated", "generate", "prompt_batch", "sample_logits", "decode_images",
           "IMAGE_TOKEN",
           "IMAGE_TOKEN_INDEX", "IGNORE_INDEX", "IMG_START", "IMG_END", "VICUNA_SYSTEM", "TASK_PROMPTS",
           "UNCOND_GENERATE",
           "IMAGE_PLACEMENTS", "place_images",
           "build_word_tokenizer", "collate_conversations", "pack_token_sets", "render_conversation",
           "tokenize_with_images", "world_texts"]
