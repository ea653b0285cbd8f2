"""`setok env`: what this installation can run."""
from __future__ import annotations

import json
import platform

import click


def collect() -> dict:
    import torch

    from .. import __version__, ops

    info = {
        "setok": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cuda_arch_list": torch.cuda.get_arch_list() if torch.cuda.is_available() else [],
        "threads": torch.get_num_threads(),
        "extension": ops.HAS_EXT,
        "extension_build": ops.build_info(),
        "backends": {"cpu": ops.available_backends("cpu"),
                     "cuda": ops.available_backends("cuda") if torch.cuda.is_available() else []},
        "default_backend": {"cpu": ops.default_backend("cpu")},
    }
    for name in ["numpy", "transformers", "diffusers", "peft", "accelerate", "safetensors", "scipy", "PIL"]:
        try:
            mod = __import__(name)
            info[name] = getattr(mod, "__version__", "?")
        except Exception:  # an optional package that is missing or broken
            info[name] = None
    return info


@click.command("env")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def env(as_json: bool):
    """Versions, the compiled extension, available backends, threads, CUDA arch list."""
    info = collect()
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(show_header=False, title="setok environment")
    t.add_column("key", style="bold")
    t.add_column("value")
    for k, v in info.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a}={b}" for a, b in v.items()) or "-"
        elif isinstance(v, list):
            v = ", ".join(map(str, v)) or "-"
        t.add_row(k, str(v))
    Console().print(t)
