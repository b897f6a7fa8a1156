"""Build script: the package metadata lives in pyproject.toml (the license is set here, see _license); this
file adds the C++/CUDA extension fastconv._C (one shared library, loaded by fastconv/_ext.py; importing it
registers torch.ops.fastconv.ext_*).

    csrc/*.cpp, csrc/cpu/*.cpp                 always (op schemas and the C++ CPU kernels)
    csrc/cuda/*.cu, csrc/cuda/*.cpp            when a CUDA toolkit (nvcc) and a CUDA build of torch are present

Switches (environment variables):
    FASTCONV_BUILD_EXT=0      no extension at all: a pure-Python install (backends 'cpu'/'cuda' unavailable)
    FASTCONV_BUILD_CUDA=0     build only the CPU part, even where nvcc and a CUDA torch are present
    TORCH_CUDA_ARCH_LIST      GPU architectures to compile for; default "8.0;9.0" (A100 sm_80, H100 sm_90)
    MAX_JOBS                  parallel compile jobs for ninja; default: the number of CPU cores (at most 8)
    CUDA_HOME                 the CUDA toolkit; scripts/setup.sh sets /usr/local/cuda when nvcc is there

Build it with torch already installed: `pip install --no-build-isolation -e .` (scripts/setup.sh does).
"""
from __future__ import annotations

import glob
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str, default: str = "1") -> bool:
    return os.environ.get(name, default).strip().lower() not in ("0", "false", "no", "off", "")


def _sources(*patterns: str) -> list[str]:
    # Relative paths keep the ninja file and the object names short and the build relocatable.
    found: list[str] = []
    for pattern in patterns:
        found += sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))
    return found


def _cuda_toolkit() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return home
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(nvcc)) if nvcc else None


def _extensions():
    if not _flag("FASTCONV_BUILD_EXT"):
        print("fastconv: FASTCONV_BUILD_EXT=0, skipping the C++/CUDA extension (pure-Python install)")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("fastconv: WARNING: torch is not importable in the build environment (pip's build isolation?), so "
              "the C++/CUDA extension is NOT built; install torch first and use `pip install --no-build-isolation`")
        return [], {}

    os.environ.setdefault("MAX_JOBS", str(max(1, min(8, os.cpu_count() or 1))))
    cpu_sources = _sources("csrc/*.cpp", "csrc/cpu/*.cpp")
    cuda_sources = _sources("csrc/cuda/*.cu", "csrc/cuda/*.cpp")
    toolkit = _cuda_toolkit()
    want_cuda = _flag("FASTCONV_BUILD_CUDA")
    build_cuda = bool(want_cuda and toolkit and torch.version.cuda and cuda_sources)
    if want_cuda and not build_cuda:
        why = ("torch is a CPU-only build" if not torch.version.cuda else
               "no CUDA toolkit (nvcc) found; set CUDA_HOME" if not toolkit else "no csrc/cuda sources")
        print(f"fastconv: building the extension without CUDA kernels because {why}")
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    cxx = ["-O3"]  # torch.utils.cpp_extension adds the C++ standard torch needs (C++20 for torch 2.15)
    if build_cuda:
        os.environ.setdefault("CUDA_HOME", toolkit)
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        # "+"-separated: nvcc splits -D values at commas
        archs = "+".join("sm_" + a.split("+")[0].replace(".", "")
                         for a in os.environ["TORCH_CUDA_ARCH_LIST"].replace(" ", ";").split(";") if a)
        nvcc = ["-O3", "--threads", os.environ.get("FASTCONV_NVCC_THREADS", "2"),
                "--expt-relaxed-constexpr", "-lineinfo", f"-DFASTCONV_CUDA_ARCHS={archs}"]
        macros = [("FASTCONV_WITH_CUDA", None)]
        ext = cpp_extension.CUDAExtension(
            "fastconv._C", cpu_sources + cuda_sources, include_dirs=include_dirs, define_macros=macros,
            extra_compile_args={"cxx": cxx + ["-DFASTCONV_WITH_CUDA"], "nvcc": nvcc},
            py_limited_api=False,
        )
    else:
        ext = cpp_extension.CppExtension(
            "fastconv._C", cpu_sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx},
        )
    cmd = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}
    return [ext], cmd


def _license() -> dict:
    """The license, declared `dynamic` in pyproject.toml: setuptools >= 77 takes the SPDX expression
    (`project.license = "..."` as a string is an error before 77, e.g. "`project.license` must be valid exactly
    by one definition" on 65), older ones the plain field; both build without a deprecation warning."""
    import setuptools

    major = int(setuptools.__version__.split(".")[0])
    return {"license_expression": "BSD-3-Clause"} if major >= 77 else {"license": "BSD-3-Clause"}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass, **_license())
