"""Setokim's tasks from the terminal: `setok caption`, `generate`, `edit` (stage II), `ask`,
`segment`, `chat` (stage III), and `setok export` (LoRA merged into a plain folder)."""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import click

from ..errors import UserError
from .setokim_options import (_bank_option, _check_bank, _detok_option, _file_options, _sampling_options,
                              _use_bank, _use_detokenizer)


def _setup(threads, temperature, top_p, max_new_tokens, visual_steps, visual_temperature, copy_mode, seed):
    import torch

    from ..tasks.setokim import Sampling
    if threads:
        torch.set_num_threads(threads)
    return Sampling(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, visual_steps=visual_steps,
                    visual_temperature=visual_temperature, copy=copy_mode, seed=seed)


def _run_file(model, task, data, pred_out, opts, batch_size, size, limit, **kw):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..tasks.setokim import count_entries, run_file
    if not pred_out:
        raise UserError("--data needs --pred-out FILE (where the predictions JSON goes)")
    total = count_entries(task, data, limit)
    err = Console(file=sys.stderr)
    with Progress(TextColumn(task), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err,
                  transient=True) as bar:
        t = bar.add_task(task, total=total)
        preds = run_file(model, task, data, pred_out, opts, batch_size, size, limit,
                         on_batch=lambda n: bar.advance(t, n), **kw)
    click.echo(f"{len(preds)} prediction(s) -> {pred_out}   (score: setok eval {task} --data {data} "
               f"--pred {pred_out})")
    drawn = [p["drawn"] for p in preds if "drawn" in p]
    if drawn:
        click.echo(f"candidates drawn per image: mean {sum(drawn) / len(drawn):.2f}, at most {opts.rerank}")


def _prepare(image, text, empty_msg, data, out_dir, model_path, sampling):
    """The shared start of the one-image commands (edit, segment, ask): inputs checked,
    sampling set, the image read and the output folder made before the model loads.
    -> (opts, image or None, model)."""
    _need_inputs([image] if image is not None else [], data, "IMAGE")
    if not data and (text is None or not text.strip()):
        raise UserError(empty_msg)
    opts = _setup(*sampling)
    from ..files import ensure_dir
    from ..images import load_image
    from ..tasks.setokim import load_setokim
    pic = None if data else load_image(image)
    if not data and out_dir is not None:
        ensure_dir(out_dir)
    return opts, pic, load_setokim(model_path)


def _need_inputs(args, data, what):
    if data and args:
        raise UserError(f"give {what} or --data, not both")
    if not data and not args:
        raise UserError(f"give {what} or --data FILE")


@click.command("caption")
@click.argument("images", nargs=-1)
@_sampling_options
@_file_options
@click.option("--rerank", default=1, show_default=True, type=click.IntRange(min=1), metavar="N", help="Write N "
              "captions (2..N sampled) and keep the one the model would draw the image from best.")
@click.option("--rerank-temperature", default=0.7, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--num-beams", type=click.IntRange(min=1), metavar="N", help="Beam search: the most likely of N "
              "beams (default: 4 when greedy; 1: one greedy or sampled caption).")
def caption_cmd(images, model_path, temperature, top_p, max_new_tokens, visual_steps, visual_temperature, copy_mode,
                seed, batch_size, threads, data, pred_out, limit, rerank, rerank_temperature, num_beams):
    """Print a caption for each IMAGE."""
    _need_inputs(images, data, "IMAGE...")
    opts = _setup(threads, temperature, top_p, max_new_tokens, visual_steps, visual_temperature, copy_mode, seed)
    opts = replace(opts, rerank=rerank, rerank_temperature=rerank_temperature, num_beams=num_beams)   # checked
    from ..images import load_image
    from ..tasks.setokim import caption, load_setokim
    pics = [load_image(p) for p in images]            # every image readable before the model loads
    model = load_setokim(model_path)
    if data:
        return _run_file(model, "caption", data, pred_out, opts, batch_size, None, limit)
    for start in range(0, len(pics), batch_size):
        for path, text in zip(images[start:start + batch_size], caption(model, pics[start:start + batch_size], opts)):
            click.echo(f"{path}: {text}")


@click.command("generate")
@click.argument("prompt", required=False)
@_sampling_options
@_file_options
@click.option("--out", "out_dir", default=".", show_default=True, metavar="DIR", help="Folder for the PNGs.")
@click.option("--num-images", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--size", type=click.IntRange(min=8), help="Output side in pixels (default: the detokenizer's).")
@click.option("--guidance", default=1.0, show_default=True, type=click.FloatRange(min=0),
              help="Classifier-free guidance scale (1: none); for a model trained with the generate_uncond "
                   "task (mse or codebook head).")
@click.option("--rerank", default=1, show_default=True, type=click.IntRange(min=1), metavar="N",
              help="Draw N candidates per image and keep the one the model reads back as the prompt best.")
@click.option("--rerank-stop", type=click.FloatRange(min=0), metavar="SCORE",
              help="With --rerank N: stop drawing an image's candidates once one reads back with a caption score "
                   "(mean cross-entropy per word) at most SCORE.")
@_bank_option
@_detok_option
def generate_cmd(prompt, model_path, temperature, top_p, max_new_tokens, visual_steps, visual_temperature, copy_mode,
                 seed, batch_size, threads, data, pred_out, limit, out_dir, num_images, size, guidance, rerank,
                 rerank_stop, bank_path, source_margin, max_overlap, snap_metric, place_mode, place_temperature,
                 detok_path):
    """Write --num-images images for PROMPT into --out."""
    _need_inputs([prompt] if prompt is not None else [], data, "PROMPT")
    if prompt is not None and not prompt.strip():
        raise UserError("empty prompt")
    _check_bank(bank_path, detok_path)
    opts = _setup(threads, temperature, top_p, max_new_tokens, visual_steps, visual_temperature, copy_mode, seed)
    if rerank_stop is not None and rerank == 1:
        raise UserError("--rerank-stop needs --rerank N with N > 1")
    opts.guidance, opts.rerank, opts.rerank_stop = guidance, rerank, rerank_stop
    from ..files import ensure_dir
    from ..tasks.setokim import generate, load_setokim, save_png
    if not data:
        ensure_dir(out_dir)
    model = load_setokim(model_path)
    if guidance != 1 and model.config.visual_head == "diffusion":
        raise UserError("--guidance works with the mse and codebook visual heads, this model has a diffusion head")
    _use_bank(opts, bank_path, model, source_margin, max_overlap, snap_metric, place_mode, place_temperature)
    _use_detokenizer(model, detok_path)
    if data:
        return _run_file(model, "generate", data, pred_out, opts, batch_size, size, limit)
    stem = "_".join(prompt.lower().split())[:40].strip("_") or "image"
    for j, im in enumerate(generate(model, [prompt], num_images, opts, size)[0]):
        path = Path(out_dir) / f"{stem}_{seed + j}.png"
        save_png(path, im)
        click.echo(str(path))


@click.command("edit")
@click.argument("image", required=False)
@click.option("--instruction", help="What to change, e.g. \"make the red circle blue\".")
@_sampling_options
@_file_options
@click.option("--out", "out_dir", default=".", show_default=True, metavar="DIR", help="Folder for the PNGs.")
@click.option("--size", type=click.IntRange(min=8), help="Output side in pixels (default: the detokenizer's).")
@_bank_option
@_detok_option
@click.option("--keep-pixels", type=click.IntRange(min=0), is_flag=False, flag_value=1, metavar="[GROW]",
              help="With --bank or --diff: paste the source's pixels back over each object the edit copied, grown "
                   "by GROW cells.")
@click.option("--diff", is_flag=True, help="Edit as a token diff: the model names the token to change and writes "
              "its new one (a model tuned with the edit_diff task); the rest of the source is kept.")
@click.option("--lookup", default="diff", show_default=True, type=click.Choice(["diff", "segment"]),
              help="With --diff: the token to change is written by the diff answer, or found by the model "
                   "segmenting the object the instruction names (\"Segment the red circle.\") first.")
def edit_cmd(image, instruction, model_path, temperature, top_p, max_new_tokens, visual_steps, visual_temperature,
             copy_mode, seed, batch_size, threads, data, pred_out, limit, out_dir, size, bank_path, source_margin,
             max_overlap, snap_metric, place_mode, place_temperature, detok_path, keep_pixels, diff, lookup):
    """Edit IMAGE as --instruction says; writes <stem>_edited.png and <stem>_edit.png (side by side)."""
    import numpy as np

    from ..tasks.setokim import edit, save_png, side_by_side
    _check_bank(bank_path, detok_path)
    if keep_pixels is not None and not (bank_path or diff):
        raise UserError("--keep-pixels needs --bank FILE or --diff (to know which source tokens the edit copies)")
    if lookup != "diff" and not diff:
        raise UserError("--lookup segment needs --diff (it finds the token a diff changes)")
    opts, src, model = _prepare(image, instruction, "empty instruction: give --instruction \"...\"", data, out_dir,
                                model_path, (threads, temperature, top_p, max_new_tokens, visual_steps,
                                             visual_temperature, copy_mode, seed))
    _use_bank(opts, bank_path, model, source_margin, max_overlap, snap_metric, place_mode, place_temperature)
    opts.keep_pixels, opts.diff, opts.lookup = keep_pixels, diff, lookup
    _use_detokenizer(model, detok_path)
    if data:
        return _run_file(model, "edit", data, pred_out, opts, batch_size, size, limit)
    out = edit(model, [src], [instruction], opts, size)[0]
    stem = Path(image).stem
    edited = Path(out_dir) / f"{stem}_edited.png"
    save_png(edited, out)
    src_arr = np.asarray(src.resize((out.shape[1], out.shape[0])))
    pair = Path(out_dir) / f"{stem}_edit.png"
    save_png(pair, side_by_side(src_arr, out))
    click.echo(f"{edited}\n{pair}")


@click.command("ask")
@click.argument("image", required=False)
@click.argument("question", required=False)
@_sampling_options
@_file_options
@click.option("--reduce", "reduce_method", metavar="METHOD",
              help="For a LLaVA-1.5 model folder: reduce its visual tokens with setok, pool2d, random, tome, "
                   "visionzip or prumerge (integrations/reducers.py).")
@click.option("--budget", type=click.IntRange(min=1), help="With --reduce: tokens per image (default: setok's "
              "and prumerge's own count).")
@click.option("--show-look", "look_dir", metavar="DIR", help="A model whose answers look first: write "
              "<stem>_look.png, the regions of the tokens its answer wrote, one colour each.")
@click.option("--snap/--no-snap", default=None,
              help="A model whose answers look first: each token it writes becomes the image's nearest token, read "
                   "at that token's own place (default: on for such a model; val VQA higher for each one measured).")
def ask_cmd(image, question, model_path, temperature, top_p, max_new_tokens, visual_steps, visual_temperature,
            copy_mode, seed, batch_size, threads, data, pred_out, limit, reduce_method, budget, look_dir, snap):
    """Answer QUESTION about IMAGE (or every question of --data, an instruct JSON). --model is
    a Setokim run, or a LLaVA-1.5 model folder (then --reduce picks a visual-token reducer)."""
    _need_inputs([image] if image is not None else [], data, "IMAGE \"QUESTION\"")
    if not data and (question is None or not question.strip()):
        raise UserError("empty question: give IMAGE \"QUESTION\"")
    from ..tasks.llava import is_llava_folder
    if is_llava_folder(model_path):
        if data:
            raise UserError("--data runs a Setokim model; for a LLaVA folder ask one IMAGE \"QUESTION\"")
        if threads:
            import torch
            torch.set_num_threads(threads)
        from ..tasks.llava import ask_llava
        click.echo(ask_llava(model_path, image, question, reduce=reduce_method, budget=budget,
                             max_new_tokens=max_new_tokens))
        return
    if reduce_method or budget:
        raise UserError("--reduce / --budget apply to a LLaVA-1.5 model folder; a Setokim reads SeTok tokens already")
    from ..tasks.setokim import ask
    opts, pic, model = _prepare(image, question, "empty question: give IMAGE \"QUESTION\"", data, None, model_path,
                                (threads, temperature, top_p, max_new_tokens, visual_steps, visual_temperature,
                                 copy_mode, seed))
    if snap and not model.config.look_answers:
        raise UserError("--snap: this model answers without looking (no look row trained it)")
    opts.look_snap = bool(model.config.look_answers) if snap is None else snap
    if data:
        return _run_file(model, "vqa", data, pred_out, opts, batch_size, None, limit)
    if look_dir is None:
        return click.echo(ask(model, [pic], [question], opts)[0])
    from ..tasks.setokim import show_look
    click.echo("%s\n%s" % show_look(model, pic, question, opts, Path(look_dir) / f"{Path(image).stem}_look.png"))


@click.command("segment")
@click.argument("image", required=False)
@click.option("--query", help="The referring expression, e.g. \"the leftmost red circle\".")
@_sampling_options
@_file_options
@click.option("--out", "out_dir", default=".", show_default=True, metavar="DIR", help="Folder for the PNGs.")
@click.option("--snap/--no-snap", default=False, show_default=True,
              help="Replace the written token by the input image's nearest token before decoding the mask.")
def segment_cmd(image, query, model_path, temperature, top_p, max_new_tokens, visual_steps, visual_temperature,
                copy_mode, seed, batch_size, threads, data, pred_out, limit, out_dir, snap):
    """Segment what --query refers to in IMAGE; writes <stem>_mask.png and <stem>_overlay.png."""
    import numpy as np

    from ..tasks.setokim import overlay, save_png, segment
    opts, pic, model = _prepare(image, query, "empty query: give --query \"...\"", data, out_dir, model_path,
                                (threads, temperature, top_p, max_new_tokens, visual_steps, visual_temperature,
                                 copy_mode, seed))
    if data:
        return _run_file(model, "segment", data, pred_out, opts, batch_size, None, limit, snap_to_input=snap)
    res = segment(model, [pic], [query], opts, snap_to_input=snap)[0]
    stem = Path(image).stem
    mask_path, over_path = Path(out_dir) / f"{stem}_mask.png", Path(out_dir) / f"{stem}_overlay.png"
    save_png(mask_path, res.mask.astype(np.uint8) * 255)
    save_png(over_path, overlay(np.asarray(pic), res.mask))
    if not res.produced:
        click.echo("warning: the model wrote no visual token; the mask is empty", err=True)
    click.echo(f"{mask_path}\n{over_path}   ({int(res.mask.sum())} of {res.mask.size} pixels)")


@click.command("chat")
@click.argument("image", required=False)
@_sampling_options
@click.option("--out", "out_dir", default=".", show_default=True, metavar="DIR",
              help="Folder for the images the model writes.")
@click.option("--size", type=click.IntRange(min=8), help="Side of written images (default: the detokenizer's).")
@_bank_option
@_detok_option
def chat_cmd(image, model_path, temperature, top_p, max_new_tokens, visual_steps, visual_temperature, copy_mode, seed,
             batch_size, threads, out_dir, size, bank_path, source_margin, max_overlap, snap_metric, place_mode,
             place_temperature, detok_path):
    """Talk with the model about IMAGE (optional). Commands: /image PATH, /reset, /quit."""
    _check_bank(bank_path, detok_path)
    opts = _setup(threads, temperature, top_p, max_new_tokens, visual_steps, visual_temperature, copy_mode, seed)
    from ..images import load_image
    from ..tasks.chat import ChatSession, token_count
    from ..tasks.setokim import load_setokim
    pic = load_image(image) if image else None
    model = load_setokim(model_path)
    _use_bank(opts, bank_path, model, source_margin, max_overlap, snap_metric, place_mode, place_temperature)
    _use_detokenizer(model, detok_path)
    chat = ChatSession(model, pic, opts, out_dir, size)
    if pic is not None:
        click.echo(f"[{image}: {token_count(chat.pending[0])} tokens]", err=True)
    click.echo("type a message; /image PATH attaches an image, /reset clears, /quit or Ctrl-D ends", err=True)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            chat.reset()
            click.echo("[history cleared]")
            continue
        try:
            if line.startswith("/image"):
                path = line[len("/image"):].strip()
                n = chat.attach(load_image(path))
                click.echo(f"[{path}: {n} tokens, for your next message]")
                continue
            r = chat.reply(line)
        except UserError as e:                        # a bad image or message: say so, keep talking
            click.echo(f"error: {e}", err=True)
            continue
        click.echo(f"setokim> {r.text}")
        click.echo("".join([f"[image: {p}]\n" for p in r.images] + [f"[looked at: {p}]\n" for p in r.looks]), nl=False)


@click.command("export")
@click.argument("model_path", metavar="RUN")
@click.option("--out", "out_dir", required=True, metavar="DIR", help="Where the merged Setokim folder goes.")
@click.option("--no-stage1", is_flag=True, help="Leave the stage-1 parts out (read from their recorded path).")
def export_cmd(model_path, out_dir, no_stage1):
    """Write RUN's Setokim as one plain folder: LoRA adapters merged (merge_and_unload)."""
    from ..models.setokim import Setokim
    if Path(out_dir).exists() and any(Path(out_dir).iterdir()):
        raise UserError(f"{out_dir} exists and is not empty: choose a new folder")
    model = Setokim.from_pretrained(model_path)
    size = model.adapter_size()
    if model.has_lora:
        model.merge_lora()
    model.save_pretrained(out_dir, save_stage1=not no_stage1)
    note = (f"LoRA merged ({size['parameters']:,} adapter parameters, {size['bytes'] / 2**20:.2f} MiB)"
            if size["parameters"] else "no LoRA adapters")
    click.echo(f"{out_dir}   ({note})")


@click.command("bank")
@click.argument("data", metavar="DATA")
@click.option("--model", "model_path", required=True, metavar="RUN",
              help="The Setokim whose SeTok tokenizes the images (a bank fits that SeTok only).")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), metavar="FILE",
              help="Where the bank goes (safetensors).")
@click.option("--limit", type=click.IntRange(min=1), help="Only the first N images.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads for torch.")
def bank_cmd(data, model_path, out_path, limit, batch_size, threads):
    """Tokenize the images of DATA (a pairs JSON, e.g. the training split's, or a folder of
    images) into a token bank for `generate|edit|chat --bank FILE`."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..models.setokim.bank import build_bank, save_bank
    from ..tasks.setokim import load_setokim
    from ..files import ensure_dir
    images = _bank_images(data)[:limit]
    ensure_dir(Path(out_path).parent)                  # an unwritable --out fails before the work
    if threads:
        import torch
        torch.set_num_threads(threads)
    model = load_setokim(model_path)
    with Progress(TextColumn("bank"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(file=sys.stderr), transient=True) as bar:
        t = bar.add_task("bank", total=len(images))
        tokens, layouts = build_bank(model, images, batch_size, on_batch=lambda n: bar.advance(t, n))
    save_bank(out_path, tokens, model, layouts)
    click.echo(f"{tokens.shape[0]} tokens of {len(images)} images -> {out_path}")


def _bank_images(data) -> list[str]:
    """A pairs-like JSON (its distinct images, in order) or a folder (its PNG / JPEG files)."""
    p = Path(data)
    if p.is_dir():
        files = sorted(str(f) for f in p.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg"))
        if not files:
            raise UserError(f"{p}: no PNG or JPEG images")
        return files
    if not p.is_file():
        raise UserError(f"{p}: no such data file or folder")
    from ..data.formats import load
    entries = load(p, "pairs")
    images = list(dict.fromkeys(e["image"] for e in entries))
    if not images:
        raise UserError(f"{p}: no images")
    return images
