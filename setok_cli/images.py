"""Reading images the way a user expects, and turning them into model input.

    expand_inputs(["a.jpg", "photos/", "shots/*.png"]) -> (paths, problems)
    load_image(path) -> PIL.Image in RGB (EXIF orientation applied)
    letterbox(image, size, patch, pad_mode, pad_rgb) -> (pixels (3, S, S) in [0, 1], (gh, gw), resized image)

Conversions: CMYK -> RGB via Pillow; 16-bit and 32-bit integer / float greyscale ->
scaled to 8 bits by their range (16-bit: /257); palette / alpha images (RGBA, LA, P
with transparency) are composited on white; greyscale -> three equal channels.
Every failure is a UserError with one line that names the file.
"""
from __future__ import annotations

import glob
import os
from typing import Iterable, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm",
                    ".jfif", ".jp2", ".tga", ".ico")
ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]


def _is_image_name(p: str) -> bool:
    return p.lower().endswith(IMAGE_EXTENSIONS)


def expand_inputs(items: Iterable[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Files, folders (their images, recursively, sorted) and globs -> (paths, problems).

    A folder contributes only files with an image extension; a file named explicitly is
    kept whatever its name (it is checked when read). Problems: (input, message)."""
    paths, problems, seen = [], [], set()

    def add(p):
        key = os.path.abspath(p)
        if key not in seen:
            seen.add(key)
            paths.append(p)

    for item in items:
        item = os.path.expanduser(str(item))
        if os.path.isdir(item):
            found = sorted(os.path.join(r, f) for r, _, fs in os.walk(item) for f in fs if _is_image_name(f))
            if not found:
                problems.append((item, "folder holds no images"))
            for p in found:
                add(p)
        elif os.path.exists(item):
            add(item)
        elif glob.has_magic(item):
            found = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            if not found:
                problems.append((item, "pattern matches no files"))
            for p in found:
                add(p)
        else:
            problems.append((item, "no such file or folder"))
    return paths, problems


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB (see the module docstring for the rules)."""
    img = ImageOps.exif_transpose(img) or img
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img).astype(np.float64)
        if mode.startswith("I;16"):
            a = a / 257.0
        else:
            lo, hi = float(np.nanmin(a)) if a.size else 0.0, float(np.nanmax(a)) if a.size else 1.0
            if mode == "F" and lo >= 0.0 and hi <= 1.0:
                a = a * 255.0
            elif hi > 255.0 or lo < 0.0:
                a = (a - lo) / max(hi - lo, 1e-12) * 255.0
        return Image.fromarray(np.nan_to_num(a).clip(0, 255).round().astype(np.uint8), "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def load_image(path: Union[str, os.PathLike]) -> Image.Image:
    """Open an image file as 8-bit RGB, or raise UserError naming the file and the reason."""
    p = str(path)
    if not os.path.exists(p):
        raise UserError(f"{p}: no such file")
    if os.path.isdir(p):
        raise UserError(f"{p}: is a folder, not an image")
    try:
        if os.path.getsize(p) == 0:
            raise UserError(f"{p}: empty file")
        with Image.open(p) as im:
            im.load()
            return to_rgb(im)
    except UserError:
        raise
    except UnidentifiedImageError:
        raise UserError(f"{p}: not an image (unrecognised format)") from None
    except PermissionError:
        raise UserError(f"{p}: permission denied") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise UserError(f"{p}: unreadable image ({e})") from None
    except Image.DecompressionBombError as e:
        raise UserError(f"{p}: image too large ({e})") from None


def as_image(item: ImageLike) -> Image.Image:
    """A path, PIL image or uint8 array (H, W), (H, W, 3|4) -> RGB PIL image."""
    if isinstance(item, Image.Image):
        return to_rgb(item)
    if isinstance(item, np.ndarray):
        a = item
        if a.dtype != np.uint8:
            if np.issubdtype(a.dtype, np.floating) and a.size and float(a.max()) <= 1.0:
                a = a * 255.0
            a = np.clip(a, 0, 255).astype(np.uint8)
        if a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (1, 3, 4)):
            a = a[..., 0] if a.ndim == 3 and a.shape[2] == 1 else a
            return to_rgb(Image.fromarray(a))
        raise UserError(f"image array must be (H, W) or (H, W, 1|3|4), got {a.shape}")
    if isinstance(item, (str, os.PathLike)):
        return load_image(item)
    raise UserError(f"cannot use a {type(item).__name__} as an image (give a path, PIL image or uint8 array)")


def fit_grid(width: int, height: int, size: int, patch: int) -> tuple[int, int]:
    """Patch grid (gh, gw) of an image letterboxed into size x size: the long side fills
    the square, the short side keeps the aspect ratio, both rounded to whole patches."""
    n = size // patch
    s = size / max(width, height)
    gw = min(n, max(1, round(width * s / patch)))
    gh = min(n, max(1, round(height * s / patch)))
    return gh, gw


def letterbox(img: Image.Image, size: int, patch: int, pad_mode: str = "edge", pad_rgb=(0.5, 0.5, 0.5),
              policy: str = "letterbox", name: str = "image"):
    """The resize / pad policy shared by every encoder.

    letterbox: resize (bicubic) so the long side is `size` and the short side a whole
    number of patches at the same aspect ratio, put it at the top-left of a size x size
    canvas and pad the rest (pad_mode "edge": repeat the border pixels; "mean": the
    colour pad_rgb). Patches outside the image are invalid: no token covers them.
    squash: resize to size x size (aspect not kept), every patch valid.
    -> pixels (3, size, size) float32 in [0, 1], grid (gh, gw) of valid patches, the
    resized image (gw * patch x gh * patch).
    """
    w, h = img.size
    if min(w, h) < patch:
        raise UserError(f"{name}: {w}x{h} pixels is too small for one {patch}x{patch} patch")
    if policy == "squash":
        gh = gw = size // patch
    elif policy == "letterbox":
        gh, gw = fit_grid(w, h, size, patch)
    else:
        raise UserError(f"image_policy must be 'letterbox' or 'squash', got {policy!r}")
    rw, rh = gw * patch, gh * patch
    resized = img.resize((rw, rh), Image.Resampling.BICUBIC, reducing_gap=None) if (rw, rh) != (w, h) else img
    a = torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    S = (size // patch) * patch
    if (rh, rw) == (S, S):
        return a, (gh, gw), resized
    if pad_mode == "edge":
        px = torch.nn.functional.pad(a.unsqueeze(0), (0, S - rw, 0, S - rh), mode="replicate")[0]
    else:
        px = torch.tensor(pad_rgb, dtype=torch.float32).view(3, 1, 1).expand(3, S, S).clone()
        px[:, :rh, :rw] = a
    return px, (gh, gw), resized
