"""FP8 Linear layers: W8A8 e4m3 GEMMs (kernels/fp8_gemm.py) in place of LongLive's bf16 nn.Linear.

Weights are quantized once, at patch time (patch_model merges LoRA adapters before any patch runs),
with one fp32 scale per output channel; activations are quantized per token. Where the producer of
an activation can write it in FP8 itself, no quantization pass reads it again:
- the block's adaln (patches/fused_block.py) writes the self-attention input and the FFN input in
  FP8 when the consumer `accepts_fp8`;
- the FFN's up GEMM writes its GELU output in FP8 with one scale per token and 128 columns, which
  the down GEMM applies per K-tile (`fp8_ffn_fused`; else bf16 out and a per-token quantization pass);
- the FFN's down GEMM adds the block's gated residual in its epilogue (x + y * gate, in place).
Any other FP8 layer quantizes its bf16 input with the Triton quantizer (one extra pass).

Three patches, all enabled by `fp8_linear`, applied after the other patches:
- fp8_ffn:    the FFN Sequential(Linear, GELU(tanh), Linear) -> FP8FeedForward;
- fp8_qkv:    WindowSelfAttention's fused q|k|v projection -> one FP8 GEMM (q, k, v become FP8Linear
              views of the fused FP8 weight, so the state dict keeps their names and no copy exists);
- fp8_linear: every other plain nn.Linear -> FP8Linear.
A layer whose path matches a pattern of `fp8_exclude` stays bf16, and the report lists it. FP8 needs
FP8 tensor cores (compute capability >= 8.9): elsewhere every layer stays bf16 with that reason.
"""
from __future__ import annotations

import fnmatch

import torch
import torch.nn as nn

from ..kernels.fp8_gemm import fp8_linear, fp8_supported, tma_supported
from ..kernels.fp8_quant import ACT_GROUP, FP8_DTYPE, Fp8Activation, quantize_weight_per_channel
from .base import Patch, PatchSkip, require_kernel_device
from .window_self_attention import WindowSelfAttention


def gemm_options(config, device: torch.device) -> dict:
    """fp8_gemm's kernel options from the config; TMA only where the device has it."""
    tuning = config.tuning
    return dict(use_tma=bool(tuning.fp8_gemm_tma) and tma_supported(device), flatten=tuning.fp8_gemm_flatten,
                warp_specialize=tuning.fp8_gemm_warp_specialize)


def _check_weight(name: str, linear: nn.Module) -> None:
    """PatchSkip unless `linear` is a plain bf16 nn.Linear the FP8 GEMM can serve here."""
    if type(linear) is not nn.Linear:
        raise PatchSkip(f"{name} is a {type(linear).__name__}, not a plain nn.Linear (merge LoRA adapters first)")
    weight = linear.weight
    if weight.dtype != torch.bfloat16:
        raise PatchSkip(f"the FP8 GEMM writes bf16; {name} is {weight.dtype}")
    require_kernel_device(weight)
    if not fp8_supported(weight.device):
        raise PatchSkip(f"FP8 tensor cores need compute capability >= 8.9 (Ada, Hopper); "
                        f"this is {_capability(weight.device)}")
    if linear.in_features % 16:
        raise PatchSkip(f"{name} has {linear.in_features} input features, not a multiple of 16 (the fp8 MMA's K step)")


def _capability(device: torch.device) -> str:
    if device.type != "cuda":
        return f"a {device.type} device"
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} of compute capability {major}.{minor}"


class Fp8Weight:
    """A quantized weight and the call that applies it: x (bf16 [..., K] or an Fp8Activation) -> y.

    A plain object, not a module: where the weight is also reachable through FP8Linear views (the
    fused q|k|v), registering it again would put it twice in the state dict.
    """

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, options: dict):
        self.weight, self.scale, self.bias, self.options = weight, scale, bias, options

    def __call__(self, x, *, gelu: bool = False, out_fp8: bool = False, residual=None, gate=None, out=None):
        if not isinstance(x, Fp8Activation) and x.dtype != torch.bfloat16:
            raise TypeError(f"an FP8 Linear takes bf16 or an Fp8Activation, got {x.dtype}")
        return fp8_linear(x, self.weight, self.scale, self.bias, gelu=gelu, out_fp8=out_fp8, residual=residual,
                          gate=gate, out=out, **self.options)


class FP8Linear(nn.Module):
    """nn.Linear as a W8A8 FP8 GEMM. Buffers: weight [N, K] float8_e4m3fn, weight_scale [N] fp32
    (one per output channel); bias [N] bf16 as in the stock layer. Output bf16.

    forward(x) takes a bf16 tensor [..., K] (quantized per token by the Triton quantizer) or an
    Fp8Activation from a fused producer; residual/gate/out: the gated residual epilogue of fp8_linear.
    """
    accepts_fp8 = True

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, options: dict):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.options = options

    @classmethod
    def from_linear(cls, linear: nn.Module, config, name: str = "the layer") -> "FP8Linear":
        _check_weight(name, linear)
        with torch.no_grad():
            weight, scale = quantize_weight_per_channel(linear.weight)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(weight, scale, bias, gemm_options(config, linear.weight.device))

    def forward(self, x, *, gelu: bool = False, out_fp8: bool = False, residual=None, gate=None, out=None):
        return Fp8Weight(self.weight, self.weight_scale, self.bias, self.options)(
            x, gelu=gelu, out_fp8=out_fp8, residual=residual, gate=gate, out=out)

    def _apply(self, fn, recurse=True):
        # nn.Module.to(dtype), .float() and .half() cast every floating-point buffer: the e4m3 weight and
        # its fp32 scales take part as their integer bits (moved by .to(device), never cast), then are
        # viewed back, so LongLive's pipeline.to(dtype=bf16) after patching leaves them as they are.
        bits = {"weight": (torch.uint8, FP8_DTYPE), "weight_scale": (torch.int32, torch.float32)}
        for name, (as_bits, _) in bits.items():
            self._buffers[name] = self._buffers[name].view(as_bits)
        try:
            return super()._apply(fn, recurse)
        finally:
            for name, (_, dtype) in bits.items():
                self._buffers[name] = self._buffers[name].view(dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"e4m3 weight with per-channel scales, {_options_repr(self.options)}")


def _options_repr(options: dict) -> str:
    if not options["use_tma"]:
        return "pointer-load kernel"
    return (f"persistent TMA kernel (flatten={options['flatten']}, "
            f"warp_specialize={options['warp_specialize']})")


class FP8FeedForward(nn.Sequential):
    """The Wan FFN (Linear, GELU(tanh), Linear) on FP8 GEMMs, GELU in the up GEMM's epilogue.

    fused: the up GEMM writes the hidden activation in FP8 with one scale per token and 128 columns,
    and the down GEMM applies those scales per K-tile; else it writes bf16, which the down layer
    quantizes per token. Indices 0, 1, 2 as in the stock Sequential, so the state dict keeps its names.

    forward(x, residual=x_block, gate=g, out=x_block) also adds the block's gated residual in the down
    GEMM's epilogue (`fuses_residual`: patches/fused_block.py asks for it), bit for bit what the
    separate adaln pass computed, without writing and re-reading the FFN output.
    """
    accepts_fp8 = True
    fuses_residual = True

    def __init__(self, up: FP8Linear, act: nn.Module, down: FP8Linear, fused: bool):
        super().__init__(up, act, down)
        self.fused = fused

    @classmethod
    def from_stock(cls, ffn: nn.Sequential, config) -> "FP8FeedForward":
        up, act, down = ffn
        fused = config.fp8_ffn_fused
        if fused and up.out_features % ACT_GROUP:
            raise PatchSkip(f"the fused FFN needs a hidden size that is a multiple of {ACT_GROUP}, got "
                            f"{up.out_features} (fp8_ffn_fused: false serves it)")
        return cls(FP8Linear.from_linear(up, config, "ffn.0"), act, FP8Linear.from_linear(down, config, "ffn.2"), fused)

    def forward(self, x, *, residual=None, gate=None, out=None):
        h = self[0](x, gelu=True, out_fp8=self.fused)
        return self[2](h, residual=residual, gate=gate, out=out)

    def extra_repr(self) -> str:
        return "GELU in the up GEMM, hidden activation " + (
            f"in FP8 with per-{ACT_GROUP}-column scales" if self.fused else "in bf16, quantized per token")


def _excluded(path: str, config) -> str | None:
    for pattern in config.fp8_exclude:
        if fnmatch.fnmatchcase(path, pattern):
            return f"kept bf16 by fp8_exclude pattern {pattern!r}"
    return None


def _keep_any(*suffixes: str):
    """A Patch.keep rule: keep the module if any of its Linear layers (path + suffix) is excluded."""
    def keep(path: str, module: nn.Module, config) -> str | None:
        for suffix in suffixes:
            reason = _excluded(f"{path}{suffix}", config)
            if reason:
                return reason
        return None
    return keep


def _is_ffn(m: nn.Module) -> bool:
    """Sequential(Linear, GELU(tanh), Linear): the Wan FFN (and, by structure, the text embedding)."""
    return (type(m) is nn.Sequential and len(m) == 3 and isinstance(m[0], nn.Linear) and isinstance(m[2], nn.Linear)
            and isinstance(m[1], nn.GELU) and m[1].approximate == "tanh")


def _fp8_qkv(attn: WindowSelfAttention, config) -> WindowSelfAttention:
    """Configure the attention in place: its fused q|k|v GEMM in FP8; q, k, v become views of it."""
    for name in ("q", "k", "v"):
        _check_weight(name, getattr(attn, name))
    with torch.no_grad():
        weight, scale = quantize_weight_per_channel(attn._qkv_weight)
    bias = attn._qkv_bias
    options = gemm_options(config, weight.device)
    d = attn.dim
    for i, name in enumerate(("q", "k", "v")):
        rows = slice(i * d, (i + 1) * d)
        setattr(attn, name, FP8Linear(weight[rows], scale[rows], bias[rows], options))
    attn.qkv_fp8 = Fp8Weight(weight, scale, bias, options)
    # The bf16 copy is no longer read; dropping it frees the memory (the q, k, v views went above).
    attn._qkv_weight = None
    return attn


def _describe(config) -> str:
    tuning = config.tuning
    opts = dict(use_tma=tuning.fp8_gemm_tma, flatten=tuning.fp8_gemm_flatten,
                warp_specialize=tuning.fp8_gemm_warp_specialize)
    return (f"FP8 GEMMs ({_options_repr(opts)} where the GPU has TMA); FFN hidden activation "
            + ("fused into the up GEMM" if config.fp8_ffn_fused else "quantized in a separate pass")
            + f"; kept bf16: {', '.join(config.fp8_exclude) or 'none'}")


PATCHES = [
    Patch(name="fp8_ffn", matches=_is_ffn, enabled=lambda cfg: cfg.fp8_linear, replace=FP8FeedForward.from_stock,
          keep=_keep_any(".0", ".2")),
    Patch(name="fp8_qkv", matches=lambda m: isinstance(m, WindowSelfAttention) and m.qkv_fp8 is None,
          enabled=lambda cfg: cfg.fp8_linear, replace=_fp8_qkv, keep=_keep_any(".q", ".k", ".v")),
    Patch(name="fp8_linear", matches=lambda m: type(m) is nn.Linear, enabled=lambda cfg: cfg.fp8_linear,
          replace=lambda m, cfg: FP8Linear.from_linear(m, cfg), keep=_keep_any(""), describe=_describe),
]
