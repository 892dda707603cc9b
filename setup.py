"""Build of npn_kernels and its extension npn_kernels._C (install: see README.md).

The C++ CPU sources are always built (unless NPN_SKIP_EXT=1); the CUDA sources only where torch
has CUDA and a device is visible, or NPN_FORCE_CUDA=1. Torch must already be installed:
pip install --no-build-isolation -e .
"""

import glob
import os
import runpy
import subprocess

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
# Loaded by path: importing the package itself would need the extension this file builds.
env = runpy.run_path("npn_kernels/_env.py")
version = runpy.run_path("npn_kernels/_version.py")["__version__"]


# (flag set, /proc/cpuinfo flags it needs), best first. The gate kernels (csrc/cpu/gates.cpp) are
# loops that gcc vectorizes: HardConcrete sampling + penalty, fwd + bwd, 4M gates, 2 threads
# (AMD EPYC, gcc 12) took 87 ms with the x86-64 baseline (SSE2), 33 ms with AVX2+FMA and 19-21 ms
# with AVX-512, against 65-82 ms for the same math composed in torch (which uses AVX-512).
_ARCH_FLAGS = [
    (
        ["-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl"],
        {"avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl"},
    ),
    (["-mavx2", "-mfma"], {"avx2", "fma"}),
]


def cpu_arch_flags() -> list[str]:
    """The best flag set of _ARCH_FLAGS that this CPU runs and the C++ compiler accepts, else [].

    The extension is built for the machine that builds it (pip install from source); a build
    on a CPU without AVX2 (or not on Linux x86), or with NPN_CPU_ARCH=baseline (a build meant
    for other machines), gets the baseline and still works.
    """
    if env["cpu_arch"]() == "baseline":
        return []
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags_line = next((line for line in f if line.startswith("flags")), ":")
        cpu = set(flags_line.split(":", 1)[1].split())
    except OSError:
        return []
    cxx = os.environ.get("CXX", "c++")
    for flags, needs in _ARCH_FLAGS:
        if needs <= cpu:
            probe = subprocess.run(
                [cxx, *flags, "-x", "c++", "-c", "-", "-o", os.devnull],
                input="int main() { return 0; }",
                text=True,
                capture_output=True,
                check=False,
            )
            if probe.returncode == 0:
                return flags
    return []


def extensions():
    if env["skip_ext"]():
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    with_cuda = env["force_cuda"]() or (torch.version.cuda is not None and torch.cuda.is_available())
    sources = ["csrc/module.cpp", "csrc/register.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    # -fopenmp in compile AND link flags: without it at::parallel_for silently runs on 1 thread.
    # -fno-trapping-math: lets gcc vectorize loops with selects over float arithmetic (the gate
    # formulas; 268 -> 87 ms in the measurement above); nothing here reads floating-point
    # exception flags.
    # -fno-math-errno: std::sqrt would otherwise be a libm call per element (errno), which keeps
    # the loop around it scalar (hc_s_beta23: 4.9 -> 0.59 ms per 1M gates); nothing reads errno.
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno", *cpu_arch_flags()]
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
