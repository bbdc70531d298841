"""Accuracy of FP8 window attention on q/k/v from a real forward of the reference model (1.3B shapes).

    python -m longlive_triton.bench.attention_accuracy [--blocks 5] [--json PATH]

Runs the reference LongLive-1.3B generator (seeded random weights) patched with the exact preset on
our Triton attention, streams blocks until the KV window is full, and captures, for every layer of
the last block's first denoising step, the roped q and the bf16 cache the attention reads. Each
layer's attention is then computed in fp32 (the reference), in bf16 (our kernel) and with each FP8
scheme; the table gives per scheme the worst layer's cosine and relative L2 against fp32.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from longlive_triton.kernels.fp8_kv_cache import k_head_scale, quantize_k_ref, quantize_rows_ref, quantize_v_groups_ref
from longlive_triton.kernels.window_attention import window_attention_fp8
from longlive_triton.models import build_model, get_preset
from longlive_triton.numerics import cosine, rel_l2
from longlive_triton.patch import patch_model
from longlive_triton.patches import window_self_attention as wsa
from longlive_triton.runtime.pipeline import BlockPipeline, PipelineConfig

# scheme -> (k scale mode, v scale mode); "per-tensor" is one scale per tensor (all heads); "bound"
# is the static per-head k scale our FP8 cache uses (kv_quant_append.k_head_scale).
SCHEMES = {"per-tensor": ("tensor", "tensor"), "head": ("head", "head"), "tile": ("tile", "tile"),
           "token": ("token", "token"), "ours: k bound, v tile": ("bound", "tile")}


def capture_layers(blocks: int, seed: int = 0, preset_name: str = "longlive-1.3b", device: str = "cuda") -> list[dict]:
    """Per layer: q [1, 4680, 12, 128] bf16 and the keys/values it attends to (gathered in order)."""
    preset = get_preset(preset_name)
    model = build_model(preset_name, dtype=torch.bfloat16, device=device, seed=seed)
    patch_model(model, {"name": "capture", "window_attention": True, "attention_backend": "triton",
                        "fused_glue": True, "cuda_graphs": False})
    gen = torch.Generator(device=device).manual_seed(seed)
    fpb = 3
    noise = torch.randn([1, blocks * fpb, preset.in_dim, preset.latent_height, preset.latent_width],
                        generator=gen, device=device).bfloat16()
    prompt = torch.randn([1, preset.text_len, preset.text_dim], generator=gen, device=device).bfloat16()
    captured: list[dict] = []
    recording = {"on": False}
    original = wsa.window_attention

    def capture(q, k_cache, v_cache, sink_end, win_start, win_end, **ring):
        if recording["on"] and len(captured) < len(model.blocks):
            se, ws, we = (int(t.reshape(-1)[0]) for t in (sink_end, win_start, win_end))
            shift = int(ring["shift"].reshape(-1)[0]) if ring.get("shift") is not None else None
            idx = torch.cat([torch.arange(se), torch.arange(max(ws, se), max(we, ws, se))]).to(q.device)
            if shift is not None:
                lo, size = ring["ring_lo"], ring["ring_size"]
                idx = torch.where(idx < lo, idx, lo + (idx - lo + shift) % size)
            captured.append({"q": q.clone(), "k": k_cache[:, idx].clone(), "v": v_cache[:, idx].clone()})
        return original(q, k_cache, v_cache, sink_end, win_start, win_end, **ring)

    wsa.window_attention = capture
    try:
        pipe = BlockPipeline(model, PipelineConfig(cuda_graphs=False))
        for i, _ in enumerate(pipe.iter_blocks(noise, prompt)):
            recording["on"] = i == blocks - 2  # the next block is the last: its first step is recorded
    finally:
        wsa.window_attention = original
    for layer, block in zip(captured, model.blocks):
        layer["norm_k"] = block.self_attn.norm_k.weight.detach().clone()
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return captured


def _quantize(x: torch.Tensor, mode: str, tile: int = 128, norm_k=None):
    """x [1, L, H, D] -> (e4m3, scale broadcastable to x) with the given granularity."""
    xf = x.float()
    if mode == "bound":
        s = k_head_scale(norm_k, x.shape[2]).reshape(1, 1, -1, 1)
        return (xf / s).clamp(-448, 448).to(torch.float8_e4m3fn), s
    if mode == "tensor":
        s = xf.abs().amax().reshape(1, 1, 1, 1)
    elif mode == "head":
        s = xf.abs().amax(dim=(0, 1, 3), keepdim=True)
    elif mode == "token":
        s = xf.abs().amax(dim=-1, keepdim=True)
    elif mode == "tile":
        L = x.shape[1]
        pad = -L % tile
        xp = torch.nn.functional.pad(xf, (0, 0, 0, 0, 0, pad))
        s = xp.reshape(1, (L + pad) // tile, tile, *x.shape[2:]).abs().amax(dim=(2, 4), keepdim=True)
        s = s.expand(-1, -1, tile, -1, -1).reshape(1, L + pad, x.shape[2], 1)[:, :L]
    else:
        raise ValueError(mode)
    s = s.clamp_min(1e-12) / 448.0
    return (xf / s).clamp(-448, 448).to(torch.float8_e4m3fn), s


def _attention_fp32(q, k, v):
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        return torch.nn.functional.scaled_dot_product_attention(
            q.float().transpose(1, 2), k.float().transpose(1, 2), v.float().transpose(1, 2)).transpose(1, 2)


def scheme_error(layer: dict, k_mode: str, v_mode: str) -> torch.Tensor:
    """The fp32 attention over e4m3-rounded q (per row), k and v (per scheme): the quantization error
    alone, independent of any kernel's arithmetic."""
    q8, qs = _quantize(layer["q"], "token")
    k8, ks = _quantize(layer["k"], k_mode, norm_k=layer["norm_k"])
    v8, vs = _quantize(layer["v"], v_mode)
    return _attention_fp32(q8.float() * qs, k8.float() * ks, v8.float() * vs)


def kernel_output(layer: dict, **options) -> torch.Tensor:
    """Our FP8 attention on the layer's q/k/v quantized as the FP8 cache holds them (q per row, k
    with the static head scales of its norm weight, v per 128-slot group)."""
    q, k, v = layer["q"], layer["k"], layer["v"]
    k_scale = k_head_scale(layer["norm_k"], k.shape[2])
    ops = (*quantize_rows_ref(q), quantize_k_ref(k, k_scale), k_scale, *quantize_v_groups_ref(v))
    L = k.shape[1]
    return window_attention_fp8(*ops, L, L, L, **options).float()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--preset-model", default="longlive-1.3b")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    layers = capture_layers(args.blocks, preset_name=args.preset_model, device=device)
    rows = []
    for i, layer in enumerate(layers):
        ref = _attention_fp32(layer["q"], layer["k"], layer["v"])
        row = {"layer": i}
        bf16 = torch.nn.functional.scaled_dot_product_attention(
            layer["q"].transpose(1, 2), layer["k"].transpose(1, 2), layer["v"].transpose(1, 2)).transpose(1, 2)
        candidates = {"bf16 SDPA": bf16.float()}
        for name, (k_mode, v_mode) in SCHEMES.items():
            candidates[f"fp8 rounding only, {name}"] = scheme_error(layer, k_mode, v_mode)
        if device == "cuda":
            candidates["fp8 kernel (ours)"] = kernel_output(layer)
            candidates["fp8 kernel, split 2"] = kernel_output(layer, split=2)
        for name, out in candidates.items():
            cos = cosine(out, ref)
            rel = rel_l2(out, ref)
            row[name] = {"cosine": cos, "rel_l2": rel}
        rows.append(row)
        print(json.dumps(row), flush=True)
    names = [k for k in rows[0] if k != "layer"]
    print("\n| scheme | worst cosine (layer) | worst rel L2 (layer) | mean rel L2 |")
    print("|---|---|---|---|")
    for name in names:
        cos = [(r[name]["cosine"], r["layer"]) for r in rows]
        rel = [(r[name]["rel_l2"], r["layer"]) for r in rows]
        print(f"| {name} | {min(cos)[0]:.6f} ({min(cos)[1]}) | {max(rel)[0]:.3e} ({max(rel)[1]}) | "
              f"{sum(r for r, _ in rel) / len(rel):.3e} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
