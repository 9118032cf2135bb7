"""What the kernel test modules share: without CUDA the kernels run on Triton's CPU interpreter, with
TRITON_INTERPRET=1 set while they are imported (here) and while a module's tests launch them (the
autouse fixture `_interpreter`, which a module gets by importing it); with CUDA, compiled on the GPU."""
from __future__ import annotations

import pytest
import torch

from minipeft.kernels import triton_interpreter

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
with triton_interpreter(enabled=DEVICE == "cpu"):
    from minipeft.kernels import common  # noqa: F401 (re-exported)
    from minipeft.kernels import lora as klora  # noqa: F401
    from minipeft.kernels import nf4 as knf4  # noqa: F401


@pytest.fixture(autouse=True, scope="module")
def _interpreter():
    """The kernel launches of the importing module run with the flag set too (see triton_interpreter)."""
    with triton_interpreter(enabled=DEVICE == "cpu"):
        yield
