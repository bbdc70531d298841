"""W8A8 FP8 GEMM with row-wise scales: the Linear layers of a LongLive block in float8_e4m3fn.

    out[M, N] = act((a_fp8[M, K] @ w_fp8[N, K]^T) * a_scale[M, None] * w_scale[None, N] + bias[N])

Shapes, layout and dtypes:
- a_fp8:   [M, K] float8_e4m3fn, K contiguous (row stride any multiple of 16): the activation,
           quantized per token by kernels/fp8_quant.quantize_rowwise.
- a_scale: [M] (or [M, 1]) float32, contiguous: one scale per token.
- w_fp8:   [N, K] float8_e4m3fn, K contiguous: the nn.Linear weight layout, quantized once per
           output channel by kernels/fp8_quant.quantize_weight_per_channel.
- w_scale: [N] (or [1, N] / [N, 1]) float32, contiguous.
- bias:    [N] bf16 or fp32, optional.
- gelu:    apply GELU with the tanh approximation (the Wan FFN's activation) in the epilogue.
- out:     [M, N] bf16, N contiguous (any row stride), optional preallocated.
K must be a multiple of 16 (the fp8 MMA's K step) and the operands 16-byte aligned.

Accumulation is fp32 (tl.dot on fp8 operands: wgmma on Hopper); the scales, bias and GELU are
applied to the fp32 accumulator and the result is rounded to bf16 once.

`fp8_linear(x, w_fp8, w_scale, bias, gelu)` quantizes a bf16 activation [..., K] and runs the GEMM.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import cast_bf16, interpreting
from .fp8_quant import FP8_DTYPE, quantize_rowwise

# The interpreter runs one fixed small config: autotuning there would time every config in numpy,
# and small tiles exercise the ragged M/N tails and the masked K tail at test sizes.
_INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}


@triton.jit
def _gelu_tanh(x):
    # tanh(u) = 1 - 2 / (exp(2u) + 1).
    # |u| >= 15 already gives tanh = +-1 in fp32; the clamp keeps exp2 finite.
    u = tl.minimum(tl.maximum(0.7978845608028654 * (x + 0.044715 * x * x * x), -15.0), 15.0)
    t = 1.0 - 2.0 / (tl.math.exp2(u * (2.0 * 1.4426950408889634)) + 1.0)
    return 0.5 * x * (1.0 + t)


@triton.jit(do_not_specialize=["M"])
def _fp8_gemm_kernel(
    a_ptr, w_ptr, as_ptr, ws_ptr, bias_ptr, o_ptr,
    M, N, K,
    stride_am, stride_wn, stride_om,
    M_BUCKET: tl.constexpr,  # autotune key only
    HAS_BIAS: tl.constexpr, GELU: tl.constexpr, EVEN_K: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped ("swizzled") order: GROUP_M row tiles share each column tile while it is in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Out-of-range rows/columns read row 0 / column 0 instead of masking every load: their results
    # are never stored.
    rows_a = tl.where(offs_m < M, offs_m, 0).to(tl.int64)
    rows_w = tl.where(offs_n < N, offs_n, 0).to(tl.int64)
    a_ptrs = a_ptr + rows_a[:, None] * stride_am + offs_k[None, :]
    w_ptrs = w_ptr + rows_w[None, :] * stride_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N], K-major

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_ok = offs_k < K - k0 * BLOCK_K
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(a, w, acc)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    m_ok = offs_m < M
    n_ok = offs_n < N
    a_s = tl.load(as_ptr + offs_m, mask=m_ok, other=0.0)
    w_s = tl.load(ws_ptr + offs_n, mask=n_ok, other=0.0)
    acc = acc * a_s[:, None] * w_s[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if GELU:
        acc = _gelu_tanh(acc)
    o_ptrs = o_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(o_ptrs, cast_bf16(acc, INTERPRET), mask=m_ok[:, None] & n_ok[None, :])


def _configs() -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm in (64, 128)
        for bn in (128, 256)
        for w in (4, 8)
        for s in (3, 4)
    ]


def _prune_configs(configs, named_args, **kwargs):
    # Shared-memory overflow needs no rule: the autotuner skips configs that raise OutOfResources.
    args = {**named_args, **kwargs}
    m_bucket, n = args["M_BUCKET"], args["N"]
    kept = []
    for cfg in configs:
        bm, bn, w = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps
        # 64-row tiles only pay when 128-row tiles are too few to fill 132 SMs.
        if bm == 64 and m_bucket >= 2048:
            continue
        # A 128-row tile wants two warpgroups; a 128x256 fp32 accumulator does not fit in one.
        if bm == 128 and w == 4:
            continue
        if bn == 256 and n <= 128:
            continue
        kept.append(cfg)
    return kept or configs[:1]


_fp8_gemm_tuned = triton.autotune(
    configs=_configs(),
    key=["M_BUCKET", "N", "K", "HAS_BIAS", "GELU"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_fp8_gemm_kernel)


def _check_config(config: dict) -> dict:
    keys = {"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"}
    if not isinstance(config, dict) or not keys <= set(config) or not set(config) <= keys | {"num_warps", "num_stages"}:
        raise ValueError(f"config must hold {sorted(keys)} and optionally num_warps, num_stages; got {config!r}")
    for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        if config[key] not in (16, 32, 64, 128, 256):
            raise ValueError(f"config {key}={config[key]} must be a power of two in [16, 256]")
    return config


def _check_tensor(name, t, dtype, shape, device, *, last_contiguous=True, contiguous=False):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (where a_fp8 is)")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {t.stride()}")
    if last_contiguous and t.dim() == 2 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension, got strides {t.stride()}")


def _check_aligned(name, t, elem_bytes):
    if t.data_ptr() % 16 or (t.shape[0] > 1 and (t.stride(0) * elem_bytes) % 16):
        raise ValueError(f"{name} must be 16-byte aligned (pointer and row stride), "
                         f"got pointer offset {t.data_ptr() % 16} and row stride {t.stride(0)}")


def _vector(name, t, n, device):
    """Accept [n], [n, 1] or [1, n] float32 contiguous; return the 1-D view."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() == 2 and 1 in t.shape and t.numel() == n:
        t = t.reshape(n)
    _check_tensor(name, t, torch.float32, (n,), device, contiguous=True)
    return t


def fp8_gemm(a_fp8: torch.Tensor, w_fp8: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
             bias: torch.Tensor | None = None, *, gelu: bool = False, out: torch.Tensor | None = None,
             config: dict | None = None) -> torch.Tensor:
    """out [M, N] bf16 = act((a_fp8 @ w_fp8.T) * a_scale[:, None] * w_scale[None, :] + bias).

    See the module docstring for layouts. config ({"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M",
    "num_warps", "num_stages"}) skips autotuning on the GPU; the interpreter always runs small tiles.
    No host sync: capturable in a CUDA graph once autotuned.
    """
    if not isinstance(a_fp8, torch.Tensor):
        raise TypeError(f"a_fp8 must be a torch.Tensor, got {type(a_fp8).__name__}")
    if a_fp8.dim() != 2:
        raise ValueError(f"a_fp8 must be 2-D [M, K], got shape {list(a_fp8.shape)}")
    if not isinstance(w_fp8, torch.Tensor) or w_fp8.dim() != 2:
        raise ValueError(f"w_fp8 must be a 2-D [N, K] tensor, got {getattr(w_fp8, 'shape', type(w_fp8).__name__)}")
    device = a_fp8.device
    M, K = a_fp8.shape
    N = w_fp8.shape[0]
    _check_tensor("a_fp8", a_fp8, FP8_DTYPE, (M, K), device)
    _check_tensor("w_fp8", w_fp8, FP8_DTYPE, (N, w_fp8.shape[1]), device)
    if w_fp8.shape[1] != K:
        raise ValueError(f"a_fp8 [M, K={K}] and w_fp8 [N, K={w_fp8.shape[1]}] disagree on K")
    if K == 0 or K % 16:
        raise ValueError(f"K={K} must be a positive multiple of 16")
    if N == 0:
        raise ValueError("w_fp8 has N = 0 output channels")
    _check_aligned("a_fp8", a_fp8, 1)
    _check_aligned("w_fp8", w_fp8, 1)
    a_scale = _vector("a_scale", a_scale, M, device)
    w_scale = _vector("w_scale", w_scale, N, device)
    if bias is not None:
        _check_tensor("bias", bias, (torch.bfloat16, torch.float32), (N,), device, contiguous=True)
    if out is None:
        out = torch.empty((M, N), dtype=torch.bfloat16, device=device)
    else:
        _check_tensor("out", out, torch.bfloat16, (M, N), device)
    if M == 0:
        return out

    interpret = interpreting()
    args = (a_fp8, w_fp8, a_scale, w_scale, bias if bias is not None else w_scale, out,
            M, N, K, a_fp8.stride(0), w_fp8.stride(0), out.stride(0))
    meta = dict(M_BUCKET=min(triton.next_power_of_2(M), 8192), HAS_BIAS=bias is not None, GELU=bool(gelu),
                INTERPRET=interpret)
    if config is not None:
        config = _check_config(config)
    if interpret or config is not None:
        cfg = dict(_INTERPRET_CONFIG if interpret else config)
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
        _fp8_gemm_kernel[grid](*args, **meta, EVEN_K=K % cfg["BLOCK_K"] == 0, **cfg)
    else:
        def grid(cfg):
            return (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
        # All autotune configs use BLOCK_K = 128.
        _fp8_gemm_tuned[grid](*args, **meta, EVEN_K=K % 128 == 0)
    return out


def fp8_linear(x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
               *, gelu: bool = False) -> torch.Tensor:
    """x [..., K] bf16 (2-D or 3-D) -> [..., N] bf16: quantize x per token, then fp8_gemm."""
    q, s = quantize_rowwise(x)
    K = x.shape[-1]
    out = fp8_gemm(q.view(-1, K), w_fp8, s.view(-1), w_scale, bias, gelu=gelu)
    return out.view(*x.shape[:-1], w_fp8.shape[0])


def fp8_gemm_ref(a_fp8, w_fp8, a_scale, w_scale, bias=None, *, gelu: bool = False) -> torch.Tensor:
    """The EMULATED path: dequantize both operands to fp32, matmul in fp32; returns fp32 [M, N]."""
    a = a_fp8.float() * a_scale.reshape(-1, 1).float()
    w = w_fp8.float() * w_scale.reshape(-1, 1).float()
    out = a @ w.t()
    if bias is not None:
        out = out + bias.float()
    if gelu:
        out = F.gelu(out, approximate="tanh")
    return out


def fp8_gemm_flops(m: int, n: int, k: int) -> float:
    return 2.0 * m * n * k


def fp8_gemm_bytes(m: int, n: int, k: int) -> float:
    """Fewest bytes one call moves: read both fp8 operands and the scales once, write bf16 out."""
    return m * k + n * k + 4.0 * (m + n) + 2.0 * m * n
