"""Build hook for the one compiled part: the optional AVX2 int4 kernel (``hermesd/quant/native``).

Everything else is declared in pyproject.toml. The extension is optional: without a C compiler,
or on another architecture, the install still succeeds and quantized Linears use torch's kernel.
"""

import platform

from setuptools import Extension, setup

X86 = platform.machine().lower() in ("x86_64", "amd64")

setup(ext_modules=[Extension(
    "hermesd.quant._q4gemm",
    sources=["hermesd/quant/native/q4gemm.c"],
    extra_compile_args=["-O3", "-fopenmp"] if X86 else ["-O3"],
    extra_link_args=["-fopenmp"] if X86 else [],
    optional=True,
)])
