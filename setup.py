"""Build script: pure Python by default; the optional native planner from `csrc/` only when asked.

    BARNFAST_BUILD_NATIVE=1 pip install -e .

builds `barnfast.data._native` (C++). Without the switch nothing is compiled and the pure-Python
fallback is used; `barnfast.data.packing` reports which one is active.
"""

import os

from setuptools import find_packages, setup

# `kernels/` is mapped to `barnfast.kernels` by pyproject's package-dir; list it beside the rest.
packages = find_packages(include=["barnfast", "barnfast.*"]) + ["barnfast.kernels"]

ext_modules = []
if os.environ.get("BARNFAST_BUILD_NATIVE", "0") == "1":
    from setuptools import Extension

    sources = sorted(
        os.path.join("csrc", name) for name in os.listdir("csrc") if name.endswith(".cpp")
    )
    ext_modules.append(
        Extension(
            "barnfast.data._native",
            sources=sources,
            language="c++",
            extra_compile_args=["-O3", "-std=c++17"],
        )
    )

setup(packages=packages, ext_modules=ext_modules)
