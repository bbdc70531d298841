"""RMSNorm with the stock LongLive rounding points, one pass per row.

x [B, L, C] bf16 (last dim contiguous), weight [C] bf16 -> [B, L, C] bf16:
    bf16( bf16( x * rsqrt(mean(x^2) + eps) ) * weight )
with the statistics in fp32, as `WanRMSNorm` computes them (x.float(), normalise, cast back to the
input dtype, then the bf16 multiply by the weight). The stock path spends six passes over the
activation on it, two of them in fp32; this is one read and one write.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_kernel_device, check_tensor, round_bf16, row_warps, rows_per_program


@triton.jit(do_not_specialize=["L", "C"])
def _rms_norm_kernel(x_ptr, w_ptr, o_ptr, stride_xb, stride_xl, stride_ob, stride_ol, L, C, eps,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    b = tl.program_id(1).to(tl.int64)
    r = rows.to(tl.int64)[:, None]
    offs = tl.arange(0, BLOCK_C)[None, :]
    cmask = offs < C
    mask = (rows < L)[:, None] & cmask
    x = tl.load(x_ptr + b * stride_xb + r * stride_xl + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, 1) / C + eps)
    w = tl.load(w_ptr + offs, mask=cmask, other=0.0).to(tl.float32)
    y = round_bf16(round_bf16(x * rstd[:, None]) * w)
    tl.store(o_ptr + b * stride_ob + r * stride_ol + offs, y.to(tl.bfloat16), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """WanRMSNorm(x) for bf16 x [B, L, C] and weight [C]; see the module docstring."""
    check_tensor("x", x, dtype=torch.bfloat16, shape=("B", "L", "C"))
    check_kernel_device("rms_norm", x.device)
    B, L, C = x.shape
    check_tensor("weight", weight, dtype=torch.bfloat16, shape=(C,), device=x.device)
    if out is not None:
        check_tensor("out", out, dtype=torch.bfloat16, shape=(B, L, C), device=x.device)

    if out is None:
        out = torch.empty_like(x)
    if B == 0 or L == 0:
        return out
    block_c = triton.next_power_of_2(C)
    block_r = rows_per_program(block_c)
    _rms_norm_kernel[(triton.cdiv(L, block_r), B)](
        x, weight, out, x.stride(0), x.stride(1), out.stride(0), out.stride(1), L, C, eps,
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=row_warps(block_c))
    return out


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """WanRMSNorm.forward, literally."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)).type_as(x) * weight


def rms_norm_bytes(batch: int, tokens: int, dim: int) -> float:
    return 2.0 * 2 * batch * tokens * dim
