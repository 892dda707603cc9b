"""Build of npn_kernels and its extension npn_kernels._C (install: see README.md).

The C++ CPU sources are always built (unless NPN_SKIP_EXT=1); the CUDA sources only where torch
has CUDA and a device is visible, or NPN_FORCE_CUDA=1. Torch must already be installed:
pip install --no-build-isolation -e .
"""

import glob
import os
import runpy

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
# Loaded by path: importing the package itself would need the extension this file builds.
env = runpy.run_path("npn_kernels/_env.py")
version = runpy.run_path("npn_kernels/_version.py")["__version__"]


def extensions():
    if env["skip_ext"]():
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    with_cuda = env["force_cuda"]() or (torch.version.cuda is not None and torch.cuda.is_available())
    sources = ["csrc/module.cpp", "csrc/register.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    # -fopenmp in compile AND link flags: without it at::parallel_for silently runs on 1 thread.
    cxx = ["-O3", "-fopenmp"]
    kwargs = dict(include_dirs=[os.path.join(HERE, "csrc", "include"), os.path.join(HERE, "csrc")], extra_link_args=["-fopenmp"])
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        ext = CUDAExtension(
            "npn_kernels._C",
            sources,
            extra_compile_args={"cxx": cxx + ["-DNPN_WITH_CUDA"], "nvcc": ["-O3", "-DNPN_WITH_CUDA"]},
            **kwargs,
        )
    else:
        ext = CppExtension("npn_kernels._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extensions()

setup(
    name="npn_kernels",
    version=version,
    description="Neural Plasticity Networks and hard-concrete L0 gates for PyTorch, with fused kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["npn_kernels", "npn_kernels.*"]),
    install_requires=["torch>=2.6", "numpy", "tqdm", "matplotlib"],
    extras_require={
        "triton": ["triton>=3.4"],
        "test": ["pytest", "hypothesis", "pytest-benchmark"],
    },
    entry_points={"console_scripts": ["npn = npn_kernels.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
