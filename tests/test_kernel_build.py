"""CI (CPU): the kernel sources compile with plain nvcc for every architecture sdrun ships, when nvcc is present.

bindings.cpp is left out (it needs torch's CUDA headers); mem_eff_attn.cu holds every attention kernel
instantiation, fp8_widen.cu the fp8 widening kernel, group_norm.cu the GroupNorm (+ SiLU) kernels, geglu.cu GEGLU's
gate, layer_norm.cu the LayerNorm (+ residual addition). One nvcc call a file with all -gencode targets and -t (parallel targets): about 2 minutes on a 2-core machine.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARCHS = ["75", "80", "86", "89", "90a", "120"]  # sm_75: fp16 only (bf16 mma guarded out); 90a: the wgmma path

nvcc = shutil.which("nvcc")


@pytest.mark.skipif(nvcc is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("source", ["mem_eff_attn.cu", "fp8_widen.cu", "group_norm.cu", "geglu.cu",
                                    "layer_norm.cu"])
def test_kernel_sources_compile_for_all_archs(tmp_path, source):
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS] + ["-gencode=arch=compute_90,code=compute_90",
                                                                                "-DSDRUN_SM90A"]
    cmd = [nvcc, "-std=c++17", "-O3", "-t", str(min(len(ARCHS) + 1, os.cpu_count() or 2)), *gencode,
           "-I", str(ROOT / "csrc"), "-c", str(ROOT / "csrc" / source), "-o", str(tmp_path / "kernel.o")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "warning" not in res.stderr.lower(), res.stderr[-4000:]
    assert (tmp_path / "kernel.o").stat().st_size > 0


def test_kernel_files_include_no_torch_headers():
    for name in ("mem_eff_attn.h", "mem_eff_attn_kernel.cuh", "mem_eff_attn_sm90.cuh", "mem_eff_attn_sm90_ptx.cuh",
                 "mem_eff_attn.cu", "static_switch.h", "fp8_widen.h", "fp8_widen.cu", "group_norm.h", "group_norm.cu",
                 "vec16.cuh", "geglu.h", "geglu.cu", "layer_norm.h", "layer_norm.cu"):
        includes = [line for line in (ROOT / "csrc" / name).read_text().splitlines() if line.startswith("#include")]
        assert not any(s in line for line in includes for s in ("torch", "ATen", "c10")), (name, includes)
