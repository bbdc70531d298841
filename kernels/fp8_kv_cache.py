"""The FP8 KV cache: its layout, allocation, checks, torch quantizers and dequantization, shared by
the kernel that writes it (kernels/kv_quant_append.py) and the attention that reads it
(kernels/window_attention.py).

- k8 [B, C, H, D] e4m3 with k_scale [H] fp32: one static scale per head, `k_head_scale`, derived
  from the k RMSNorm weight, so that no roped key can overflow e4m3.
- v8 [B, C, H, D] e4m3, a view of a [B, H, D, C'] buffer (tokens contiguous), C' = C rounded up to
  16 bytes (the padding is never read). v_scale [B, ceil(C / V_GROUP), H] fp32: one scale per group
  of V_GROUP = 128 physical slots and head. A scale of 0 marks a group that holds nothing (its v8
  are zero); attention reads it as 1.
Why this layout and these scales: docs/fp8-kv-cache.md.
"""
from __future__ import annotations

import math

import torch
import triton

from ._common import check_tensor
from .fp8_quant import FP8_DTYPE, FP8_MAX

V_GROUP = 128  # physical slots per v scale, and the FP8 attention kernel's key tile


def k_head_scale(norm_k_weight: torch.Tensor, heads: int) -> torch.Tensor:
    """The static per-head k scale [H] fp32 (module docstring): sqrt(H*D) * max|w| of the head, with
    margin for the bf16 roundings of the norm, the weight product and the roped k, over 448."""
    HD = norm_k_weight.numel()
    if HD % heads:
        raise ValueError(f"norm_k_weight has {HD} elements, not a multiple of {heads} heads")
    wmax = norm_k_weight.detach().float().abs().reshape(heads, -1).amax(dim=1)
    scale = wmax * math.sqrt(HD) * (1 + 2.0 ** -7) ** 3 / FP8_MAX
    return torch.where(scale > 0, scale, torch.ones_like(scale)).contiguous()


def _v_buffer(batch: int, slots: int, heads: int, head_dim: int, device) -> torch.Tensor:
    """A zero e4m3 [B, C, H, D] view of a [B, H, D, C'] buffer, C' = C rounded up to 16 (rows
    16-byte aligned for TMA; the padding is never read)."""
    buf = torch.zeros(batch, heads, head_dim, -(-slots // 16) * 16, dtype=FP8_DTYPE, device=device)
    return buf[..., :slots].permute(0, 3, 1, 2)


def fp8_kv_cache(batch: int, slots: int, heads: int, head_dim: int, device) -> tuple[torch.Tensor, ...]:
    """An empty FP8 cache: (k8 [B, C, H, D], v8 [B, C, H, D] view of [B, H, D, C'], v_scale
    [B, ceil(C / 128), H]), all zero (a zero v scale marks an empty group)."""
    k8 = torch.zeros(batch, slots, heads, head_dim, dtype=FP8_DTYPE, device=device)
    v8 = _v_buffer(batch, slots, heads, head_dim, device)
    v_scale = torch.zeros(batch, triton.cdiv(slots, V_GROUP), heads, dtype=torch.float32, device=device)
    return k8, v8, v_scale


def check_fp8_cache(k8: torch.Tensor, k_scale: torch.Tensor, v8: torch.Tensor, v_scale: torch.Tensor,
                    device: torch.device) -> None:
    """The FP8 cache layout of the module docstring; errors name the tensor and what is wrong."""
    check_tensor("k8", k8, dtype=FP8_DTYPE, shape=("B", "C", "H", "D"), device=device, layout="contiguous")
    check_tensor("v8", v8, dtype=FP8_DTYPE, shape=("B", "C", "H", "D"), device=device, layout="any")
    B, C, H, D = k8.shape
    if v8.shape != k8.shape:
        raise ValueError(f"k8 {list(k8.shape)} and v8 {list(v8.shape)} differ in shape")
    # Rows of V^T may be padded past C (so that they start 16-byte aligned, as TMA wants); strides
    # of size-1 dimensions do not matter (torch may report any).
    row = v8.stride(3) if D > 1 else C
    if row < C or any(n > 1 and st != want for n, st, want in zip(v8.shape, v8.stride(), (H * D * row, 1, D * row, row))):
        raise ValueError(f"v8 must be a [B, C, H, D] view of a contiguous [B, H, D, >= C] buffer (tokens contiguous; "
                         f"see fp8_kv_cache), got strides {v8.stride()}")
    check_tensor("k_scale", k_scale, dtype=torch.float32, shape=(H,), device=device)
    check_tensor("v_scale", v_scale, dtype=torch.float32, shape=(B, triton.cdiv(C, V_GROUP), H), device=device)


def dequantize_fp8_cache(k8, k_scale, v8, v_scale) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 [B, C, H, D] keys and values of the FP8 cache (module docstring's layout)."""
    C = k8.shape[1]
    k = k8.float() * k_scale[None, None, :, None]
    v = v8.float() * v_scale.repeat_interleave(V_GROUP, dim=1)[:, :C, :, None]
    return k, v


def quantize_rows_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (e4m3 [..., D], fp32 scale [...]), one scale per last-dim row (torch's division
    tensor by tensor: on CUDA torch divides by a Python scalar as a multiply by its reciprocal)."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1)
    scale = torch.where(amax == 0, torch.ones_like(amax), amax / torch.full_like(amax, FP8_MAX))
    q = (xf * (torch.ones_like(scale) / scale)[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def quantize_k_ref(k: torch.Tensor, k_scale: torch.Tensor) -> torch.Tensor:
    """k [..., H, D] (bf16 values) -> e4m3 with the static per-head scales [H]."""
    inv = torch.ones_like(k_scale) / k_scale
    return (k.float() * inv[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_v_groups_ref(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole bf16 V cache [B, C, H, D] -> (v8 view of [B, H, D, C], v_scale [B, ceil(C/128), H]),
    one scale per group of 128 slots and head (as if every group were written at once)."""
    B, C, H, D = v.shape
    G = triton.cdiv(C, V_GROUP)
    vp = torch.nn.functional.pad(v.float(), (0, 0, 0, 0, 0, G * V_GROUP - C))
    scale = vp.reshape(B, G, V_GROUP, H, D).abs().amax(dim=(2, 4)) / FP8_MAX
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale)).repeat_interleave(V_GROUP, dim=1)[:, :C]
    v8 = _v_buffer(B, C, H, D, v.device)
    v8.copy_((v.float() * inv[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE))
    return v8, scale.contiguous()
