"""WindowSelfAttention: LongLive's causal self-attention on our kernels, same call, same cache dicts.

Replaces `CausalWanSelfAttention`. Per call: one fused q|k|v GEMM (the Linear weights are views into
one [3C, C] matrix, so the state dict keeps the stock names); `kv_cache_plan` (the stock cache rules
on the device, no `.item()`); `rope_kv_append` (q/k RMSNorm + causal RoPE, roped k and raw v written
into their slots of a ring); attention over sink + window read in place (`backend="triton"`: one
shape at any fill; `"sdpa"`: cuDNN, the window length tracked on the host); the o projection.
The new cache pointers are returned as device scalars, so the stock `_apply_cache_updates` leaves
them right; the ring shift lives in the cache dict under `ring_shift` (a fresh dict, a fresh ring).
`kv_cache_dtype: fp8` swaps the dict's k/v for the FP8 layout on first use (docs/fp8-kv-cache.md).
Refused: the uncached call, a batch without one shared latent grid, a recompute before the last
committed token, a layer moved after patching. The ring, the window cap and the host-side window
copy: docs/kv-cache-ring.md.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.kv_cache_plan import (LOCAL_START, NEW_GLOBAL, NEW_LOCAL, ROW_LO, SHIFT, SINK_END, START_FRAME,
                                     WIN_END, WIN_START, kv_cache_plan, kv_cache_plan_ref, window_ring_size)
from ..kernels.fp8_kv_cache import k_head_scale, quantize_k_ref, quantize_v_groups_ref
from ..kernels.fp8_quant import FP8_DTYPE
from ..kernels.kv_quant_append import kv_quant_append
from ..kernels.rms_norm import rms_norm
from ..kernels.rope_kv_append import rope_kv_append, rope_tables
from ..kernels.window_attention import window_attention, window_attention_fp8
from ..kernels._common import SUPPORTED_HEAD_DIMS, tma_supported
from .base import Patch, PatchSkip, require_kernel_device

_HOST_STATE = "_longlive_triton_host"   # (global_end, local_end, shift) mirrored on the host
_RING_SHIFT = "ring_shift"
BACKENDS = ("triton", "sdpa")


class WindowSelfAttention(nn.Module):
    def __init__(self, stock: nn.Module, backend: str, kv_cache_dtype: str = "bf16", split: int = 1,
                 use_tma: bool = False):
        """Shares the stock module's Linear layers and norms; use from_stock, which checks them."""
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"attention backend {backend!r} is not one of {BACKENDS}")
        self.dim = stock.dim
        self.num_heads = stock.num_heads
        self.head_dim = stock.dim // stock.num_heads
        self.local_attn_size = stock.local_attn_size
        self.sink_size = stock.sink_size
        self.eps = stock.norm_q.eps
        self.backend = backend
        if kv_cache_dtype == "fp8" and backend != "triton":
            raise ValueError("the fp8 KV cache needs the triton attention backend")
        self.kv_cache_dtype = kv_cache_dtype
        # Our Triton attention's launch options (kernels/window_attention.py): split-KV shares, TMA loads.
        self.attention_options = dict(split=split, use_tma=use_tma)
        # The stock budget (local_attn_size * 1560, or what the pipeline set) is kept as is; our
        # reference leaves it None and derives it from the frame size at run time.
        self.max_attention_size = getattr(stock, "max_attention_size", None)
        # The window patch_model set (latent frames, sink included), a cap on any budget a pipeline sets.
        self.window_frames: int | None = None
        self._told_cache_size = False
        self.q, self.k, self.v, self.o = stock.q, stock.k, stock.v, stock.o
        self.norm_q, self.norm_k = stock.norm_q, stock.norm_k
        # The fp8 patch (patches/fp8_linear.py) sets this to an FP8 GEMM over the fused q|k|v
        # weight: a callable taking x in bf16 or already quantized (an Fp8Activation).
        self.qkv_fp8 = None

    @classmethod
    def from_stock(cls, stock: nn.Module, config) -> "WindowSelfAttention":
        """Build from a stock CausalWanSelfAttention (or our reference of it), sharing its weights."""
        backend = config.attention_backend
        for name in ("q", "k", "v", "o"):
            layer = getattr(stock, name, None)
            if type(layer) is not nn.Linear or layer.bias is None:
                raise PatchSkip(f"{name} is a {type(layer).__name__}, not a plain nn.Linear with a bias "
                                "(merge LoRA adapters first: merge_lora)")
        weight = stock.q.weight
        if weight.dtype != torch.bfloat16:
            raise PatchSkip(f"the kernels need bf16 weights; this layer is {weight.dtype}")
        require_kernel_device(weight)
        head_dim = stock.dim // stock.num_heads
        if head_dim not in SUPPORTED_HEAD_DIMS:
            raise PatchSkip(f"head dim {head_dim} is not supported by the kernels ({', '.join(map(str, SUPPORTED_HEAD_DIMS))})")
        for name in ("norm_q", "norm_k"):
            norm = getattr(stock, name)
            w = getattr(norm, "weight", None)
            if not isinstance(w, torch.Tensor) or w.shape != (stock.dim,) or getattr(norm, "eps", None) is None:
                raise PatchSkip(f"{name} is not a WanRMSNorm over the full {stock.dim} features (qk_norm off?)")
        if config.kv_cache_dtype == "fp8" and weight.device.type == "cuda" \
                and torch.cuda.get_device_capability(weight.device) < (8, 9):
            raise PatchSkip(f"the fp8 KV cache needs FP8 support (compute capability >= 8.9); this GPU is "
                            f"{torch.cuda.get_device_capability(weight.device)}")
        # TMA where the GPU has it (compute capability >= 9); elsewhere the same kernel with pointer loads.
        use_tma = config.tuning.attention_tma and tma_supported(weight.device)
        new = cls(stock, backend, config.kv_cache_dtype, config.tuning.attention_split, use_tma)
        new.window_frames = config.local_attn_size
        with torch.no_grad():
            fused_w = torch.cat([stock.q.weight, stock.k.weight, stock.v.weight])
            fused_b = torch.cat([stock.q.bias, stock.k.bias, stock.v.bias])
        # The q, k, v weights become views into the fused matrix: one GEMM, no second copy.
        dim = stock.dim
        for i, layer in enumerate((new.q, new.k, new.v)):
            layer.weight = nn.Parameter(fused_w[i * dim:(i + 1) * dim], requires_grad=False)
            layer.bias = nn.Parameter(fused_b[i * dim:(i + 1) * dim], requires_grad=False)
        new._qkv_weight, new._qkv_bias = fused_w, fused_b
        cos, sin = rope_tables(head_dim, device=weight.device)
        new._cos, new._sin = cos, sin
        if config.kv_cache_dtype == "fp8":
            # Static: the norm weight is fixed once patched (load checkpoints before patching).
            new._k_scale = k_head_scale(stock.norm_k.weight, stock.num_heads)
        return new

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.num_heads}, window={self.local_attn_size} frames, "
                f"sink={self.sink_size} frames, backend={self.backend}, kv_cache={self.kv_cache_dtype}"
                + (f", {self.attention_options}" if self.backend == "triton" else ""))

    def _budget(self, frame_seqlen: int, capacity: int) -> int:
        if self.max_attention_size is not None:
            budget = self.max_attention_size
        else:
            budget = capacity if self.local_attn_size == -1 else self.local_attn_size * frame_seqlen
        if self.window_frames is not None:
            budget = min(budget, self.window_frames * frame_seqlen)
        return budget

    def plan_args(self, kv_cache: dict, current_start: int, num_new: int, frame_seqlen: int,
                  sink_recache: bool = False) -> dict:
        """The host-side arguments of this layer's cache plan for one call."""
        capacity = kv_cache["k"].shape[1]
        sink, budget = self.sink_size * frame_seqlen, self._budget(frame_seqlen, capacity)
        return dict(current_start=int(current_start), num_new=num_new, capacity=capacity, sink_tokens=sink,
                    budget=budget, frame_tokens=frame_seqlen, local=self.local_attn_size != -1,
                    sink_recache=bool(sink_recache), ring_size=window_ring_size(capacity, sink, budget))

    @staticmethod
    def host_window(kv_cache: dict, plan_args: dict, *, commit: bool) -> tuple[int, int, int]:
        """(keys attended, first physical window slot, window length) of one call, from the stock rules
        tracked on the host (no device read); with commit, the tracked pointers move on as the call does.
        This is the host-side window copy of longlive_triton/runtime/graphs.py (its docstring: who reads it)."""
        state = kv_cache.get(_HOST_STATE, (0, 0, 0))
        _check_forward_only(state[0], plan_args)
        plan = kv_cache_plan_ref(*state, **plan_args)
        if commit:
            kv_cache[_HOST_STATE] = (plan[NEW_GLOBAL], plan[NEW_LOCAL], plan[SHIFT])
        sink, ring = plan_args["sink_tokens"], plan_args["ring_size"]
        win_start, win_end = plan[WIN_START], max(plan[WIN_START], plan[WIN_END])
        first = sink + (win_start - sink + plan[SHIFT]) % ring if win_end > win_start else sink
        return plan[SINK_END], first, win_end - win_start

    @staticmethod
    def reads_in_place(window: tuple[int, int, int], plan_args: dict) -> bool:
        """Whether sink + window are the cache slots [0, sink + length), so cuDNN reads them in place:
        while the window fills (it starts at the ring's first slot) and whenever it is the whole ring
        (always once full, the ring being as long as the window)."""
        _, first, length = window
        return first == plan_args["sink_tokens"] or length == plan_args["ring_size"]

    def _note_cache_size(self, plan_args: dict) -> None:
        """Warn once when the cache holds more than the window reads (its extra slots are unused)."""
        self._told_cache_size = True
        capacity, sink, fs = plan_args["capacity"], plan_args["sink_tokens"], plan_args["frame_tokens"]
        needed = sink + plan_args["ring_size"]
        if plan_args["local"] and capacity > needed:
            warnings.warn(f"the KV cache holds {capacity // fs} latent frames, {(capacity - needed) // fs} more than the "
                          f"{needed // fs}-frame attention window reads: it runs at full speed with those slots unused "
                          f"(LongLive sizes the cache from model_kwargs.local_attn_size: set it to {needed // fs} to "
                          "free them)", stacklevel=3)

    def forward(self, x, seq_lens, grid_sizes, freqs, block_mask, kv_cache=None, current_start=0,
                cache_start=None, sink_recache_after_switch=False):
        if kv_cache is None:
            raise NotImplementedError("WindowSelfAttention serves LongLive's KV-cached inference path; pass kv_cache")
        qkv = self._project_qkv(x)
        d = self.dim
        out, info = self._attend(qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:], grid_sizes, kv_cache,
                                 current_start, sink_recache_after_switch, normed=False)
        return self.o(out.flatten(2)), info

    def append_kv(self, x, grid_sizes, kv_cache, current_start=0, sink_recache_after_switch=False):
        """Steps 1-3 only: write this call's keys and values into the cache and return forward's cache
        info, with no attention and no o projection. For a call whose output nobody reads: the last
        layer of a cache pass (patches/fused_block.py, `cache_only`)."""
        if kv_cache is None:
            raise NotImplementedError("append_kv writes the KV cache; pass kv_cache")
        qkv = self._project_qkv(x)
        d = self.dim
        _, info = self._attend(qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:], grid_sizes, kv_cache,
                               current_start, sink_recache_after_switch, normed=False, attend=False)
        return info

    def project(self, x) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, s, C] -> q, k (RMS-normed over all heads, the stock rounding), v, each [B, s, H, D].

        The split form of forward's first steps, for sequence parallelism: the norm needs every head
        of a token, so it runs before the heads are spread over ranks (then `attend`)."""
        qkv = self._project_qkv(x)
        b, s = qkv.shape[:2]
        d, shape = self.dim, (self.num_heads, self.head_dim)
        q = rms_norm(qkv[..., :d], self.norm_q.weight, self.norm_q.eps)
        k = rms_norm(qkv[..., d:2 * d], self.norm_k.weight, self.norm_k.eps)
        return q.view(b, s, *shape), k.view(b, s, *shape), qkv[..., 2 * d:].unflatten(-1, shape)

    def attend(self, q, k, v, grid_sizes, freqs, kv_cache, current_start=0, sink_recache_after_switch=False):
        """RoPE, the cache append and attention for normed q, k and v [B, s, h, D] -> ([B, s, h, D], info);
        any head count h, the cache holding the same heads."""
        if self.kv_cache_dtype == "fp8":
            raise NotImplementedError("the fp8 KV cache fuses the q/k RMSNorm into its append (kv_quant_append), "
                                      "so it cannot take normed inputs: use kv_cache_dtype bf16 here")
        return self._attend(q.flatten(2), k.flatten(2), v.flatten(2), grid_sizes, kv_cache, current_start,
                            sink_recache_after_switch, normed=True)

    def _attend(self, q_lin, k_lin, v, grid_sizes, kv_cache, current_start, sink_recache_after_switch, normed,
                attend=True, frame_offset: int = 0):
        """Steps 2-4 of the module docstring on q_lin, k_lin, v [B, s, h*D] (normed or not); without
        attend, steps 2-3 (the output is None); frame_offset: added to every new row's temporal RoPE
        position (LongLive 2.0's multi-shot offset)."""
        b, s = q_lin.shape[:2]
        frames, hg, wg = (int(g) for g in grid_sizes[0].tolist())  # grid_sizes lives on the host
        if grid_sizes.shape[0] != b or any(tuple(g.tolist()) != (frames, hg, wg) for g in grid_sizes):
            raise ValueError("WindowSelfAttention needs one latent grid shared by the whole batch")
        frame_seqlen = hg * wg
        if self.kv_cache_dtype == "fp8":
            self._use_fp8_cache(kv_cache)
        k_cache, v_cache = kv_cache["k"], kv_cache["v"]
        plan_args = self.plan_args(kv_cache, current_start, s, frame_seqlen, sink_recache_after_switch)
        if not self._told_cache_size:
            self._note_cache_size(plan_args)
        # The host-side window copy moves on with every call, whatever the backend: the graph runner
        # keys on it, and it refuses a call the ring cannot serve.
        window = self.host_window(kv_cache, plan_args, commit=True)
        shift = kv_cache.get(_RING_SHIFT)
        if shift is None:
            shift = kv_cache[_RING_SHIFT] = torch.zeros(1, dtype=torch.long, device=k_cache.device)
        # A DeviceIndex (the CUDA-graph runner's, longlive_triton/runtime/graphs.py): the plan kernel reads the
        # start on the device.
        device_start = getattr(current_start, "tensor", None)
        plan = kv_cache_plan(kv_cache["global_end_index"], kv_cache["local_end_index"], shift,
                             frame_offset=frame_offset, pinned=self.pinned(kv_cache),
                             **dict(plan_args, current_start=plan_args["current_start"] if device_start is None
                                    else device_start))

        ring = dict(ring_lo=plan_args["sink_tokens"], ring_size=plan_args["ring_size"], shift=plan[SHIFT:SHIFT + 1])
        if self.kv_cache_dtype == "fp8":
            out = self._append_attend_fp8(q_lin, k_lin, v, kv_cache, plan, ring, (frames, hg, wg),
                                          plan[START_FRAME:START_FRAME + 1], attend)
            return out, (plan[NEW_GLOBAL], plan[NEW_LOCAL], None)
        norm_q, norm_k = (None, None) if normed else (self.norm_q.weight, self.norm_k.weight)
        q = rope_kv_append(q_lin, k_lin, v, norm_q, norm_k, self._cos, self._sin, k_cache, v_cache, (frames, hg, wg),
                           plan[START_FRAME:START_FRAME + 1], plan[LOCAL_START:LOCAL_START + 1],
                           plan[ROW_LO:ROW_LO + 1], eps=self.eps, **ring)
        if not attend:
            return None, (plan[NEW_GLOBAL], plan[NEW_LOCAL], None)
        if self.backend == "triton":
            out = window_attention(q, k_cache, v_cache, plan[SINK_END:SINK_END + 1], plan[WIN_START:WIN_START + 1],
                                   plan[WIN_END:WIN_END + 1], **ring, **self.attention_options)
        else:
            out = self._sdpa(q, k_cache, v_cache, window, plan_args)
        return out, (plan[NEW_GLOBAL], plan[NEW_LOCAL], None)

    def pinned(self, kv_cache: dict):
        """The cache's pinned shot sink for the plan (kernels/kv_cache_plan.py): none in LongLive v1.0."""
        return None

    @property
    def accepts_fp8(self) -> bool:
        """Whether forward takes x already quantized (the block's adaln then writes it in FP8)."""
        return self.qkv_fp8 is not None

    def _project_qkv(self, x):
        """x [B, L, C] -> q|k|v [B, L, 3C] bf16, one GEMM."""
        if self.qkv_fp8 is not None:
            return self.qkv_fp8(x)
        if self._qkv_weight.device != x.device or self._qkv_weight.dtype != x.dtype:
            raise RuntimeError(f"this layer was patched for {self._qkv_weight.dtype} on {self._qkv_weight.device} but "
                               f"runs {x.dtype} on {x.device}: call patch_model after moving the model (.to())")
        return F.linear(x, self._qkv_weight, self._qkv_bias)

    def _use_fp8_cache(self, kv_cache: dict) -> None:
        """Replace a bf16 "k"/"v" pair by the FP8 layout (module docstring)."""
        if kv_cache["k"].dtype == FP8_DTYPE and "v_scale" in kv_cache:
            return
        k, v = kv_cache["k"], kv_cache["v"]
        kv_cache["k"] = quantize_k_ref(k, self._k_scale)
        kv_cache["v"], kv_cache["v_scale"] = quantize_v_groups_ref(v)

    def _append_attend_fp8(self, q_lin, k_lin, v, kv_cache, plan, ring, grid, start_frame, attend=True):
        """Steps 3-4 on the FP8 cache: quantize/append k and v (q handed over in e4m3), attend (or
        return None without attend)."""
        k8, v8, v_scale = kv_cache["k"], kv_cache["v"], kv_cache["v_scale"]
        q8, q_scale = kv_quant_append(q_lin, k_lin, v, self.norm_q.weight, self.norm_k.weight, self._cos, self._sin,
                                      k8, self._k_scale, v8, v_scale, grid, start_frame,
                                      plan[LOCAL_START:LOCAL_START + 1], plan[ROW_LO:ROW_LO + 1], eps=self.eps, **ring)
        if not attend:
            return None
        return window_attention_fp8(q8, q_scale, k8, self._k_scale, v8, v_scale, plan[SINK_END:SINK_END + 1],
                                    plan[WIN_START:WIN_START + 1], plan[WIN_END:WIN_END + 1], **ring,
                                    **self.attention_options)

    @classmethod
    def _sdpa(cls, q, k_cache, v_cache, window: tuple[int, int, int], plan_args: dict) -> torch.Tensor:
        """cuDNN attention over the window, read in place when it is one physical range."""
        sink_end, first, length = window
        sink, ring = plan_args["sink_tokens"], plan_args["ring_size"]
        if cls.reads_in_place(window, plan_args):
            k, v = k_cache[:, :sink + length], v_cache[:, :sink + length]
        else:
            slots = torch.cat([torch.arange(sink_end), sink + (torch.arange(first - sink, first - sink + length) % ring)])
            slots = slots.to(k_cache.device)
            k, v = k_cache.index_select(1, slots), v_cache.index_select(1, slots)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)


def _check_forward_only(global_end: int, plan_args: dict) -> None:
    """Refuse a recompute that ends before the last committed token when the ring is shorter than
    the cache: the positions it would read again were overwritten (kernels/kv_cache_plan.py).
    LongLive never makes one (its recomputes end where the last commit did)."""
    start, n = plan_args["current_start"], plan_args["num_new"]
    if start > 0 and start + n < global_end and plan_args["ring_size"] < plan_args["capacity"] - plan_args["sink_tokens"]:
        fs = plan_args["frame_tokens"]
        raise ValueError(f"this call recomputes tokens [{start}, {start + n}) before the last committed token "
                         f"{global_end}: with a KV cache larger than the attention window only the window is kept "
                         f"(keys older than it are gone); size the cache to the window "
                         f"({(plan_args['sink_tokens'] + plan_args['ring_size']) // fs} latent frames) to do this")


def _is_self_attention(m: nn.Module) -> bool:
    """The stock CausalWanSelfAttention by structure: q/k/v/o, q/k norms and the window settings."""
    return (all(hasattr(m, a) for a in ("q", "k", "v", "o", "norm_q", "norm_k", "local_attn_size", "sink_size", "num_heads"))
            and not isinstance(m, WindowSelfAttention))


_BACKEND_NAMES = {"sdpa": "cuDNN through torch SDPA", "triton": "our Triton window kernel"}

PATCH = Patch(name="window_self_attention", matches=_is_self_attention,
              enabled=lambda cfg: cfg.window_attention, replace=WindowSelfAttention.from_stock,
              describe=lambda cfg: f"self-attention runs on {_BACKEND_NAMES[cfg.attention_backend]} "
                                   f"(attention_backend: {cfg.attention_backend})"
                                   + (", over an FP8 KV cache (e4m3 q, k, v: both attention dots in FP8)"
                                      if cfg.kv_cache_dtype == "fp8" else ""))
