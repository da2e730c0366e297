"""The one part of the build that must be code: the C/OpenMP extension llorch._kernels.

Sources: the Cython layer plus csrc/ (dispatch.c and one isa_<level>.c per SIMD level; each includes
csrc/ops/*.c). Compiled -O3 with OpenMP; the SIMD levels are chosen at run time, so the wheel runs on
any x86-64 (and builds the baseline path alone elsewhere).
"""
import glob
import os
import sys

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
# LLORCH_SANITIZE=1: AddressSanitizer + UndefinedBehaviorSanitizer, any finding fatal. Python must then
# run with the ASan runtime preloaded (LD_PRELOAD=$(gcc -print-file-name=libasan.so)); see .ci/run.
sanitize = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"]
sanitize = sanitize if os.environ.get("LLORCH_SANITIZE") == "1" else []
extension = Extension(
    "llorch._kernels",
    sources=["src/llorch/_kernels.pyx", "csrc/dispatch.c", *sorted(glob.glob("csrc/isa_*.c"))],
    include_dirs=["csrc", numpy.get_include()],
    extra_compile_args=["-O3", "-std=gnu11", "-fno-math-errno", *openmp, *sanitize],
    extra_link_args=[*openmp, *sanitize],
    depends=sorted(glob.glob("csrc/*.h") + glob.glob("csrc/ops/*.c")),
)

setup(ext_modules=cythonize([extension], compiler_directives={"language_level": "3"}))
