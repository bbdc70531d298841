"""Row-wise (per-token) dynamic FP8 quantization of activations, and per-channel weight quantization.

Activations: x [M, K] or [B, L, K] bf16, last dim contiguous, rows with any stride. One pass per
row: read the row once, take amax |x| in fp32, and write
    scale = amax / 448            (fp32, one per row; a row of zeros gets scale 1)
    q     = clamp(x * (1 / scale), -448, 448) -> float8_e4m3fn
so x ~= q * scale. Returns q with x's shape (contiguous) and scale with shape x.shape[:-1] (fp32).
The scale is computed with IEEE-rounded divisions, so it equals the torch reference bit for bit.

Weights: `quantize_weight_per_channel(w)` (plain torch, done once at patch time) quantizes a
Linear weight [N, K] with one fp32 scale per output channel: (w_fp8 [N, K], w_scale [N]).

Block-wise activations (`quantize_groupwise_ref`, `dequantize_groupwise`): one scale per token and
group of ACT_GROUP = 128 consecutive features, as the FFN up GEMM emits its GELU output
(kernels/fp8_gemm.py, out_fp8=True): a tile of the GEMM sees 128 columns of a row, never the whole
row, so a per-row scale would need a second pass.

`Fp8Activation(q, scale)` carries a quantized activation between the op that produced it and the
GEMM that consumes it: q [..., K] fp8 and scale [...] (per token) or [..., K / 128] (per group).

These feed kernels/fp8_gemm.py, whose epilogue multiplies by a_scale[m] * w_scale[n].
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import check_kernel_device, check_tensor, interpreting, row_warps

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
ACT_GROUP = 128  # features per scale in block-wise activations (one MMA K-tile)


class Fp8Activation(NamedTuple):
    """An e4m3 activation and its scales: q [..., K] and scale [...] (per token) or [..., K / ACT_GROUP]."""
    q: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def grouped(self) -> bool:
        return self.scale.dim() == self.q.dim()

    def dequantize(self) -> torch.Tensor:
        """fp32 values (for references and debugging)."""
        return dequantize_groupwise(self.q, self.scale) if self.grouped else dequantize_rowwise(self.q, self.scale)


@triton.jit
def _cast_fp8(x, INTERPRET: tl.constexpr):
    """fp32 (already within +-448) -> float8_e4m3fn, rounding to nearest even.

    The GPU cast does this. The interpreter's cast mis-rounds some values, by up to a binade where
    rounding carries into the exponent (120..128 -> 64 seen with triton 3.9), so there the value is
    first rounded to e4m3 precision in fp32 (then the cast is exact): 3 mantissa bits for normals,
    a 2^-9 grid below 2^-6 (add and subtract 1.5 * 2^14 rounds to that grid, ties to even)."""
    if INTERPRET:
        bits = x.to(tl.uint32, bitcast=True)
        normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)
        sub = (x + 24576.0) - 24576.0
        x = tl.where(tl.abs(x) < 0.015625, sub, normal)
    return x.to(tl.float8e4nv)


@triton.jit(do_not_specialize=["M", "K"])
def _quant_rowwise_kernel(x_ptr, q_ptr, s_ptr, stride_xm, stride_qm, M, K,
                          FP8_MAX: tl.constexpr, BLOCK_K: tl.constexpr, INTERPRET: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    mask = offs < K
    x = tl.load(x_ptr + row * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), 0)
    # div_rn: IEEE rounding, as torch divides (the default fp32 division on the GPU is approximate).
    scale = tl.where(amax == 0.0, 1.0, tl.math.div_rn(amax, FP8_MAX))
    inv = tl.math.div_rn(1.0, scale)
    q = tl.minimum(tl.maximum(x * inv, -FP8_MAX), FP8_MAX)
    tl.store(q_ptr + row * stride_qm + offs, _cast_fp8(q, INTERPRET), mask=mask)
    tl.store(s_ptr + row, scale)


def _flat_rows(x: torch.Tensor, name: str = "x") -> torch.Tensor:
    """Check a bf16 activation [M, K] or [B, L, K]; return a 2-D [rows, K] view (no copy)."""
    if isinstance(x, torch.Tensor) and x.dim() not in (2, 3):
        raise ValueError(f"{name} must be 2-D [M, K] or 3-D [B, L, K], got shape {list(x.shape)}")
    check_tensor(name, x, dtype=torch.bfloat16)
    if x.shape[-1] == 0:
        raise ValueError(f"{name} has K = 0: nothing to quantize")
    if x.dim() == 3:
        try:
            return x.view(-1, x.shape[-1])
        except RuntimeError:
            raise ValueError(f"{name} [B, L, K] must flatten to [B*L, K] without a copy, got strides {x.stride()}") from None
    return x


def quantize_rowwise(x: torch.Tensor, *, out: torch.Tensor | None = None,
                     out_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale): q float8_e4m3fn with x's shape, scale fp32 with shape x.shape[:-1].

    out / out_scale: optional preallocated contiguous outputs of those shapes and dtypes, on x's device.
    """
    x2 = _flat_rows(x)
    M, K = x2.shape
    device = x.device
    check_kernel_device("quantize_rowwise", device)
    if out is not None:
        check_tensor("out", out, dtype=FP8_DTYPE, shape=tuple(x.shape), device=device, layout="contiguous")
    if out_scale is not None:
        check_tensor("out_scale", out_scale, dtype=torch.float32, shape=tuple(x.shape[:-1]), device=device,
                     layout="contiguous")

    if out is None:
        out = torch.empty(x.shape, dtype=FP8_DTYPE, device=device)
    if out_scale is None:
        out_scale = torch.empty(x.shape[:-1], dtype=torch.float32, device=device)
    if M == 0:
        return out, out_scale
    block_k = triton.next_power_of_2(K)
    _quant_rowwise_kernel[(M,)](
        x2, out, out_scale, x2.stride(0), K, M, K,
        FP8_MAX=FP8_MAX, BLOCK_K=block_k, INTERPRET=interpreting(),
        num_warps=row_warps(block_k),
    )
    return out, out_scale


def quantize_rowwise_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch, same arithmetic as the kernel: (q [..., K] fp8, scale [...] fp32)."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1)
    # Tensor / tensor: on CUDA, torch divides by a Python scalar as a multiply by its reciprocal,
    # which is not the IEEE division the kernel does (tl.math.div_rn).
    scale = torch.where(amax == 0, torch.ones_like(amax), amax / torch.full_like(amax, FP8_MAX))
    inv = torch.ones_like(scale) / scale
    q = (xf * inv[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize_rowwise(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q * scale in fp32 (scale has q's shape without the last dim)."""
    return q.float() * scale[..., None].float()


def quantize_groupwise_ref(x: torch.Tensor, group: int = ACT_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch: one scale per `group` consecutive features of each row (the last dim must divide
    into groups). Returns (q [..., K] fp8, scale [..., K / group] fp32), the row-wise rule per group."""
    if x.shape[-1] % group:
        raise ValueError(f"the last dim {x.shape[-1]} does not split into groups of {group}")
    q, scale = quantize_rowwise_ref(x.unflatten(-1, (x.shape[-1] // group, group)))
    return q.flatten(-2), scale


def dequantize_groupwise(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q * scale in fp32, with scale [..., K / group] (one scale per group of features)."""
    groups = scale.shape[-1]
    return (q.float().unflatten(-1, (groups, q.shape[-1] // groups)) * scale[..., None].float()).flatten(-2)


def quantize_weight_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A Linear weight [N, K] (any float dtype) -> (w_fp8 [N, K] contiguous, w_scale [N] fp32).

    One scale per output channel, amax / 448 (1 for an all-zero channel). Done once, in torch.
    """
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError(f"w must be a 2-D [N, K] tensor, got {getattr(w, 'shape', type(w).__name__)}")
    if not w.is_floating_point() or w.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise TypeError(f"w must be a bf16/fp16/fp32 tensor, got {w.dtype}")
    q, scale = quantize_rowwise_ref(w.detach())
    return q.contiguous(), scale.contiguous()


def quantize_rowwise_bytes(rows: int, dim: int) -> float:
    """Fewest bytes one call moves: read bf16 x, write fp8 q and one fp32 scale per row."""
    return rows * dim * 2.0 + rows * dim * 1.0 + rows * 4.0
