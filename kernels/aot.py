"""Ahead-of-time compilation of the kernels for an NVIDIA target, on a machine without a GPU.

    python -m minipeft.kernels.aot [--arch 90] [--all]

The interpreter (TRITON_INTERPRET=1) proves the kernels' arithmetic on the CPU but runs them as Python, so
it accepts code Triton's compiler rejects. This compiles kernel variants through the real pipeline (Triton
front end, MLIR, LLVM, the ptxas bundled with triton) to a cubin for sm_<arch>: what a first launch on
that GPU would do. It must run in a process without TRITON_INTERPRET (tests/test_kernels_lora.py starts
one). Default: one variant per code path; --all: every combination of dtype, dropout, U strategy, weight.
"""
from __future__ import annotations

import argparse
import itertools
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import common, lora, nf4

# (compute dtype, adapter dtype, DROPOUT, XA_IN_LOOP, W_NF4): each DROPOUT mode, both U strategies, both
# weight formats, float32 adapters under bf16, and a float32 GEMM.
DEFAULT_VARIANTS = [("bf16", "bf16", 1, True, False), ("bf16", "fp32", 2, False, True), ("fp32", "fp32", 0, True, True)]
ALL_VARIANTS = list(itertools.product(("bf16", "fp16", "fp32"), ("same", "fp32"), (0, 1, 2), (True, False),
                                      (False, True)))


def _lora_source(dtype: str, lora_dtype: str, dropout: int, xa_in_loop: bool, w_nf4: bool, config: triton.Config):
    fn = lora._lora_matmul_kernel.fn  # the JITFunction under the autotuner
    lora_dtype = dtype if lora_dtype == "same" else lora_dtype
    constexprs = dict(DROPOUT=dropout, XA_IN_LOOP=xa_in_loop, HAS_BIAS=True, R_PAD=16, W_NF4=w_nf4, NF4_BLOCKSIZE=64,
                      NF4_DOUBLE_QUANT=True, PRECISION="ieee", UPCAST=False, **config.kwargs)
    pointers = dict(x_ptr=dtype, w_ptr=dtype, a_ptr=lora_dtype, b_ptr=lora_dtype, u_ptr=lora_dtype, mask_ptr="u8",
                    bias_ptr=dtype, out_ptr=dtype, q_data="u8", q_absmax="u8", q_nested="fp32", q_code="fp32",
                    q_dyn="fp32")
    scalars = ("scaling", "keep_scale", "q_offset")
    signature = {name: "constexpr" if name in constexprs else "*" + pointers[name] if name in pointers
                 else "fp32" if name in scalars else "i32" for name in fn.arg_names}
    return ASTSource(fn, signature, constexprs)


def _dequantize_source(dtype: str):
    constexprs = dict(BLOCKSIZE=64, DOUBLE_QUANT=True, UPCAST=False, BLOCK=nf4.DEQUANT_BLOCK)
    signature = {"data_ptr": "*u8", "absmax_ptr": "*u8", "nested_ptr": "*fp32", "code_ptr": "*fp32",
                 "dyn_ptr": "*fp32", "out_ptr": "*" + dtype, "n": "i32", "offset": "fp32",
                 **{name: "constexpr" for name in constexprs}}
    return ASTSource(nf4._dequantize_nf4_kernel, signature, constexprs)


def compile_variants(arch: int = 90, variants=DEFAULT_VARIANTS) -> int:
    """Compile the LoRA GEMM variants (with the largest config) and the dequantization kernel (bf16) to
    cubins for sm_<arch>; returns how many were compiled, raising on the first failure."""
    if common.INTERPRET:
        raise RuntimeError("minipeft.kernels.aot needs a process without TRITON_INTERPRET=1")
    target = GPUTarget("cuda", arch, 32)
    config = common.MATMUL_CONFIGS[-2]
    for variant in variants:
        options = dict(num_warps=config.num_warps, num_stages=config.num_stages, enable_fp_fusion=not variant[-1])
        if "cubin" not in triton.compile(_lora_source(*variant, config), target=target, options=options).asm:
            raise RuntimeError(f"no cubin for {variant}")
    triton.compile(_dequantize_source("bf16"), target=target, options=dict(enable_fp_fusion=False))
    return len(variants) + 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Compile minipeft's kernels for a GPU, without one.")
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (80: A100, 90: H100)")
    parser.add_argument("--all", action="store_true", help=f"all {len(ALL_VARIANTS)} variants")
    args = parser.parse_args(argv)
    n = compile_variants(args.arch, ALL_VARIANTS if args.all else DEFAULT_VARIANTS)
    print(f"compiled {n} kernels for sm_{args.arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
