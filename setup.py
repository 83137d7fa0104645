"""Builds moeprep's compiled shuffle ops (metadata lives in pyproject.toml).

- ``moeprep._C``: op schemas and CPU kernels. Always built; a missing C++ compiler or a failed
  build stops the install with a message saying so.
- ``moeprep._C_cuda``: CUDA kernels, built when torch has CUDA and nvcc is found (on CUDA, not
  ROCm, builds also the tensor-core MoE GEMMs: for decode batches, sm_80+, and for prefill,
  sm_90a). If that build fails the install goes on with a warning (the CPU ops still work).

Without TORCH_CUDA_ARCH_LIST the CUDA ops are built for the visible GPUs, as torch does, except
that sm_90 builds as sm_90a (the prefill GEMMs' wgmma needs it); with it, as it says.

Install with ``pip install --no-build-isolation -e .`` so the build uses the installed torch.
``MOEPREP_NO_CUDA=1`` skips the CUDA part.
"""
from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - depends on the build environment
    sys.exit(
        "moeprep: building the compiled ops needs torch installed first; "
        "install torch, then `pip install --no-build-isolation .`"
    )

CPU_EXT = "moeprep._C"
CUDA_EXT = "moeprep._C_cuda"


def _cxx_flags() -> list[str]:
    flags = ["-O3", "-g0"]  # -g0: Python's CFLAGS ask for debug info, which doubles the build time
    # at::parallel_for is an inline OpenMP loop: without -fopenmp it would run on one thread.
    if torch.backends.openmp.is_available():
        flags.append("-fopenmp")
    return flags


def _want_cuda() -> bool:
    if os.environ.get("MOEPREP_NO_CUDA", "") not in ("", "0"):
        return False
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _set_cuda_arch_list() -> None:
    if os.environ.get("TORCH_CUDA_ARCH_LIST") or not torch.cuda.is_available():
        return
    archs = sorted({"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    archs = [a + "a" if a == "9.0" else a for a in archs]
    archs[-1] += "+PTX"
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs)


def _extensions() -> list:
    cxx = _cxx_flags()
    link = ["-fopenmp"] if "-fopenmp" in cxx else []
    headers = sorted(str(p) for p in Path("csrc").glob("*.h*"))  # rebuild triggers, and shipped in the sdist
    exts = [
        cpp_extension.CppExtension(
            CPU_EXT, ["csrc/cpu_ops.cpp", "csrc/mapped_guard.cpp"], depends=headers, extra_compile_args={"cxx": cxx}, extra_link_args=link
        )
    ]
    if _want_cuda():
        sources = ["csrc/gpu_ops.cpp", "csrc/gpu_kernels.cu"]
        if torch.version.hip is None:  # the MoE GEMMs are mma.sync / wgmma PTX; HIP takes the Triton kernels
            sources += ["csrc/moe_decode_ops.cpp", "csrc/moe_decode.cu", "csrc/moe_prefill.cu"]
            _set_cuda_arch_list()
        exts.append(
            cpp_extension.CUDAExtension(
                CUDA_EXT,
                sources,
                depends=headers,
                extra_compile_args={"cxx": ["-O3", "-g0"], "nvcc": ["-O3"]},
            )
        )
    return exts


class BuildExt(cpp_extension.BuildExtension):
    """Fails loudly for the CPU ops, degrades to a warning for the CUDA ops."""

    def build_extensions(self) -> None:
        compiler = os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++"
        if shutil.which(compiler.split()[0]) is None:
            sys.exit(
                f"moeprep: no C++ compiler found ({compiler!r}); install g++ (e.g. "
                "`apt-get install g++`) or set CXX, then reinstall"
            )
        super().build_extensions()

    def build_extension(self, ext) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            if ext.name == CUDA_EXT:
                print(
                    f"\nWARNING: moeprep: building the CUDA ops ({CUDA_EXT}) failed: {exc}\n"
                    "WARNING: moeprep installs with CPU ops only; CUDA tensors will be refused.\n",
                    file=sys.stderr,
                )
                return
            sys.exit(f"moeprep: building the C++ ops ({CPU_EXT}) failed: {exc}")


setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildExt})
