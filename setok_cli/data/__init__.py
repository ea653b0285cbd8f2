"""Data: the SPEC section 4 formats (`formats`), the synthetic world (`shapes`) and its
parser (`scene_parser`). Kept import-light: submodules load numpy/scipy on use."""

__all__ = ["formats", "shapes", "scene_parser"]
