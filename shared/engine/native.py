"""The engine's C++ ops (csrc/), built with the system's C++ compiler at first use and cached.

Each source file is one shared library, built once per source, torch version and CPU (it is compiled
for the CPU it runs on: `-march=native`), in the distserve cache directory, and loaded into torch's
op registry (`torch.ops.distserve.*`). Building needs `c++` (or $CXX), the compiler torch.compile's
inductor needs too; a failure raises with the compiler's message.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import subprocess
from pathlib import Path

import torch

from shared.model_files import cache_dir, write_atomically

CSRC = Path(__file__).with_name("csrc")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-std=c++20", "-shared", "-fPIC")


def _cpu_signature() -> bytes:
    """What the binary depends on besides its source: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor().encode()
    wanted = ("model name", "flags")
    return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in wanted})).encode()


@functools.cache
def load_op_library(name: str, extra_flags: tuple[str, ...] = ()) -> None:
    """Load csrc/<name>.cpp's ops, building the library the first time (a few seconds).

    `extra_flags` build a variant (tests build each instruction set's path of a kernel under a namespace
    of its own, e.g. ("-mno-avx512f", "-DDISTSERVE_NS=distserve_avx2"))."""
    from torch.utils import cpp_extension  # for torch's include and library paths

    source = CSRC / f"{name}.cpp"
    text = source.read_bytes()
    flags = (*FLAGS, *extra_flags)
    key = hashlib.sha256(text + torch.__version__.encode() + " ".join(flags).encode() + _cpu_signature())
    library = cache_dir() / f"{name}-{key.hexdigest()[:16]}.so"
    if not library.exists():

        def build(out: Path) -> None:
            command = [os.environ.get("CXX", "c++"), *flags,
                       f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
                       *(f"-I{p}" for p in cpp_extension.include_paths()), str(source), "-o", str(out),
                       *(f"-L{p}" for p in cpp_extension.library_paths()), "-lc10", "-ltorch_cpu", "-lgomp"]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"building {source.name} failed ({command[0]}):\n{done.stderr[-2000:]}")

        write_atomically(library, build)
    torch.ops.load_library(library)


@functools.cache
def load_paged_attention() -> None:
    """Load distserve::paged_decode_attention (csrc/paged_attention.cpp)."""
    load_op_library("paged_attention")

    def fake(q: torch.Tensor, cache: torch.Tensor, layer: int, block_tables: torch.Tensor,
             context_lens: torch.Tensor, scale: float) -> torch.Tensor:
        return q.new_empty(q.shape)

    torch.library.register_fake("distserve::paged_decode_attention", fake)


@functools.cache
def load_layer_ops() -> None:
    """Load distserve::rms_norm and distserve::rope_ (csrc/layer_ops.cpp)."""
    load_op_library("layer_ops")
