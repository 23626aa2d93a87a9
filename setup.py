"""Build pmd's Cython extensions.

Flags are generic x86-64 (pip's defaults, never -march=native): the same build
runs on the host and inside a QEMU TCG guest, whose CPU model lacks AVX-512.

PMD_DEBUG=1 turns on Cython bounds/wraparound checks, line tracing (for
coverage and profilers) and assertions, and compiles with -O0 -g.

PMD_SANITIZE=address (or address,undefined) compiles and links the extensions
with -fsanitize=...; the interpreter must then load the sanitizer runtime
first (LD_PRELOAD of gcc's libasan.so), as scripts/sanitize.sh does.
"""
import os
from pathlib import Path

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("PMD_DEBUG", "") not in ("", "0")
SANITIZE = os.environ.get("PMD_SANITIZE", "").strip()

# Every Cython module of the package: pmd/driver/_rx.pyx builds the extension pmd.driver._rx.
SOURCES = sorted(str(p) for p in Path("pmd").rglob("*.pyx"))

macros = [("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]
# Cython's `cdef inline` is only a hint, and gcc -O2 declines it for the device
# queue's pop() and push() in the device's burst loops (two call sites each): 11
# instructions of frame per call and the queue's fields reloaded from memory. Inline
# is forced in the burst modules only (the driver's and the device's): forced in
# every module, the built-in device's engine got slower though callgrind counted
# fewer instructions, and the main job (`pmd fwd`, io, 64 B) fell from 17.4 to
# 14.3 Mpps (interleaved runs, 2026-12-03).
FORCE_INLINE = {"pmd.sim._rx", "pmd.sim._tx", "pmd.driver._rx", "pmd.driver._tx"}
cflags = ["-std=gnu11", "-Wall", "-Wno-unused-function", "-Wno-unreachable-code"]
if DEBUG:
    macros += [("CYTHON_TRACE_NOGIL", "1"), ("PMD_DEBUG", "1")]
    cflags += ["-O0", "-g", "-UNDEBUG"]
else:
    cflags += ["-O2", "-DNDEBUG"]
ldflags = []
if SANITIZE:
    if not all(kind in ("address", "undefined") for kind in SANITIZE.split(",")):
        raise SystemExit(f"PMD_SANITIZE={SANITIZE!r}: use address, undefined or address,undefined")
    cflags += [f"-fsanitize={SANITIZE}", "-fno-omit-frame-pointer"]
    ldflags += [f"-fsanitize={SANITIZE}"]


def extension(source: str) -> Extension:
    name = source[: -len(".pyx")].replace("/", ".")
    inline = [("CYTHON_INLINE", "__inline__ __attribute__((always_inline))")] \
        if not DEBUG and name in FORCE_INLINE else []
    return Extension(name, [source], include_dirs=["csrc", numpy.get_include()], define_macros=macros + inline,
                     extra_compile_args=cflags, extra_link_args=ldflags)


extensions = [extension(source) for source in SOURCES]

directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "embedsignature": True,
    "linetrace": DEBUG,
    "profile": False,
    "auto_pickle": False,   # queues and memory hold raw pointers: never picklable
    "autotestdict": False,
}

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives=directives,
        include_path=["."],
        annotate=os.environ.get("PMD_ANNOTATE", "") not in ("", "0"),
    ),
)
