"""Triton kernels of minipeft (imported as minipeft.kernels): fused LoRA (lora.py), NF4 (nf4.py), shared
tiling and configs (common.py), and ahead-of-time compilation for a GPU without one (aot.py).

Importing this package does not import triton; minipeft.functional imports the kernel modules on first use.

Run from the repository root (python -c, a REPL, a script placed there), the root is on sys.path and
`import kernels` would find this folder, not the PyPI package `kernels` that transformers and bitsandbytes
import: `import transformers` then failed. Reached under that name, this file loads the PyPI package in
its place (as import statements then see it), or is no module at all when that is not installed.
"""
from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import os
import sys
from typing import Iterator

if __name__ == "kernels":  # not minipeft.kernels: the folder reached as a top-level package
    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec(__name__, _elsewhere)
    if _spec is None:
        del sys.modules[__name__]
        raise ModuleNotFoundError("No module named 'kernels' (minipeft's Triton kernels are minipeft.kernels)",
                                  name=__name__)
    sys.modules[__name__] = _module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)  # the import statement returns sys.modules' entry: the PyPI package


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
