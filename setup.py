"""sdrun: install the package, and build the bundled attention kernel (extension sdrun._C) ahead of time when
torch with CUDA and nvcc are present in the build environment:

    pip install --no-build-isolation .        # with a CUDA torch already installed: builds sdrun._C
    pip install .                             # build isolation hides torch: pure Python, kernel built on first use

Environment: SDRUN_SKIP_CUDA_BUILD=1 never builds; SDRUN_CUDA_ARCHS="8.0;9.0a" picks architectures (default:
7.5;8.0;8.6;8.9;9.0a;12.0 plus PTX for 9.0; 9.0a is Hopper's wgmma path); NVCC_THREADS passes -t to nvcc.
"""

import json
import os
import platform
import re
import shutil
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
VERSION = re.search(r'^__version__\s*=\s*"([^"]+)"', (ROOT / "sdrun" / "__init__.py").read_text(), re.M).group(1)
DEFAULT_ARCHS = "7.5;8.0;8.6;8.9;9.0a;12.0;9.0+PTX"
SOURCES = ["csrc/bindings.cpp", "csrc/mem_eff_attn.cu", "csrc/fp8_widen.cu", "csrc/group_norm.cu", "csrc/geglu.cu",
           "csrc/layer_norm.cu"]


def cuda_build_or_reason():
    """(torch, None) if the extension can be built here, else (None, why not)."""
    if os.environ.get("SDRUN_SKIP_CUDA_BUILD") == "1":
        return None, "SDRUN_SKIP_CUDA_BUILD=1"
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return None, "torch is not importable in the build environment (pip's build isolation hides it)"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} has no CUDA"
    home = cpp_extension.CUDA_HOME
    if not (home and Path(home, "bin", "nvcc").is_file()) and shutil.which("nvcc") is None:
        return None, "nvcc was not found"
    return torch, None


def gencode_flags(archs: str) -> list[str]:
    """nvcc -gencode flags: "8.0" a cubin, "9.0a" the arch-specific cubin (Hopper's wgmma path), "9.0+PTX" also PTX.

    A cubin for X.Y is left out when X.Ya is listed too: one cubin per GPU, so the runtime cannot pick the plain one.
    """
    entries = [a.strip() for a in archs.split(";") if a.strip()]
    specific = {a for a in entries if a.endswith("a")}
    flags = []
    for arch in entries:
        num = arch.replace("+PTX", "").replace(".", "")
        if arch.replace("+PTX", "") + "a" not in specific:
            flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if arch.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    if "9.0a" in specific:
        flags.append("-DSDRUN_SM90A")  # the host launcher may pick the wgmma kernel on compute capability 9.0
    return flags


def extension_kwargs():
    torch, reason = cuda_build_or_reason()
    if torch is None:
        print(f"sdrun: not building the CUDA attention kernel ({reason}); it will be compiled on first --xformers use")
        return {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    archs = os.environ.get("SDRUN_CUDA_ARCHS", DEFAULT_ARCHS)
    nvcc = ["-O3", "-lineinfo"] + gencode_flags(archs)
    if os.environ.get("NVCC_THREADS"):
        nvcc += ["-t", os.environ["NVCC_THREADS"]]
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "archs": archs, "sdrun": VERSION}
    (ROOT / "sdrun" / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    ext = CUDAExtension("sdrun._C", SOURCES, include_dirs=[str(ROOT / "csrc")],
                        extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc})
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


setup(
    name="sdrun",
    version=VERSION,
    description="Stable Diffusion from the command line, built for memory and speed",
    python_requires=">=3.11",
    packages=find_packages(include=["sdrun", "sdrun.*"]) + ["sdrun.configs", "sdrun.csrc"],
    package_dir={"sdrun.configs": "configs", "sdrun.csrc": "csrc"},
    package_data={"sdrun.configs": ["**/*"], "sdrun.csrc": ["*.h", "*.cuh", "*.cu", "*.cpp"],
                  "sdrun": ["build_info.json"]},
    include_package_data=False,
    install_requires=["torch>=2.4", "diffusers>=0.32", "transformers>=4.45", "accelerate>=0.33", "safetensors>=0.8",
                      "click>=8.1", "rich>=13", "pillow>=10", "scipy", "ninja", "peft>=0.15"],
    # scipy: LMS sampler; ninja: kernel JIT; peft: LoRA loading (diffusers' backend for it)
    extras_require={"test": ["pytest"]},
    entry_points={"console_scripts": ["sdrun=sdrun.entry:main"]},
    **extension_kwargs(),
)
