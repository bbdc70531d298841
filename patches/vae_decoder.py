"""A faster drop-in for the Wan2.1 VAE's `Decoder3d` (stock `wan/modules/vae.py` and our reference alike).

`FastDecoder3d.from_stock(decoder, options)` adopts the decoder's own submodules (same names and
parameters: state dicts are unchanged) and runs one chunk of latent frames through them
channels-last, with time-padded convolution buffers that hold the causal cache, RMS_norm + SiLU
fused with the residual add (kernels/vae_rms_norm_silu.py) and one-copy resampling.
`VAEDecoderOptions`: `subpixel_upsample`, `fused_bias`, `frames_per_call`, `cuda_graphs`
(patches/vae_graphs.py), `cudnn_benchmark`, `triton_conv` (kernels/vae_conv3d.py).
Call: the stock `decoder(x, feat_cache=list, feat_idx=[0])` or our `decoder(x, FeatCache)`, x
[B, z_dim, T, H, W] in the weights' dtype and device; the per-stream state lives in the cache's
first slot; without a cache the stock (uncached) forward runs. Refused: a decoder without the stock
structure (PatchSkip, with the reason), a cache filled by the unpatched decoder, input of another
shape, dtype or device. Numerics: fp32 agrees with the stock decoder to 1e-5 relative L2; the norm
rounds once (the stock rounds after each bf16 op). The design and each option: docs/vae-decoder.md.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.vae_conv3d import supported as triton_conv_supported, vae_conv3d, vae_conv3d_weight
from ..kernels.vae_rms_norm_silu import vae_add, vae_rms_norm_silu
from .base import PatchSkip, require_kernel_device
from .vae_graphs import ChunkGraphs, cuda_backend
from .vae_structure import check_conv, check_norm, looks_like_wan_decoder, norm_bias, plan_of
from .vae_subpixel import subpixel_conv, subpixel_weight

__all__ = ["FastDecoder3d", "VAEDecoderOptions", "is_wan_decoder"]

CL3 = torch.channels_last_3d
CACHE_T = 2


def is_wan_decoder(m: nn.Module) -> bool:
    """A Wan VAE Decoder3d, by structure: conv1, middle, upsamples, head (stock or reference class)."""
    return looks_like_wan_decoder(m) and not isinstance(m, FastDecoder3d)


# --- options -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VAEDecoderOptions:
    """What FastDecoder3d does beyond the channels-last layout and fused norms (module docstring).

    The defaults are the settings chosen by measurement (bench/RESULTS.md, runs S3-4 and S3-5).
    frames_per_call stays 1: 3 saved 2.4-2.8 ms of a 114 ms block but nearly doubled the peak
    memory of generator + VAE (33.2 against 17.7 GiB)."""
    subpixel_upsample: bool = True
    fused_bias: bool = True
    frames_per_call: int = 1
    cuda_graphs: bool = True
    cudnn_benchmark: bool = False
    triton_conv: bool = False

    def __post_init__(self):
        for name in ("subpixel_upsample", "fused_bias", "cuda_graphs", "cudnn_benchmark", "triton_conv"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"VAE option {name} must be a bool, got {getattr(self, name)!r}")
        if isinstance(self.frames_per_call, bool) or not isinstance(self.frames_per_call, int) \
                or self.frames_per_call < 1:
            raise ValueError(f"VAE option frames_per_call must be an int >= 1, got {self.frames_per_call!r}")


# --- per-stream state ----------------------------------------------------------------------------

class _TimePadded:
    """One causal convolution's input buffer [B, C, 2 + T, H, W], channels-last, its cache in front.

    The buffer only grows: a call with fewer frames than the largest so far uses its first 2 + T
    frames (a view that stays channels-last for batch 1)."""

    def __init__(self, stream: "_Stream"):
        self.stream = stream
        self.buf: torch.Tensor | None = None
        self.t = 0

    def frames(self, b: int, c: int, t: int, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
        """The [B, C, T, H, W] view that this chunk's input is to be written into."""
        old = self.buf
        if old is None or old.shape[2] < CACHE_T + t:
            if old is not None and (old.shape[:2] + old.shape[3:] != (b, c, h, w)
                                    or old.dtype != like.dtype or old.device != like.device):
                raise ValueError(f"a decoder chunk of shape {tuple(like.shape)} ({like.dtype}, {like.device}) does "
                                 f"not continue the stream cached as {tuple(old.shape)} ({old.dtype}, {old.device});"
                                 " clear the cache to start a new stream")
            new = torch.empty((b, c, CACHE_T + t, h, w), dtype=like.dtype, device=like.device, memory_format=CL3)
            if old is None:  # the causal zero padding of a stream's start
                new[:, :, :CACHE_T].zero_()
            else:  # more frames per chunk than so far: keep the cache, which conv() moved to the front
                new[:, :, :CACHE_T].copy_(old[:, :, :CACHE_T])
            self.buf = new
            self.stream.generation += 1  # graphs captured on the old buffer must not replay
        elif old.shape[:2] + old.shape[3:] != (b, c, h, w) or old.dtype != like.dtype or old.device != like.device:
            raise ValueError(f"a decoder chunk of shape {tuple(like.shape)} ({like.dtype}, {like.device}) does not "
                             f"continue the stream cached as {tuple(old.shape)} ({old.dtype}, {old.device}); clear "
                             "the cache to start a new stream")
        self.t = t
        return self.buf[:, :, CACHE_T:CACHE_T + t]

    def conv(self, conv: nn.Conv3d, bias: bool = True, weight_kn: torch.Tensor | None = None) -> torch.Tensor:
        """Run `conv` over cache + chunk (without its bias if bias=False; as kernels/vae_conv3d.py with
        weight_kn, its reordered weight, if given), then keep the last two input frames as the next cache."""
        t = self.t
        buf = self.buf[:, :, :CACHE_T + t]
        if weight_kn is not None:
            out = vae_conv3d(buf, weight_kn, conv.bias if bias else None)
        else:
            pw, ph = conv._padding[0], conv._padding[2]
            out = F.conv3d(buf, conv.weight, conv.bias if bias else None, padding=(0, ph, pw))
        if t >= CACHE_T:
            buf[:, :, :CACHE_T].copy_(buf[:, :, t:])
        else:  # overlapping ranges: one frame at a time, front first
            for i in range(CACHE_T):
                buf[:, :, i].copy_(buf[:, :, i + 1])
        return out.contiguous(memory_format=CL3)


class _Stream:
    """What the fast decoder remembers of one stream: kept in slot 0 of the caller's feature cache."""

    def __init__(self):
        self.chunks = 0
        self.generation = 0  # bumped whenever a buffer is (re)allocated
        self.inputs: dict[str, _TimePadded] = {}
        self.graphs: ChunkGraphs | None = None

    def input(self, name: str) -> _TimePadded:
        if name not in self.inputs:
            self.inputs[name] = _TimePadded(self)
        return self.inputs[name]

    def buffers(self) -> list[torch.Tensor]:
        return [p.buf for p in self.inputs.values() if p.buf is not None]


# --- helpers on channels-last video tensors ------------------------------------------------------

def _empty_cl(b, c, t, h, w, like: torch.Tensor) -> torch.Tensor:
    return torch.empty((b, c, t, h, w), dtype=like.dtype, device=like.device, memory_format=CL3)


def _pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A 1x1(x1) convolution of channels-last x [B, C, T, H, W] as one GEMM over the positions."""
    b, c, t, h, w = x.shape
    cout = weight.shape[0]
    y = F.linear(x.permute(0, 2, 3, 4, 1).reshape(-1, c), weight.reshape(cout, c), bias)
    return y.view(b, t, h, w, cout).permute(0, 4, 1, 2, 3)


def _sum_into(act, out: torch.Tensor | None = None) -> torch.Tensor:
    """The value of a pending activation (a, a's bias, residual) = a + bias + residual, materialised
    (into out if given; a itself when nothing is pending and no out is given)."""
    a, ab, r = act
    if ab is None and r is None:
        return a if out is None else out.copy_(a)
    return vae_add(a, ab, r, out=out)


def _written(t: torch.Tensor) -> tuple:
    """Where a weight lives and how often it was written in place (tensors made under
    torch.inference_mode() count no writes: only their address and dtype tell them apart)."""
    return (t.data_ptr(), t.dtype, t.device, -1 if t.is_inference() else t._version)


@contextmanager
def _cudnn_benchmark(on: bool):
    if not on:
        yield
        return
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


class FastDecoder3d(nn.Module):
    """Decoder3d with the stock parameter names, run channels-last with fused glue (module docstring).

    Activations between blocks are passed as (a, a_bias, residual): their value is a + a_bias +
    residual, added by whichever kernel reads them next, so no pass of its own does the adds."""

    def __init__(self, decoder: nn.Module, options: VAEDecoderOptions | None = None):
        super().__init__()
        self.conv1 = decoder.conv1
        self.middle = decoder.middle
        self.upsamples = decoder.upsamples
        self.head = decoder.head
        for attr in ("dim", "z_dim", "dim_mult", "num_res_blocks", "attn_scales", "temperal_upsample"):
            if hasattr(decoder, attr):
                setattr(self, attr, getattr(decoder, attr))
        self.options = options or VAEDecoderOptions()
        self._plan = [(kind, f"middle.{i}", m) for i, (kind, m) in enumerate(plan_of(decoder.middle, "middle"))]
        self._plan += [(kind, f"upsamples.{i}", m)
                       for i, (kind, m) in enumerate(plan_of(decoder.upsamples, "upsamples"))]
        # The stock forward without a cache (all convolutions zero-padded, no temporal upsampling).
        self._uncached_forward = type(decoder).forward
        self._derived: dict[str, tuple] = {}  # name -> (source key, weights derived from the module's)
        self.graph_backend = None  # None: CUDA graphs on CUDA inputs; tests put a stand-in here

    @classmethod
    @torch.no_grad()
    def from_stock(cls, decoder: nn.Module, options: VAEDecoderOptions | None = None) -> "FastDecoder3d":
        """Check the structure (PatchSkip if it is not the Wan decoder), store weights channels-last."""
        if not is_wan_decoder(decoder):
            raise PatchSkip(f"{type(decoder).__name__} is not a Wan VAE Decoder3d (conv1, middle, upsamples, head)")
        if any(hasattr(block, "avg_shortcut") for block in decoder.upsamples):
            raise PatchSkip("this is the Wan2.2 VAE's decoder (LongLive 2.0: up blocks with a DupUp3D shortcut, "
                            "4x16x16 upsampling), which is not served yet: only the Wan2.1 VAE's; it is left as it is")
        require_kernel_device(decoder.conv1.weight)
        check_conv(decoder.conv1, "conv1", (3, 3, 3), (1, 1, 1, 1, 2, 0))
        head = list(decoder.head)
        if len(head) != 3 or not isinstance(head[1], nn.SiLU):
            raise PatchSkip(f"head is {[type(x).__name__ for x in head]}, not RMS_norm, SiLU, conv")
        check_norm(head[0], "head.0")
        check_conv(head[2], "head.2", (3, 3, 3), (1, 1, 1, 1, 2, 0))
        fast = cls(decoder, options)  # classifies (and so checks) every block before anything changes
        for m in fast.modules():
            if isinstance(m, nn.Conv3d) and m.kernel_size != (1, 1, 1):
                m.weight.data = m.weight.data.contiguous(memory_format=CL3)
            elif isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1):
                m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)
        return fast

    def extra_repr(self) -> str:
        o = self.options
        return (f"channels-last 3-D, time-padded conv inputs, fused RMS_norm+SiLU (Triton), subpixel_upsample="
                f"{o.subpixel_upsample}, fused_bias={o.fused_bias}, frames_per_call={o.frames_per_call}, "
                f"cuda_graphs={o.cuda_graphs}, cudnn_benchmark={o.cudnn_benchmark}, triton_conv={o.triton_conv}")

    # --- calls -------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, feat_cache=None, feat_idx=None) -> torch.Tensor:
        self._check_input(x)
        if feat_cache is None:
            return self._uncached_forward(self, x)
        slots = getattr(feat_cache, "slots", feat_cache)  # our FeatCache, or the stock list
        state = slots[0]
        if state is None:
            state = slots[0] = _Stream()
        elif not isinstance(state, _Stream):
            raise ValueError("this feature cache was filled by the unpatched decoder; clear it "
                             "(clear_cache() / new_cache()) before decoding with the patched one")
        with _cudnn_benchmark(self.options.cudnn_benchmark):
            if self._graphed(x, state):
                out = self._graphs(state, x.device).run(
                    lambda inp: self._chunk(inp, state), x, generation=lambda: state.generation,
                    fingerprint=self._fingerprint(), state=state.buffers)
            else:
                out = self._chunk(x, state)
        state.chunks += 1
        if feat_idx is not None:  # the stock protocol: the cursor ends past the last slot
            feat_idx[0] = len(slots)
        return out

    def decode_frames(self, x: torch.Tensor, feat_cache) -> torch.Tensor:
        """Post-conv2 latents x [B, z_dim, T, H, W] through the decoder, carrying `feat_cache`: a fresh
        stream's first frame alone, then up to `frames_per_call` frames per call (the stock loop takes
        one). Returns the raw decoder output [B, 3, T', 8H, 8W] in the weights' dtype."""
        slots = getattr(feat_cache, "slots", feat_cache)
        state = slots[0]
        fresh = state is None or (isinstance(state, _Stream) and state.chunks == 0)
        step = self.options.frames_per_call
        bounds = [0] + ([1] if fresh and x.shape[2] > 1 else [])
        bounds += list(range(bounds[-1] + step, x.shape[2], step)) + [x.shape[2]]
        outs = [self(x[:, :, i:j], feat_cache) for i, j in zip(bounds, bounds[1:])]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    @staticmethod
    def stream_stats(feat_cache) -> dict | None:
        """How a stream went: decoder calls, buffer (re)allocations and, with CUDA graphs, the runner's
        eager / capture / replay counts (None for a cache this decoder has not used)."""
        state = getattr(feat_cache, "slots", feat_cache)[0]
        if not isinstance(state, _Stream):
            return None
        graphs = None if state.graphs is None else dict(vars(state.graphs.stats))
        return {"calls": state.chunks, "allocations": state.generation, "graphs": graphs}

    def _check_input(self, x) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"decoder input must be a tensor, got {type(x).__name__}")
        if x.dim() != 5:
            raise ValueError(f"decoder input must be [B, C, T, H, W], got shape {tuple(x.shape)}")
        cin, w = self.conv1.in_channels, self.conv1.weight
        if x.shape[1] != cin:
            raise ValueError(f"decoder input has {x.shape[1]} channels, the decoder takes {cin} "
                             f"(layout [B, C, T, H, W]; got shape {tuple(x.shape)})")
        if min(x.shape) < 1:
            raise ValueError(f"decoder input has an empty dimension: shape {tuple(x.shape)}")
        if x.dtype != w.dtype:
            raise TypeError(f"decoder input is {x.dtype}, the decoder's weights are {w.dtype}")
        if x.device != w.device:
            raise ValueError(f"decoder input is on {x.device}, the decoder's weights on {w.device}")

    # --- CUDA graphs -------------------------------------------------------------------------------

    def _graphed(self, x: torch.Tensor, st: _Stream) -> bool:
        # The first two calls of a stream allocate its buffers (and treat the first frame apart).
        return (self.options.cuda_graphs and st.chunks > 0 and not torch.is_grad_enabled()
                and (x.is_cuda or self.graph_backend is not None))

    def _graphs(self, st: _Stream, device: torch.device) -> ChunkGraphs:
        if st.graphs is None:
            st.graphs = ChunkGraphs(self.graph_backend or cuda_backend(device))
        return st.graphs

    def _fingerprint(self) -> tuple:
        """Where the weights live and how often they were written: a graph replays raw addresses."""
        return tuple(_written(p) for p in self.parameters())

    # --- one chunk ---------------------------------------------------------------------------------

    def _conv_bias(self, conv: nn.Module):
        """(bias for the convolution call, bias left to the next kernel) under the fused_bias option."""
        return (None, conv.bias) if self.options.fused_bias else (conv.bias, None)

    def _chunk(self, x: torch.Tensor, st: _Stream) -> torch.Tensor:
        b, c, t, h, w = x.shape
        inp = st.input("conv1")
        inp.frames(b, c, t, h, w, x).copy_(x)
        act = (inp.conv(self.conv1, bias=not self.options.fused_bias), self._conv_bias(self.conv1)[1], None)
        for kind, name, m in self._plan:
            if kind == "res":
                act = self._residual(m, name, act, st)
            elif kind == "attn":
                act = self._attention(m, act)
            else:
                act = self._resample(m, name, act, st)
        norm, conv = self.head[0], self.head[2]
        a, ab, r = act
        inp = st.input("head")
        vae_rms_norm_silu(a, norm.gamma, norm_bias(norm), x_bias=ab, residual=r, scale=norm.scale,
                          out=inp.frames(*a.shape, a))
        return inp.conv(conv).contiguous()  # 3 output channels: its bias add is small

    def _norm_into(self, norm, act, out, *, silu=True) -> torch.Tensor:
        """out <- silu(norm(value of act)); returns that value (materialised only when adds are pending)."""
        a, ab, r = act
        s = a if ab is None and r is None else _empty_cl(*a.shape, a)
        vae_rms_norm_silu(a, norm.gamma, norm_bias(norm), x_bias=ab, residual=r, silu=silu, scale=norm.scale,
                          out=out, sum_out=None if s is a else s)
        return s

    def _residual(self, m, name, act, st):
        n1, c1, n2, c2 = m.residual[0], m.residual[2], m.residual[3], m.residual[6]
        fused = self.options.fused_bias
        b, c, t, h, w = act[0].shape
        in1 = st.input(f"{name}.residual.2")
        s = self._norm_into(n1, act, in1.frames(b, c, t, h, w, act[0]))
        identity = s if isinstance(m.shortcut, nn.Identity) else _pointwise(s, m.shortcut.weight, m.shortcut.bias)
        y = in1.conv(c1, bias=not fused, weight_kn=self._triton_weight(f"{name}.residual.2", c1))
        in2 = st.input(f"{name}.residual.6")
        vae_rms_norm_silu(y, n2.gamma, norm_bias(n2), x_bias=self._conv_bias(c1)[1], scale=n2.scale,
                          out=in2.frames(*y.shape, y))
        out = in2.conv(c2, bias=not fused, weight_kn=self._triton_weight(f"{name}.residual.6", c2))
        return out, self._conv_bias(c2)[1], identity

    def _attention(self, m, act):
        b, c, t, h, w = act[0].shape
        y = _empty_cl(b, c, t, h, w, act[0])
        s = self._norm_into(m.norm, act, y, silu=False)
        qkv = F.linear(y.permute(0, 2, 3, 4, 1).reshape(b * t, 1, h * w, c),
                       m.to_qkv.weight.reshape(3 * c, c), m.to_qkv.bias)
        q, k, v = qkv.chunk(3, dim=-1)  # the stock split of its [bt, 1, hw, 3c] tensor
        o = F.scaled_dot_product_attention(q, k, v)
        o = F.linear(o.reshape(-1, c), m.proj.weight.reshape(c, c), m.proj.bias)
        return o.view(b, t, h, w, c).permute(0, 4, 1, 2, 3), None, s

    def _resample(self, m, name, act, st):
        b, c, t, h, w = act[0].shape
        if m.mode == "upsample3d" and st.chunks > 0:  # the stock 'Rep' rule: no time doubling on chunk 0
            inp = st.input(f"{name}.time_conv")
            _sum_into(act, out=inp.frames(b, c, t, h, w, act[0]))
            y = inp.conv(m.time_conv)  # [B, 2C, T, H, W]: channel j*C + c is frame 2t + j
            frames = y.permute(0, 2, 3, 4, 1).view(b, t, h, w, 2, c).permute(0, 1, 4, 2, 3, 5)
            t = 2 * t
        else:
            frames = _sum_into(act).permute(0, 2, 3, 4, 1)
        conv = m.resample[1]
        bias, pending = self._conv_bias(conv)
        if self.options.subpixel_upsample:
            weight4, bias4 = self._subpixel_weights(name, conv, bias)
            low = frames.reshape(b * t, h, w, c).permute(0, 3, 1, 2)  # the time interleave's copy, if any
            return subpixel_conv(low, weight4, bias4, t), pending, None
        frames = frames.reshape(b * t, h, w, c)
        # nearest 2x: one copy from the low-resolution frames (also doing the time interleave above)
        up = frames[:, :, None, :, None, :].expand(b * t, h, 2, w, 2, c).reshape(b * t, 2 * h, 2 * w, c)
        o = F.conv2d(up.permute(0, 3, 1, 2), conv.weight, bias, padding=1)
        co = o.shape[1]
        o = o.permute(0, 2, 3, 1).reshape(b, t, 2 * h, 2 * w, co)  # a view when cuDNN kept channels-last
        return o.permute(0, 4, 1, 2, 3), pending, None

    def _derive(self, name: str, sources: tuple, make):
        """make()'s weights, made again whenever one of `sources` (the module's tensors) changes."""
        key = tuple(None if t is None else _written(t) for t in sources)
        cached = self._derived.get(name)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, make())
            self._derived[name] = cached
        return cached[1]

    def _subpixel_weights(self, name: str, conv: nn.Conv2d, bias: torch.Tensor | None):
        """The 2x2 phase weights of a Resample conv (and its bias per phase)."""
        return self._derive(name, (conv.weight, bias), lambda: (
            subpixel_weight(conv.weight), None if bias is None else bias.repeat(4)))

    def _triton_weight(self, name: str, conv: nn.Conv3d) -> torch.Tensor | None:
        """kernels/vae_conv3d.py's weight layout of a residual conv, or None where cuDNN runs it."""
        if not self.options.triton_conv or not triton_conv_supported(conv.in_channels, conv.out_channels):
            return None
        return self._derive(name, (conv.weight,), lambda: vae_conv3d_weight(conv.weight))
