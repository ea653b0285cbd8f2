"""Files the toolkit writes and the label PNGs it reads, each in one place.

    atomic_write(path, write)        write(tmp) then rename onto path (same folder)
    atomic_write_bytes(path, data)   / atomic_write_text(path, text) / atomic_write_json(path, obj)
    load_ids(path, size=None)        an instance / mask PNG -> (H, W) int64, values kept

Every write goes to a temporary file in the destination folder and is renamed into
place, so a crash or a full disk never leaves a half-written file where a good one was.
An OSError (a folder that cannot be created, a read-only disk) becomes one UserError
line naming the path and the reason.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from .errors import UserError

PathLike = Union[str, os.PathLike]


def os_error_message(e: OSError, path: Optional[PathLike] = None) -> str:
    """'<path>: <reason>' for an OSError (the path the OS names, else `path`)."""
    where = e.filename if e.filename is not None else path
    reason = e.strerror or str(e)
    return f"{where}: {reason}" if where is not None else reason


def ensure_dir(path: PathLike) -> Path:
    """mkdir -p, or one UserError naming the folder and why it cannot be made."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create folder {os_error_message(e, p)}") from None
    if not os.access(p, os.W_OK):
        raise UserError(f"cannot write to folder {p}: permission denied")
    return p


def atomic_write(path: PathLike, write: Callable[[str], None]) -> None:
    """write(tmp_path) then rename onto `path`; the folder is created if needed.

    The temporary file keeps `path`'s suffix (writers such as PIL pick the format by it)
    and gets the usual file mode (mkstemp makes 0600)."""
    path = Path(path)
    ensure_dir(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    except OSError as e:
        raise UserError(f"cannot write {os_error_message(e, path)}") from None
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except OSError as e:
        _unlink_quietly(tmp)
        # name the destination, not the temporary file the OS reports
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        _unlink_quietly(tmp)
        raise


def atomic_folder(path: PathLike, write: Callable[[Path], None]) -> None:
    """write(tmp_folder) then swap it in for the folder `path` (the old one, if any, is moved
    aside first and removed after), so a crash leaves the old folder or the new one, never a mix."""
    import shutil
    dest = Path(path)
    ensure_dir(dest.parent if str(dest.parent) else Path("."))
    old = tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".tmp-{dest.name}-"))
        write(tmp)
        if dest.exists():
            old = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".old-{dest.name}-"))
            os.replace(dest, old / "x")
        os.replace(tmp, dest)
    except OSError as e:
        raise UserError(f"cannot write {os_error_message(e, dest)}") from None
    finally:
        for d in (tmp, old):
            if d is not None:
                shutil.rmtree(d, ignore_errors=True)


def _unlink_quietly(p: str) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    def _w(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
    atomic_write(path, _w)


def atomic_write_text(path: PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, obj, indent: Optional[int] = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def load_ids(path: PathLike, size: Optional[int] = None) -> np.ndarray:
    """An instance-id or 0/255 mask PNG -> (H, W) int64 with its stored values.

    Single-channel images (L, P, I, I;16) keep their values; an RGB(A) file written by
    another tool keeps channel 0 (ids are stored equal in every channel: converting to
    luma would rescale them). `size`: nearest-neighbour resize to size x size (ids are
    labels, never interpolated)."""
    from PIL import Image

    p = str(path)
    try:
        with Image.open(p) as im:
            im.load()
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.NEAREST)
            a = np.asarray(im)
    except FileNotFoundError:
        raise UserError(f"{p}: no such file") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise UserError(f"cannot read mask {p}: {e}") from None
    if a.ndim == 3:
        a = a[..., 0]
    return a.astype(np.int64)
