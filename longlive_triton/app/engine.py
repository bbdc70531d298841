"""What the `generate` and `serve` commands run: a generator, its VAE and a prompt encoder, ready to stream.

Two ways to get one:

- `embedded_engine`: no files at all. The `tiny` reference generator and a tiny Wan VAE decoder with
  seeded random weights, and prompt embeddings from a hash of the text. Real code path (patches,
  block loop, KV re-cache on switches, streaming decode), meaningless pictures; labelled as such.
- `real_engine`: LongLive-1.3B. Our reference generator at the sizes of Wan2.1's `config.json`,
  loaded strictly in LongLive's order (Wan2.1 base, LongLive generator, LoRA merged), the Wan2.1
  VAE decoder (its width read from the checkpoint), and the stock umT5-XXL encoder from the
  LongLive checkout, or precomputed embeddings.

Either way `patch_model` and `patch_vae` are applied unless the preset is `stock`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from longlive_triton.loading.checkpoints import CheckpointError, load_longlive
from longlive_triton.runtime.pipeline import BlockPipeline
from longlive_triton.models import build_model, get_preset
from longlive_triton.models.wan21_vae import VAEPreset, WanVAEDecoder, build_vae_decoder, load_wan_vae_decoder
from longlive_triton.app.embeddings import HashedPromptEmbeddings, PromptEncoder
from longlive_triton.loading.weights import WeightFiles

__all__ = ["Engine", "embedded_engine", "real_engine", "STOCK", "FRAMES_PER_BLOCK"]

STOCK = "stock"                     # the preset name for "do not patch"
FRAMES_PER_BLOCK = 3                # LongLive-1.3B's num_frame_per_block (the tiny preset keeps it)
_WEIGHTS_SEED = 0                   # the embedded model's weights; --seed only changes the noise
_TEXT_GAIN = 25.0                   # text embedding weights: std 0.02 -> 0.5 (see embedded_engine)
_CONFIG_KEYS = ("dim", "ffn_dim", "num_heads", "num_layers", "text_dim", "text_len", "freq_dim", "in_dim", "out_dim")


@dataclass
class Engine:
    model: torch.nn.Module
    vae: WanVAEDecoder
    encoder: PromptEncoder | None      # None: prompts come as precomputed embeddings only
    latent_shape: tuple[int, int, int]  # (channels, height, width) of one latent frame
    text_len: int
    text_dim: int
    device: torch.device
    dtype: torch.dtype
    label: str                          # what the weights are, said in every output
    reports: list[str] = field(default_factory=list)  # the patch reports, as text

    @property
    def pixel_size(self) -> tuple[int, int]:
        """(height, width) of a video frame."""
        return 8 * self.latent_shape[1], 8 * self.latent_shape[2]

    def noise(self, num_frames: int, seed: int) -> torch.Tensor:
        """LongLive's noise [1, F, 16, h, w]; seeds the global generator too, for the re-noising draws."""
        torch.manual_seed(seed)
        return torch.randn([1, num_frames, *self.latent_shape], device=self.device, dtype=self.dtype)

    def pipeline(self) -> BlockPipeline:
        return BlockPipeline(self.model)


def _patch(engine: Engine, preset: str) -> Engine:
    if preset == STOCK:
        engine.reports.append("preset stock: the generator and the VAE run unpatched (the stock math)")
        return engine
    from longlive_triton import patch_model, patch_vae  # Triton kernels load here, after the caller chose the interpreter

    engine.reports.append(str(patch_model(engine.model, preset)))
    engine.reports.append(str(patch_vae(engine.vae)))
    return engine


def embedded_engine(preset: str = "exact", *, device, dtype: torch.dtype = torch.bfloat16) -> Engine:
    """The tiny reference generator and VAE with seeded random weights (no files needed)."""
    device = torch.device(device)
    shapes = get_preset("tiny")
    model = build_model("tiny", dtype=dtype, device=device, seed=_WEIGHTS_SEED)
    # Drawn as the stock init draws them (std 0.02), the text embedding layers make the prompt all but
    # invisible in a random model; at std 0.5 a prompt switch visibly changes the picture.
    with torch.no_grad():
        for layer in (model.text_embedding[0], model.text_embedding[2]):
            layer.weight.mul_(_TEXT_GAIN)
    # On the CPU the small VAE convolutions are much faster in fp32; on a GPU it runs as LongLive's does.
    vae = build_vae_decoder("tiny", dtype=dtype if device.type == "cuda" else torch.float32, device=device,
                            seed=_WEIGHTS_SEED)
    encoder = HashedPromptEmbeddings(shapes.text_len, shapes.text_dim, device=device, dtype=dtype)
    label = ("RANDOM WEIGHTS: the tiny reference generator and VAE with seeded random weights, " + encoder.label
             + "; the pictures mean nothing (pass --wan/--longlive for LongLive-1.3B)")
    engine = Engine(model, vae, encoder, (shapes.in_dim, shapes.latent_height, shapes.latent_width),
                    shapes.text_len, shapes.text_dim, device, dtype, label)
    return _patch(engine, preset)


def model_sizes(config: Path | None) -> dict:
    """Generator sizes from Wan2.1's config.json (LongLive-1.3B's when there is none)."""
    if config is None:
        return {}
    try:
        doc = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config}: not a readable Wan config.json ({e})") from None
    if doc.get("model_type", "t2v") != "t2v":
        raise CheckpointError(f"{config}: model_type {doc.get('model_type')!r}; LongLive is a t2v model")
    return {k: doc[k] for k in _CONFIG_KEYS if k in doc}


def _load_vae(path: Path, device, dtype) -> WanVAEDecoder:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - an unreadable file is one clear error
        raise CheckpointError(f"VAE {str(path)!r} could not be read ({type(e).__name__}: {e})") from None
    if not isinstance(sd, dict) or "decoder.conv1.weight" not in sd:
        raise CheckpointError(f"VAE {str(path)!r} is not a Wan VAE state dict (no 'decoder.conv1.weight')")
    preset = VAEPreset(dim=sd["decoder.conv1.weight"].shape[0] // VAEPreset(dim=1).dim_mult[-1])
    with torch.device("meta"):
        vae = WanVAEDecoder(**preset.kwargs())
    load_wan_vae_decoder(vae, sd)
    return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)


def real_engine(files: WeightFiles, preset: str = "exact", *, device, height: int = 480, width: int = 832,
                encoder_src: str | None = None, dtype: torch.dtype = torch.bfloat16) -> Engine:
    """LongLive-1.3B from its checkpoints (see `weights.locate_weights`); the text encoder only if
    `files.text_encoder` is set (else prompts must come as embeddings)."""
    device = torch.device(device)
    if height % 16 or width % 16:
        raise ValueError(f"--height/--width must be multiples of 16 (the VAE's 8x and the 2x2 patch), "
                         f"got {height}x{width}")
    sizes = model_sizes(files.config)
    # fp32 while loading and merging the LoRA, then the stock cast (as LongLive: merge in fp32, then bf16).
    model = build_model("longlive-1.3b", dtype=torch.float32, device=device, seed=None, **sizes)
    loaded = load_longlive(model, base=files.base, generator=files.generator, lora=files.lora)
    model = model.to(dtype)
    vae = _load_vae(files.vae, device, dtype)
    encoder = None
    if files.text_encoder is not None:
        from longlive_triton.stock.text_encoder import load_stock_text_encoder

        encoder = load_stock_text_encoder(encoder_src, files.text_encoder, files.tokenizer,
                                          text_len=model.text_len, device=device, dtype=dtype)
        if encoder.model.dim != model.text_dim:
            raise CheckpointError(f"text encoder {files.text_encoder} gives {encoder.model.dim}-wide embeddings, "
                                  f"the generator takes {model.text_dim} (its text_dim)")
    lora = f"LoRA {files.lora} merged (rank {loaded.lora.rank})" if loaded.lora else "no LoRA"
    label = f"LongLive weights: {files.generator}, {lora}; VAE {files.vae}"
    engine = Engine(model, vae, encoder, (model.in_dim, height // 8, width // 8), model.text_len,
                    model.text_dim, device, dtype, label)
    return _patch(engine, preset)
