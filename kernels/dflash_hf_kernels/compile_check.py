"""Ahead-of-time compile every Triton verification kernel for a GPU architecture, without a GPU.

The interpreter (TRITON_INTERPRET=1) checks what the kernels compute but not whether they compile: type
promotion and scalar control flow are only checked by the real compiler. This runs that compiler
(through PTX to a cubin) for each kernel specialisation the wrappers launch.

    TRITON_INTERPRET= python -m dflash_hf.kernels.compile_check [--arch 90] [--verbose]

Must run in a process where TRITON_INTERPRET is unset (interpreted kernels cannot be compiled).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

LOGIT_DTYPES = ("*bf16", "*fp16", "*fp32")


def _specialisations() -> list[tuple[str, dict[str, str], dict[str, Any], int]]:
    """(kernel name, runtime-argument types, constexprs, num_warps) for every variant the wrappers launch."""
    # Strides and sizes are i32 for ordinary shapes; Triton passes i64 only for huge values (covered by one case).
    out: list[tuple[str, dict[str, str], dict[str, Any], int]] = []
    for ldt in LOGIT_DTYPES:
        for ragged, gumbel in ((True, False), (True, True), (False, True)):
            out.append((
                "_tile_argmax_kernel",
                dict(logits_ptr=ldt, stride_lr="i64", stride_lt="i32", num_drafts_ptr="*i64", positions_ptr="*i64",
                     tile_val_ptr="*fp32", tile_idx_ptr="*i32", key="i32", T="i32", V="i32", NT="i32"),
                dict(RAGGED=ragged, GUMBEL=gumbel, BLOCK_V=4096),
                8,
            ))  # fmt: skip
        ptrs = dict(target_ptr=ldt, stride_tr="i32", stride_tt="i32", draft_ptr=ldt, stride_dr="i32", stride_dt="i32")
        out.append(("_ratio_stats_kernel",
                    dict(ptrs, num_drafts_ptr="*i64", stats_ptr="*fp32", T="i32", V="i32", NT="i32"),
                    dict(BLOCK_V=4096), 8))  # fmt: skip
        out.append(("_ratio_accept_kernel",
                    dict(ptrs, tokens_ptr="*i64", stride_xr="i32", num_drafts_ptr="*i64", positions_ptr="*i64",
                         stats_ptr="*fp32", num_accepted_ptr="*i64", row_stats_ptr="*fp32", key_accept="i32",
                         T="i32", V="i32", NT="i32"),
                    dict(BLOCK_T=16, BLOCK_NT=64), 4))  # fmt: skip
        out.append(("_residual_tile_kernel",
                    dict(ptrs, num_drafts_ptr="*i64", positions_ptr="*i64", num_accepted_ptr="*i64",
                         row_stats_ptr="*fp32", res_val_ptr="*fp32", res_idx_ptr="*i32", fb_val_ptr="*fp32",
                         fb_idx_ptr="*i32", key_residual="i32", key_target="i32", T="i32", V="i32", NT="i32"),
                    dict(BLOCK_V=4096), 8))  # fmt: skip
    out.append(("_merge_walk_kernel",
                dict(tile_val_ptr="*fp32", tile_idx_ptr="*i32", draft_ptr="*i64", stride_dr="i32",
                     num_drafts_ptr="*i64", num_accepted_ptr="*i64", next_token_ptr="*i64", T="i32", NT="i32"),
                dict(BLOCK_T=16, BLOCK_NT=64), 4))  # fmt: skip
    for fb in (False, True):
        out.append(("_merge_tiles_kernel",
                    dict(tile_val_ptr="*fp32", tile_idx_ptr="*i32", fb_val_ptr="*fp32", fb_idx_ptr="*i32",
                         out_ptr="*i64", NT="i32"),
                    dict(HAS_FALLBACK=fb, BLOCK_NT=64), 1))  # fmt: skip
    return out


def compile_all(arch: int = 90, verbose: bool = False) -> int:
    """Compile every specialisation for sm_<arch>; return how many compiled. Raises on the first failure."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import triton_verify

    if triton_verify.interpreter_active():
        raise RuntimeError("TRITON_INTERPRET=1 is set: interpreted kernels cannot be compiled; unset it")
    target = GPUTarget("cuda", arch, 32)
    count = 0
    for name, types, constexprs, num_warps in _specialisations():
        fn = getattr(triton_verify, name)
        signature = {arg: types.get(arg, "constexpr") for arg in fn.arg_names}
        compiled = triton.compile(
            ASTSource(fn=fn, signature=signature, constexprs=constexprs),
            target=target,
            options={"num_warps": num_warps},
        )
        if "cubin" not in compiled.asm:
            raise RuntimeError(f"{name} {constexprs}: no cubin produced")
        count += 1
        if verbose:
            print(f"ok  {name:<22} {constexprs}")
    return count


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dflash_hf.kernels.compile_check", description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability as an int: 90 (H100/H200), 100 (B200)")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    n = compile_all(args.arch, args.verbose)
    print(f"compiled {n} kernel specialisations for sm_{args.arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
