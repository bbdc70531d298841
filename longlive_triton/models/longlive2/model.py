"""A faithful reference of LongLive 2.0's causal generator (Wan2.2-TI2V-5B based; the KV-cached inference path).

Written from a reading of the stock source (branch `main` of NVlabs/LongLive), not copied from it. The
module tree, class names and parameter names are the stock `CausalWanModel`'s, so a stock state dict loads
with strict=True, and the call protocol is the stock one, so LongLive 2.0's own pipeline drives it:

    model(x, t=t, context=context, seq_len=seq_len, kv_cache=kv_cache, crossattn_cache=crossattn_cache,
          current_start=current_start, cache_start=cache_start)

with x [B, 48, F, H, W], t [B, F] (a timestep per latent frame), context [B, L<=text_len, text_dim], and
the cache dicts as `CausalDiffusionInferencePipeline._initialize_kv_cache` builds them (k, v,
global_end_index, local_end_index, pinned_start, pinned_len). What it shares with v1.0 (norms, RoPE
table, attention, head, projections, the per-frame modulated layer, embeddings, init) is models/wan_common.py's; what 2.0 changes:

* Multi-shot sink. The pipeline sets `global_sink_size` (the first sink frames stay for good) and, at a
  scene cut, pins the just-cached chunk (`pinned_start`, `pinned_len` in every layer's cache). Eviction
  keeps the leading `effective_sink` tokens: the global sink plus the pinned chunk when it sits right
  behind it, the global sink alone when the pinned chunk floats further on (it then moves left with the
  rolled tokens, `pinned_shift`, until it reaches the sink), and max(global, sink) with nothing pinned.
  A sink or floating pinned chunk outside the attention window is prepended to it.
* Shot RoPE offset. The temporal RoPE position of every query and key gets `rope_temporal_offset`
  (shot_index x multi_shot_rope_offset frames, set by the pipeline at each shot boundary). A non-zero
  offset computes the temporal angles in fp64 as position x angle(freqs[1]) and takes the polar form
  (the stock `compute_temporal_freqs`); a zero offset reads the table, as v1.0 does.
* The block call carries `t_scale`, `use_relative_rope`, `method`, `original_seq_len`,
  `temporal_offset`. The inference values (1.0, False, "linear", None, a number) are implemented; the
  others (RoPE interpolation, window-relative RoPE, per-frame offset tensors) are refused.
* `MultiShotT2VCrossAttention` recomputes the text K/V every call (the cross-attention cache is not
  read) and lets a context batch of B x chunks attend chunk by chunk.
* Every layer attends to a clone of its cache and returns an update record; the records are applied
  after the last layer, or returned with the output (`defer_cache_updates=True`, the wrapper's
  LLV2_DEFER_KV_UPDATES) for the caller to apply with `_apply_cache_updates`.

The rounding points are the stock ones with its Triton kernels off (fp64 RoPE, eager adaLN; the stock
Triton RoPE rotates in fp32, one bf16 ulp away): this file is what our kernels are judged against.
"""
from __future__ import annotations

import numbers

import torch

from longlive_triton.models.wan_common import (CausalHead, ModulatedBlock, QKVOAttention, WanGenerator, attention,
                                               roll_behind_prefix, sinusoidal_embedding_1d)

__all__ = ["CausalWanModel", "CausalWanAttentionBlock", "CausalWanSelfAttention", "MultiShotT2VCrossAttention",
           "CausalHead", "temporal_freqs", "causal_rope_apply", "check_rope_arguments", "STOCK_FRAME_SEQLEN"]

# Tokens per latent frame the stock attention assumes for its default budget (1280x704 video); the
# pipeline overwrites `max_attention_size` with local_attn_size x its own frame size before inference.
STOCK_FRAME_SEQLEN = 880


def check_rope_arguments(t_scale=1.0, use_relative_rope=False, method="linear", original_seq_len=None,
                         temporal_offset=0.0) -> float:
    """The 2.0 block arguments at their inference values; anything else is refused. Returns the offset (frames)."""
    if t_scale != 1.0:
        raise NotImplementedError(f"t_scale={t_scale}: temporal RoPE interpolation is not implemented (inference uses 1.0)")
    if use_relative_rope:
        raise NotImplementedError("use_relative_rope=True: window-relative RoPE is not implemented "
                                  "(LongLive 2.0 inference caches roped keys)")
    if method != "linear":
        raise NotImplementedError(f"RoPE method {method!r}: only 'linear' is implemented (as in the LongLive 2.0 release)")
    if original_seq_len is not None:
        raise NotImplementedError(f"original_seq_len={original_seq_len}: unused by linear RoPE; pass None")
    if torch.is_tensor(temporal_offset) or not isinstance(temporal_offset, numbers.Real):
        raise NotImplementedError("temporal_offset must be a number (the pipeline's shot_index x offset); "
                                  f"per-sample or per-frame offsets are not implemented, got {type(temporal_offset)}")
    return float(temporal_offset)


def temporal_freqs(freqs_t: torch.Tensor, f: int, start_frame: int, offset: float, device) -> torch.Tensor:
    """[f, c_t] complex128 temporal rotations of frames start_frame.. shifted by `offset` frames.

    Offset zero: rows of the table. Otherwise fp64 angles (position + offset) x angle(freqs_t[1]) in polar
    form, in the stock order of operations (so the same bits).
    """
    if offset == 0.0:
        return freqs_t[start_frame:start_frame + f]
    base_angles = torch.angle(freqs_t[1]).to(torch.float64)
    positions = torch.arange(f, device=device, dtype=torch.float64) + start_frame
    positions = positions + offset  # the stock code then multiplies by t_scale, 1 at inference
    angles = positions.unsqueeze(-1) * base_angles.unsqueeze(0)
    return torch.polar(torch.ones_like(angles), angles)


def causal_rope_apply(x: torch.Tensor, grid: tuple[int, int, int], freqs: torch.Tensor, start_frame: int = 0,
                      offset: float = 0.0) -> torch.Tensor:
    """Rotate x [B, L, H, D] by the 3-axis RoPE at frames start_frame.. + offset (fp64), every sample on `grid`.

    The first c - 2(c//3) of a head's c = D/2 complex pairs are temporal, then c//3 height, c//3 width.
    Rows past f*h*w tokens pass through unrotated.
    """
    n, c = x.size(2), x.size(3) // 2
    freqs = freqs.split([c - 2 * (c // 3), c // 3, c // 3], dim=1)
    f, h, w = grid
    seq_len = f * h * w
    freqs_i = torch.cat([
        temporal_freqs(freqs[0], f, start_frame, offset, x.device).view(f, 1, 1, -1).expand(f, h, w, -1),
        freqs[1][:h].view(1, h, 1, -1).expand(f, h, w, -1),
        freqs[2][:w].view(1, 1, w, -1).expand(f, h, w, -1),
    ], dim=-1).reshape(seq_len, 1, -1)
    output = []
    for i in range(x.size(0)):
        x_i = torch.view_as_complex(x[i, :seq_len].to(torch.float64).reshape(seq_len, n, -1, 2))
        x_i = torch.view_as_real(x_i * freqs_i).flatten(2)
        output.append(torch.cat([x_i, x[i, seq_len:]]))
    return torch.stack(output).type_as(x)


def _scalar(cache: dict, key: str, default: int) -> int:
    value = cache.get(key)
    return int(value.item()) if torch.is_tensor(value) else default


class CausalWanSelfAttention(QKVOAttention):
    """Self-attention over a rolling KV cache with a global sink and a pinned shot sink (stock 2.0 cache rules)."""

    def __init__(self, dim: int, num_heads: int, local_attn_size: int = -1, sink_size: int = 0,
                 qk_norm: bool = True, eps: float = 1e-6):
        super().__init__(dim, num_heads, qk_norm, eps)
        # The stock layer reads -1 (no window) as 24 frames: its eviction rule is always on.
        self.local_attn_size = local_attn_size if local_attn_size != -1 else 24
        self.sink_size = sink_size
        self.global_sink_size = 0
        self.max_attention_size = (24 if local_attn_size == -1 else local_attn_size) * STOCK_FRAME_SEQLEN

    def forward(self, x, seq_lens, grid_sizes, freqs, block_mask, kv_cache=None, current_start=0, cache_start=None,
                t_scale=1.0, use_relative_rope=False, method="linear", original_seq_len=None, temporal_offset=0.0):
        if kv_cache is None:
            raise NotImplementedError("the reference implements LongLive 2.0's KV-cached inference path only")
        offset = check_rope_arguments(t_scale, use_relative_rope, method, original_seq_len, temporal_offset)
        q, k, v = self.project(x)
        x, record = self.attend(q, k, v, tuple(int(n) for n in grid_sizes[0].tolist()), freqs, kv_cache,
                                current_start, offset)
        return self.o(x.flatten(2)), record

    def attend(self, q, k, v, grid: tuple[int, int, int], freqs, kv_cache: dict, current_start: int = 0,
               offset: float = 0.0):
        """RoPE, the cache rules and attention for q, k, v [B, s, H, D] -> ([B, s, H, D], update record)."""
        if kv_cache.get("quantized", False):
            raise NotImplementedError("NVFP4-quantized KV caches are not implemented by the reference")
        num_frames, h, w = grid
        frame_seqlen = h * w
        s = q.shape[1]
        start_frame = current_start // frame_seqlen
        roped_q = causal_rope_apply(q, grid, freqs, start_frame, offset).type_as(v)
        roped_k = causal_rope_apply(k, grid, freqs, start_frame, offset).type_as(v)

        current_end = current_start + s
        sink_tokens = self.sink_size * frame_seqlen
        global_sink = self.global_sink_size * frame_seqlen
        cache_size = kv_cache["k"].shape[1]
        global_end = _scalar(kv_cache, "global_end_index", 0)
        local_end = _scalar(kv_cache, "local_end_index", 0)
        pinned_start = _scalar(kv_cache, "pinned_start", -1)
        pinned_len = _scalar(kv_cache, "pinned_len", 0)
        has_pinned = pinned_start >= 0 and pinned_len > 0
        # The prefix eviction keeps: global sink + a pinned chunk right behind it, else the global sink
        # alone (a floating pinned chunk), else the larger of global and plain sink.
        if has_pinned and pinned_start == global_sink:
            kept = global_sink + pinned_len
        elif has_pinned:
            kept = global_sink
        else:
            kept = max(global_sink, sink_tokens)

        temp_k = kv_cache["k"].clone()
        temp_v = kv_cache["v"].clone()
        if self.local_attn_size != -1 and current_end > global_end and s + local_end > cache_size:
            evicted = s + local_end - cache_size
            rolled = local_end - evicted - kept
            local_end_index = local_end + current_end - global_end - evicted
            local_start_index = local_end_index - s
            roll_behind_prefix(temp_k, temp_v, kept, evicted, rolled)
            # A floating pinned chunk moved left with the rolled tokens; one inside the kept prefix did not.
            record = {"action": "roll_and_insert", "sink_tokens": kept, "num_rolled_tokens": rolled,
                      "num_evicted_tokens": evicted,
                      "pinned_shift": evicted if has_pinned and pinned_start >= kept else 0}
        else:
            local_end_index = local_end + current_end - global_end
            local_start_index = local_end_index - s
            record = {"action": "direct_insert", "pinned_shift": 0}
        temp_k[:, local_start_index:local_end_index] = roped_k
        temp_v[:, local_start_index:local_end_index] = v
        record.update(local_start_index=local_start_index, local_end_index=local_end_index, new_k=roped_k,
                      new_v=v, current_end=current_end)

        # The attended keys: the window of max_attention_size tokens ending at the new block, with the
        # kept prefix and a floating pinned chunk prepended when they fell out of it.
        window_start = max(0, local_end_index - self.max_attention_size)
        prepend_sink = kept > 0 and window_start > 0
        prepend_pinned = has_pinned and kept <= pinned_start < window_start
        pieces = []
        budget = self.max_attention_size
        if prepend_sink:
            pieces.append(slice(0, kept))
            budget -= kept
        if prepend_pinned:
            pieces.append(slice(pinned_start, pinned_start + pinned_len))
            budget -= pinned_len
        if pieces:
            floor = kept if prepend_sink else 0
            pieces.append(slice(max(floor, local_end_index - budget), local_end_index))
            k_att = torch.cat([temp_k[:, p] for p in pieces], dim=1)
            v_att = torch.cat([temp_v[:, p] for p in pieces], dim=1)
        else:
            k_att = temp_k[:, window_start:local_end_index]
            v_att = temp_v[:, window_start:local_end_index]
        return attention(roped_q, k_att, v_att), (current_end, local_end_index, record)


class MultiShotT2VCrossAttention(QKVOAttention):
    """Cross-attention to the text, K/V recomputed every call; a context batch of B x chunks attends chunk-wise."""

    def __init__(self, dim: int, num_heads: int, window_size=(-1, -1), qk_norm: bool = True, eps: float = 1e-6):
        super().__init__(dim, num_heads, qk_norm, eps)
        self.window_size = window_size

    def forward(self, x, context, context_lens=None, is_teacher_forcing=False, crossattn_cache=None):
        """x [B, L, C], context [B*chunks, L2, C]: chunk j of x's L tokens attends context j. The cache is not read."""
        if is_teacher_forcing:
            raise NotImplementedError("teacher forcing is training only; the reference covers inference")
        if context_lens is not None:
            raise NotImplementedError("per-sample context lengths: LongLive 2.0 inference passes none")
        b, length, c = x.shape
        n, d = self.num_heads, self.head_dim
        b_ctx = context.size(0)
        if b_ctx % b or length % (b_ctx // b):
            raise ValueError(f"context batch {b_ctx} must be a multiple of x batch {b} that divides its {length} tokens")
        chunks = b_ctx // b
        x = x.reshape(b_ctx, length // chunks, c)
        q = self.norm_q(self.q(x)).view(b_ctx, -1, n, d)
        k = self.norm_k(self.k(context)).view(b_ctx, -1, n, d)
        v = self.v(context).view(b_ctx, -1, n, d)
        out = self.o(attention(q, k, v).flatten(2))
        return out.reshape(b, length, c)


class CausalWanAttentionBlock(ModulatedBlock):
    """One transformer layer: modulated self-attention, cross-attention, modulated FFN (per-frame modulation)."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, local_attn_size: int = -1, sink_size: int = 0,
                 qk_norm: bool = True, cross_attn_norm: bool = False, eps: float = 1e-6):
        super().__init__(CausalWanSelfAttention, MultiShotT2VCrossAttention, dim, ffn_dim, num_heads, local_attn_size,
                         sink_size, qk_norm, cross_attn_norm, eps)

    def forward(self, x, e, seq_lens, grid_sizes, freqs, context, context_lens, block_mask, kv_cache=None,
                crossattn_cache=None, current_start=0, cache_start=None, t_scale=1.0, use_relative_rope=False,
                method="linear", original_seq_len=None, temporal_offset=0.0):
        """x [B, L, C]; e [B, F, 6, C] per-frame modulation; returns (x, (current_end, local_end, update record))."""
        return self.modulated(
            x, e,
            lambda h: self.self_attn(h, seq_lens, grid_sizes, freqs, block_mask, kv_cache, current_start, cache_start,
                                     t_scale=t_scale, use_relative_rope=use_relative_rope, method=method,
                                     original_seq_len=original_seq_len, temporal_offset=temporal_offset),
            lambda h: self.cross_attn(h, context, context_lens, crossattn_cache=crossattn_cache))


class CausalWanModel(WanGenerator):
    """LongLive 2.0's causal Wan2.2-TI2V-5B generator (KV-cached inference path, text to video)."""

    def __init__(self, model_type: str = "t2v", patch_size=(1, 2, 2), text_len: int = 512, in_dim: int = 16,
                 dim: int = 2048, ffn_dim: int = 8192, freq_dim: int = 256, text_dim: int = 4096, out_dim: int = 16,
                 num_heads: int = 16, num_layers: int = 32, local_attn_size: int = -1, sink_size: int = 0,
                 num_frame_per_block: int = 1, qk_norm: bool = True, cross_attn_norm: bool = True,
                 eps: float = 1e-6):
        if model_type not in ("t2v", "ti2v"):
            raise NotImplementedError(f"model_type {model_type!r}: the reference covers the text(-image)-to-video "
                                      "model without image-encoder conditioning ('t2v', 'ti2v')")

        def make_block() -> CausalWanAttentionBlock:
            return CausalWanAttentionBlock(dim, ffn_dim, num_heads, local_attn_size, sink_size, qk_norm,
                                           cross_attn_norm, eps)

        super().__init__(make_block, model_type, patch_size, text_len, in_dim, dim, ffn_dim, freq_dim, text_dim,
                         out_dim, num_heads, num_layers, local_attn_size, sink_size, num_frame_per_block, qk_norm,
                         cross_attn_norm, eps)
        # Set by LongLive 2.0's pipeline before inference (the shot offset at every shot boundary).
        self.t_scale = 1.0
        self.use_relative_rope = False
        self.rope_method = "linear"
        self.original_seq_len = None
        self.rope_temporal_offset = 0.0
        self.kv_quant_config = None
        self.init_weights()

    def forward(self, x, t, context, seq_len=None, clip_fea=None, y=None, kv_cache=None, crossattn_cache=None,
                current_start: int = 0, cache_start: int = 0, defer_cache_updates: bool = False):
        """[B, out_dim, F, H, W] (and the update records when defer_cache_updates). seq_len is unused, as in stock."""
        if kv_cache is None:
            raise NotImplementedError("the reference implements LongLive 2.0's KV-cached inference path; pass kv_cache")
        if clip_fea is not None or y is not None:
            raise NotImplementedError("image conditioning through clip_fea / y is not part of LongLive 2.0 inference")
        if t.dim() != 2:
            raise ValueError(f"t must be [B, F] (a timestep per latent frame), got shape {tuple(t.shape)}")
        check_rope_arguments(self.t_scale, self.use_relative_rope, self.rope_method, self.original_seq_len,
                             self.rope_temporal_offset)
        x, e, e0, context, grid_sizes, seq_lens = self.embed(x, t, context)
        records = []
        for index, block in enumerate(self.blocks):
            x, record = block(
                x, e=e0, seq_lens=seq_lens, grid_sizes=grid_sizes, freqs=self.freqs, context=context,
                context_lens=None, block_mask=self.block_mask, kv_cache=kv_cache[index],
                crossattn_cache=crossattn_cache[index], current_start=current_start, cache_start=cache_start,
                t_scale=self.t_scale, use_relative_rope=self.use_relative_rope, method=self.rope_method,
                original_seq_len=self.original_seq_len, temporal_offset=self.rope_temporal_offset)
            records.append((index, record))
        if not defer_cache_updates:
            self._apply_cache_updates(kv_cache, records)
        x = self.head(x, e.unsqueeze(2))
        output = torch.stack(self.unpatchify(x, grid_sizes))
        return (output, records) if defer_cache_updates else output

    def embed(self, x, t, context):
        """(tokens [B, L, C], e [B, F, C], e0 [B, F, 6, C], text [B, text_len, C], grid_sizes, seq_lens)."""
        x, grid_sizes, seq_lens = self.patchify(x)
        x = torch.cat(x)
        e = self.time_embedding(sinusoidal_embedding_1d(self.freq_dim, t.flatten()).unflatten(0, t.shape).type_as(x))
        e0 = self.time_projection(e).unflatten(2, (6, self.dim))
        return x, e, e0, self.embed_text(context), grid_sizes, seq_lens

    @staticmethod
    def _apply_cache_updates(kv_cache, records) -> None:
        """Commit the layers' update records: roll, insert, move a floating pinned chunk, advance the indices."""
        for index, (current_end, local_end_index, record) in records:
            cache = kv_cache[index]
            if record is not None:
                if record["action"] == "roll_and_insert":
                    roll_behind_prefix(cache["k"], cache["v"], record["sink_tokens"], record["num_evicted_tokens"],
                                       record["num_rolled_tokens"])
                    if record.get("pinned_shift", 0) > 0 and "pinned_start" in cache:
                        cache["pinned_start"].sub_(record["pinned_shift"])
                start, end = record["local_start_index"], record["local_end_index"]
                cache["k"][:, start:end] = record["new_k"]
                cache["v"][:, start:end] = record["new_v"]
            cache["global_end_index"].fill_(current_end)
            cache["local_end_index"].fill_(local_end_index)
