"""Reference of the Wan2.1 VAE decoder as LongLive v1.0 uses it (`wan/modules/vae.py`, `WanVAEWrapper`).

Only the decode side of the stock `WanVAE_` is here: the post-quant `conv2` (a 1x1x1 CausalConv3d,
z_dim -> z_dim) and `decoder` (Decoder3d). Module and parameter names are the stock ones, so the
`conv2.*` and `decoder.*` entries of `Wan2.1_VAE.pth` load with strict=True (see
`load_wan_vae_decoder`, which drops the file's `encoder.*` and `conv1.*` entries explicitly).

Layouts: latents z [B, z_dim=16, F, H, W] (channel-first, as the stock `WanVAE_.decode` takes them;
`WanVAEWrapper.decode_to_pixel` permutes from [B, F, C, H, W] before the call), pixels
[B, 3, 4F-3, 8H, 8W] in [-1, 1], float32. Decoding runs the stock protocol: un-normalise, `conv2`
on the whole clip, then the decoder one latent frame per call over a feature cache (a frame gives 4
pixel frames, the first 1). That protocol written out: docs/vae-decoder.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from longlive_triton.models.preset_base import lookup

__all__ = [
    "CACHE_T", "WAN21_LATENT_MEAN", "WAN21_LATENT_STD", "CausalConv3d", "RMS_norm", "Resample", "ResidualBlock",
    "AttentionBlock", "Decoder3d", "FeatCache", "WanVAEDecoder", "VAEPreset", "VAE_PRESETS", "get_vae_preset",
    "build_vae_decoder", "synthetic_vae_init_", "load_wan_vae_decoder", "VAECheckpointError",
]

CACHE_T = 2

# Per-channel statistics of the Wan2.1 VAE latent space (published with the Wan2.1 VAE; the numbers
# `WanVAE` and LongLive's `WanVAEWrapper` use). Latents seen by the generator are (mu - mean) / std.
WAN21_LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)

_REP = "Rep"  # slot marker of an upsample3d that has seen only the first chunk


class FeatCache:
    """The decoder's causal feature cache: slots read and written in module order, one pass per call.

    A slot holds None (nothing seen yet), the marker 'Rep' (upsample3d after the first chunk) or a
    tensor of the last <= CACHE_T input frames of one CausalConv3d. `begin()` rewinds the cursor
    before each decoder call (the stock `feat_idx = [0]`).
    """

    def __init__(self, num_slots: int):
        self.slots: list = [None] * num_slots
        self.idx = 0

    def begin(self) -> None:
        self.idx = 0

    def get(self):
        return self.slots[self.idx]

    def put(self, value) -> None:
        self.slots[self.idx] = value
        self.idx += 1


class CausalConv3d(nn.Conv3d):
    """Conv3d padded causally in time: the stock padding (pt, ph, pw) becomes (ph, pw) on both sides
    and 2*pt frames in front; frames from a cache replace that many zero frames."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        pt, ph, pw = self.padding
        # F.pad order: (w_left, w_right, h_top, h_bottom, t_front, t_back)
        self._padding = (pw, pw, ph, ph, 2 * pt, 0)
        self.padding = (0, 0, 0)

    def forward(self, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
        pad = list(self._padding)
        if cache_x is not None and pad[4] > 0:
            x = torch.cat([cache_x.to(x.device), x], dim=2)
            pad[4] -= cache_x.shape[2]
        return super().forward(F.pad(x, pad))


def _cached_conv(conv: CausalConv3d, x: torch.Tensor, cache: FeatCache | None) -> torch.Tensor:
    """Run `conv` on this chunk with its cache slot and store the frames the next chunk needs."""
    if cache is None:
        return conv(x)
    prev = cache.get()
    keep = x[:, :, -CACHE_T:].clone()
    if keep.shape[2] < CACHE_T and prev is not None:
        keep = torch.cat([prev[:, :, -1:].to(keep.device), keep], dim=2)
    out = conv(x, prev)
    cache.put(keep)
    return out


class RMS_norm(nn.Module):
    """L2-normalise over the channel dim, times sqrt(dim) and a per-channel gamma (plus optional bias).

    gamma has shape (dim, 1, 1, 1) for 5-D video tensors (images=False) and (dim, 1, 1) for 4-D
    images; channel_first=False normalises the last dim with gamma of shape (dim,).
    """

    def __init__(self, dim: int, channel_first: bool = True, images: bool = True, bias: bool = False):
        super().__init__()
        trailing = (1, 1) if images else (1, 1, 1)
        shape = (dim, *trailing) if channel_first else (dim,)
        self.channel_first = channel_first
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape)) if bias else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.normalize(x, dim=1 if self.channel_first else -1)
        return y * self.scale * self.gamma + self.bias


class _Upsample2x(nn.Module):
    """Nearest 2x in H and W, computed in float32 and cast back (the stock bf16 workaround)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x.float(), scale_factor=(2.0, 2.0), mode="nearest").type_as(x)


def _frames_to_images(x: torch.Tensor) -> torch.Tensor:
    b, c, t, h, w = x.shape  # b c t h w -> (b t) c h w
    return x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)


def _images_to_frames(x: torch.Tensor, t: int) -> torch.Tensor:
    bt, c, h, w = x.shape  # (b t) c h w -> b c t h w
    return x.reshape(bt // t, t, c, h, w).permute(0, 2, 1, 3, 4)


class Resample(nn.Module):
    """Decoder resampling: 'upsample2d' (nearest 2x + 3x3 conv to dim//2), 'upsample3d' (the same, after
    a causal time_conv that doubles the frames), or 'none'. The encoder's downsample modes are not here."""

    def __init__(self, dim: int, mode: str):
        super().__init__()
        if mode not in ("none", "upsample2d", "upsample3d"):
            raise ValueError(f"Resample mode {mode!r} is not part of the decoder (none, upsample2d, upsample3d)")
        self.dim = dim
        self.mode = mode
        if mode == "none":
            self.resample = nn.Identity()
        else:
            self.resample = nn.Sequential(_Upsample2x(), nn.Conv2d(dim, dim // 2, 3, padding=1))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, x: torch.Tensor, cache: FeatCache | None = None) -> torch.Tensor:
        if self.mode == "upsample3d" and cache is not None:
            x = self._upsample_time(x, cache)
        t = x.shape[2]
        return _images_to_frames(self.resample(_frames_to_images(x)), t)

    def _upsample_time(self, x: torch.Tensor, cache: FeatCache) -> torch.Tensor:
        prev = cache.get()
        if prev is None:  # first chunk: mark the slot, leave time alone
            cache.put(_REP)
            return x
        is_rep = isinstance(prev, str)
        keep = x[:, :, -CACHE_T:].clone()
        if keep.shape[2] < CACHE_T:
            head = torch.zeros_like(keep) if is_rep else prev[:, :, -1:].to(keep.device)
            keep = torch.cat([head, keep], dim=2)
        y = self.time_conv(x) if is_rep else self.time_conv(x, prev)
        cache.put(keep)
        b, c, t, h, w = x.shape
        # channels [2, c] -> two consecutive output frames per input frame
        return y.reshape(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, t * 2, h, w)


class ResidualBlock(nn.Module):
    """RMS_norm -> SiLU -> CausalConv3d(3) -> RMS_norm -> SiLU -> Dropout -> CausalConv3d(3), plus a
    1x1x1 CausalConv3d shortcut when the width changes (an identity otherwise)."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.residual = nn.Sequential(
            RMS_norm(in_dim, images=False), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMS_norm(out_dim, images=False), nn.SiLU(), nn.Dropout(dropout),
            CausalConv3d(out_dim, out_dim, 3, padding=1))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: FeatCache | None = None) -> torch.Tensor:
        h = self.shortcut(x)
        for layer in self.residual:
            x = _cached_conv(layer, x, cache) if isinstance(layer, CausalConv3d) else layer(x)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame separately, residual."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.norm = RMS_norm(dim)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)
        nn.init.zeros_(self.proj.weight)  # as the stock init

    def forward(self, x: torch.Tensor, cache: FeatCache | None = None) -> torch.Tensor:
        identity = x
        b, c, t, h, w = x.shape
        y = self.norm(_frames_to_images(x))
        # [bt, 3c, h, w] -> [bt, 1, hw, 3c] -> q, k, v [bt, 1, hw, c]
        qkv = self.to_qkv(y).reshape(b * t, 1, c * 3, h * w).permute(0, 1, 3, 2).contiguous()
        q, k, v = qkv.chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v)
        y = y.squeeze(1).permute(0, 2, 1).reshape(b * t, c, h, w)
        return _images_to_frames(self.proj(y), t) + identity


class Decoder3d(nn.Module):
    """conv1 (z_dim -> 4*dim) -> middle (res, attention, res) -> upsamples -> head (norm, SiLU, conv to RGB)."""

    def __init__(self, dim: int = 128, z_dim: int = 4, dim_mult=(1, 2, 4, 4), num_res_blocks: int = 2,
                 attn_scales=(), temperal_upsample=(False, True, True), dropout: float = 0.0):
        super().__init__()
        self.dim = dim
        self.z_dim = z_dim
        self.dim_mult = list(dim_mult)
        self.num_res_blocks = num_res_blocks
        self.attn_scales = list(attn_scales)
        self.temperal_upsample = list(temperal_upsample)

        mult = list(dim_mult)
        dims = [dim * u for u in [mult[-1]] + mult[::-1]]
        scale = 1.0 / 2 ** (len(mult) - 2)

        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(
            ResidualBlock(dims[0], dims[0], dropout), AttentionBlock(dims[0]),
            ResidualBlock(dims[0], dims[0], dropout))

        blocks: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i in (1, 2, 3):  # the previous Resample halved the width
                in_dim = in_dim // 2
            for _ in range(num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, out_dim, dropout))
                if scale in self.attn_scales:
                    blocks.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i != len(mult) - 1:
                blocks.append(Resample(out_dim, mode="upsample3d" if temperal_upsample[i] else "upsample2d"))
                scale *= 2.0
        self.upsamples = nn.Sequential(*blocks)

        self.head = nn.Sequential(
            RMS_norm(out_dim, images=False), nn.SiLU(), CausalConv3d(out_dim, 3, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: FeatCache | None = None) -> torch.Tensor:
        if cache is not None:
            cache.begin()
        x = _cached_conv(self.conv1, x, cache)
        for layer in self.middle:
            x = layer(x, cache) if isinstance(layer, ResidualBlock) else layer(x)
        for layer in self.upsamples:
            x = layer(x, cache)
        for layer in self.head:
            x = _cached_conv(layer, x, cache) if isinstance(layer, CausalConv3d) else layer(x)
        return x


def _count_causal_convs(module: nn.Module) -> int:
    return sum(isinstance(m, CausalConv3d) for m in module.modules())


class WanVAEDecoder(nn.Module):
    """The decode half of the stock `WanVAE_`: `conv2` then `decoder`, with the latent un-normalisation.

    `latent_mean` / `latent_std` are non-persistent buffers (not in the state dict, as in the stock,
    where they live on the wrapper).
    """

    def __init__(self, dim: int = 96, z_dim: int = 16, dim_mult=(1, 2, 4, 4), num_res_blocks: int = 2,
                 attn_scales=(), temperal_downsample=(False, True, True), dropout: float = 0.0,
                 latent_mean=WAN21_LATENT_MEAN, latent_std=WAN21_LATENT_STD):
        super().__init__()
        if len(latent_mean) != z_dim or len(latent_std) != z_dim:
            raise ValueError(f"latent mean/std need {z_dim} channels, got {len(latent_mean)}/{len(latent_std)}")
        self.dim = dim
        self.z_dim = z_dim
        self.temperal_downsample = list(temperal_downsample)
        self.temperal_upsample = self.temperal_downsample[::-1]
        self.conv2 = CausalConv3d(z_dim, z_dim, 1)
        self.decoder = Decoder3d(dim, z_dim, dim_mult, num_res_blocks, attn_scales, self.temperal_upsample, dropout)
        self._latent_stats = (tuple(latent_mean), tuple(latent_std))
        self.register_buffer("latent_mean", torch.tensor(latent_mean, dtype=torch.float32), persistent=False)
        self.register_buffer("latent_std", torch.tensor(latent_std, dtype=torch.float32), persistent=False)

    def _materialize_latent_stats(self) -> None:
        """Re-create the mean/std buffers beside the weights (after a meta-device build was loaded)."""
        p = self.conv2.weight
        mean, std = self._latent_stats
        self.latent_mean = torch.tensor(mean, dtype=torch.float32, device=p.device)
        self.latent_std = torch.tensor(std, dtype=torch.float32, device=p.device)

    # --- pieces shared with the streaming decoder -------------------------------------------------

    def new_cache(self) -> FeatCache:
        """An empty feature cache (the stock `clear_cache`: one slot per CausalConv3d of the decoder)."""
        return FeatCache(_count_causal_convs(self.decoder))

    def check_latents(self, z: torch.Tensor, what: str = "z") -> None:
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"{what} must be a tensor, got {type(z).__name__}")
        if z.dim() != 5:
            raise ValueError(f"{what} must be [B, {self.z_dim}, F, H, W] (5 dims), got shape {tuple(z.shape)}")
        if z.shape[1] != self.z_dim:
            raise ValueError(f"{what} has {z.shape[1]} channels, the VAE takes {self.z_dim} "
                             f"(layout [B, C, F, H, W]; got shape {tuple(z.shape)})")
        if min(z.shape) < 1:
            raise ValueError(f"{what} has an empty dimension: shape {tuple(z.shape)}")
        p = self.conv2.weight
        if z.dtype != p.dtype:
            raise ValueError(f"{what} dtype {z.dtype} does not match the VAE weights' dtype {p.dtype}")
        if z.device != p.device:
            raise ValueError(f"{what} is on {z.device}, the VAE weights on {p.device}")

    def unscale(self, z: torch.Tensor) -> torch.Tensor:
        """z / (1/std) + mean per channel, in z's dtype (the stock `scale = [mean, 1/std]`)."""
        mean = self.latent_mean.to(device=z.device, dtype=z.dtype).view(1, self.z_dim, 1, 1, 1)
        inv_std = 1.0 / self.latent_std.to(device=z.device, dtype=z.dtype)
        return z / inv_std.view(1, self.z_dim, 1, 1, 1) + mean

    def decode_frames(self, x: torch.Tensor, cache: FeatCache) -> torch.Tensor:
        """Decoder over post-conv2 latents x [B, z_dim, T, H, W], one latent frame per call, carrying `cache`.

        Returns the raw (unclamped) decoder output in the weights' dtype. A patched decoder that
        brings its own `decode_frames` (patch_vae's, which may take several frames per call) runs it."""
        own = getattr(self.decoder, "decode_frames", None)
        if own is not None:
            return own(x, cache)
        outs = [self.decoder(x[:, :, i:i + 1], cache) for i in range(x.shape[2])]
        return torch.cat(outs, dim=2)

    # --- whole-clip decode -----------------------------------------------------------------------

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [B, z_dim, F, H, W] (normalised, as the generator makes them) -> pixels
        [B, 3, 4F-3, 8H, 8W], float32, clamped to [-1, 1] (stock `decode` + the wrapper's clamp)."""
        self.check_latents(z)
        x = self.conv2(self.unscale(z))
        out = self.decode_frames(x, self.new_cache())
        return out.float().clamp_(-1, 1)


# --- presets and synthetic weights ---------------------------------------------------------------

@dataclass(frozen=True)
class VAEPreset:
    dim: int
    z_dim: int = 16
    dim_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple = ()
    temperal_downsample: tuple = (False, True, True)  # the decoder uses it reversed

    def kwargs(self) -> dict:
        return dict(dim=self.dim, z_dim=self.z_dim, dim_mult=self.dim_mult, num_res_blocks=self.num_res_blocks,
                    attn_scales=self.attn_scales, temperal_downsample=self.temperal_downsample)


VAE_PRESETS: dict[str, VAEPreset] = {
    "wan2.1": VAEPreset(dim=96),  # Wan2.1_VAE.pth (stock `_video_vae` cfg)
    "tiny": VAEPreset(dim=8),     # same structure and latent width, 12x narrower
}


def get_vae_preset(name: str) -> VAEPreset:
    return lookup(VAE_PRESETS, name, "VAE preset")


@torch.no_grad()
def synthetic_vae_init_(vae: WanVAEDecoder, seed: int = 0) -> WanVAEDecoder:
    """Seeded weights with signal everywhere: Xavier-normal convolutions (including the attention
    projection the stock init zeroes), small random biases, RMS_norm gammas near one, and a head conv
    scaled so the pixels mostly stay inside the [-1, 1] clamp. Private generator on the VAE's device."""
    device = vae.conv2.weight.device
    gen = torch.Generator(device).manual_seed(seed)
    for name, p in vae.named_parameters():
        noise = torch.randn(p.shape, generator=gen, device=device)
        if name.endswith("gamma"):
            p.copy_(1.0 + 0.1 * noise)
        elif name.endswith("bias"):
            p.copy_(0.02 * noise)
        elif p.dim() >= 2:
            fan_out, fan_in = p.shape[0], p[0].numel()
            std = (2.0 / (fan_in + fan_out)) ** 0.5
            if name == "decoder.head.2.weight":
                std *= 0.5
            p.copy_(std * noise)
        else:
            raise AssertionError(f"synthetic VAE init does not know parameter {name}")
    return vae


def build_vae_decoder(preset: str = "tiny", *, dtype: torch.dtype = torch.float32, device="cpu",
                      seed: int | None = 0) -> WanVAEDecoder:
    """A decoder at a named preset; seed=None keeps the stock init (pass device='meta' for names only)."""
    cfg = get_vae_preset(preset)
    with torch.device(device):
        vae = WanVAEDecoder(**cfg.kwargs())
    if seed is not None:
        synthetic_vae_init_(vae, seed)
    return vae.to(dtype=dtype).eval().requires_grad_(False)


# --- loading Wan2.1_VAE.pth ----------------------------------------------------------------------

class VAECheckpointError(ValueError):
    """The checkpoint's decoder keys do not match the module (missing, unexpected or mis-shaped)."""


_DECODE_PREFIXES = ("decoder.", "conv2.")
_ENCODE_PREFIXES = ("encoder.", "conv1.")  # the encode half of WanVAE_, not used for decoding


def _fmt(items, limit: int = 12) -> str:
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def load_wan_vae_decoder(module: WanVAEDecoder, path_or_state_dict, *, map_location="cpu") -> WanVAEDecoder:
    """Load the `conv2.*` and `decoder.*` tensors of a full `WanVAE_` state dict (e.g. Wan2.1_VAE.pth)
    into `module`, strictly.

    `path_or_state_dict`: a path to a torch pickle holding the flat state dict (loaded with
    weights_only=True), or the dict itself. `encoder.*` and `conv1.*` are dropped; any other key
    outside the decoder is an error, as is a missing decoder key or a shape mismatch; the error names
    the keys, and nothing is loaded. Modules on the meta device receive the checkpoint tensors as
    they are (assign=True; the latent mean/std buffers are then rebuilt beside them); otherwise values
    are copied into the existing parameters (converted to their dtype).

        vae = build_vae_decoder("wan2.1", device="meta", seed=None)
        load_wan_vae_decoder(vae, "wan_models/Wan2.1-T2V-1.3B/Wan2.1_VAE.pth").to("cuda")
    """
    if isinstance(path_or_state_dict, (str, Path)):
        sd = torch.load(path_or_state_dict, map_location=map_location, weights_only=True)
        what = repr(str(path_or_state_dict))
    else:
        sd, what = path_or_state_dict, "state dict"
    if not isinstance(sd, dict):
        raise VAECheckpointError(f"{what} holds a {type(sd).__name__}, not a state dict")

    decode_sd = {k: v for k, v in sd.items() if k.startswith(_DECODE_PREFIXES)}
    foreign = sorted(k for k in sd if not k.startswith(_DECODE_PREFIXES + _ENCODE_PREFIXES))
    expected = module.state_dict()
    missing = sorted(set(expected) - set(decode_sd))
    unexpected = sorted(set(decode_sd) - set(expected))
    mismatched = sorted(f"{k}: checkpoint {tuple(decode_sd[k].shape)} vs module {tuple(expected[k].shape)}"
                        for k in set(decode_sd) & set(expected) if decode_sd[k].shape != expected[k].shape)
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {_fmt(missing)}")
    if unexpected or foreign:
        problems.append(f"unexpected {len(unexpected) + len(foreign)}: {_fmt(unexpected + foreign)}")
    if mismatched:
        problems.append(f"shape mismatch {len(mismatched)}: {_fmt(mismatched)}")
    if problems:
        raise VAECheckpointError(f"{what} does not match {type(module).__name__} (dim={module.dim}, "
                                 f"z_dim={module.z_dim}): " + "; ".join(problems))
    assign = any(t.is_meta for t in module.parameters())
    module.load_state_dict(decode_sd, strict=True, assign=assign)
    if module.latent_mean.is_meta:  # not in the checkpoint: rebuild the constants next to the weights
        module._materialize_latent_stats()
    return module
