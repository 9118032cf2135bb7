"""Triton kernels of minipeft (imported as minipeft.kernels): fused LoRA (lora.py), NF4 (nf4.py), shared
tiling and configs (common.py), and ahead-of-time compilation for a GPU without one (aot.py).

Importing this package does not import triton; minipeft.functional imports the kernel modules on first use.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator


@contextlib.contextmanager
def triton_interpreter(enabled: bool = True) -> Iterator[None]:
    """TRITON_INTERPRET=1 inside the block (when enabled), its previous value restored after.

    Import the kernel modules inside it to run them on the CPU: triton 3.9 reads the flag when
    @triton.jit defines a kernel, and asserts it again when a first launch imports triton's gluon
    package, so keep the launches inside it too. If triton itself was imported before the flag was set,
    its own standard library (tl.cdiv, tl.zeros, tl.sum, ...) stays compiled-only and cannot be called
    from an interpreted kernel: the kernels here use core builtins (tl.full, integer division) only.
    """
    previous = os.environ.get("TRITON_INTERPRET")
    if enabled:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous
