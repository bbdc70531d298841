"""The stock LongLive 2.0 generator and its inference pipeline: import them from a local checkout, build, drive.

    from longlive_triton.stock.longlive2 import load_stock_longlive2, build_stock_model2, stock_pipeline
    stock = load_stock_longlive2("/path/to/LongLive2")            # or env LONGLIVE_SRC (a 2.0 tree)
    model = build_stock_model2(stock, "tiny2", state_dict=reference.state_dict())
    pipe = stock_pipeline(stock, model, "tiny2", prompts={"a": emb_a, "The scene transitions. b": emb_b})
    with torch.inference_mode():  # as LongLive 2.0's inference.py runs it
        latents = pipe.inference(noise, [["a", "a", "The scene transitions. b"]], return_latents=True)

LongLive 2.0 is branch `main` of NVlabs/LongLive (Wan2.2-TI2V-5B). Nothing here runs when
`longlive_triton` is imported, and no LongLive code is part of this package: the stock source is read
from the checkout at run time. What is shared with the v1.0 importer (finding the tree, bare packages,
the attention stand-in) is `longlive_triton.stock.source`.

How `wan_5b.modules.causal_model` and `pipeline.causal_diffusion_inference` are imported without
LongLive 2.0's dependencies:

* `wan_5b`, `wan_5b.modules`, `wan_5b.utils`, `utils` and `pipeline` are bare packages: their
  `__init__` files (which import T5, the VAEs, the training code) are not run.
* Stand-ins, in `sys.modules` only during the import: `diffusers` (ModelMixin = nn.Module, no config
  kept; only when diffusers is not installed), `einops` (when not installed; used by the GAN head and the
  VAE, never by inference), `transformers`' `x_clip_loss` (a training loss; when transformers is not
  installed), `flash_attn` (the SDPA kernel of `source.flash_attn_varlen_func`), `omegaconf` (when not
  installed: `utils.config` imports it for config loading, which inference here does not do), and the
  modules the wrapper imports for what this importer replaces: `wan_5b.modules.tokenizers`,
  `wan_5b.modules.t5` and `wan_5b.modules.vae2_2` (the text encoder and VAE are given to the pipeline),
  `utils.dataset` (its scene-cut prefix only, read from the file). Without diffusers the UniPC scheduler
  (`wan_5b.utils.fm_solvers*`) cannot be imported: `FlowMatchEuler` below stands in, a first-order
  flow-matching step on the same timesteps. A parity run drives both generators through one pipeline,
  so both see the same sampler either way.
* After the import the stock attention calls the SDPA stand-in whatever flash-attn, FA3, FA4 or
  TransformerEngine is installed (parity needs one kernel), and `flash_attention` in `attention`,
  `model` and `causal_model` (the multi-shot cross-attention calls it by name) runs the stock function
  on CUDA tensors and its CPU equivalent on CPU tensors.
* The stock Triton RoPE and adaLN kernels (`utils/rope_triton.py`, `utils/adaln_triton.py`, on by
  default in LongLive 2.0, `LLV2_TRITON_ROPE` / `LLV2_TRITON_ADALN`) stay on where CUDA is available
  and are turned off on a CPU (they need a GPU driver): `triton_kernels=` chooses. Off, RoPE is the
  fp64 complex path and adaLN eager LayerNorm + modulate, which is what our reference computes.

Two pieces of stock module state matter to whoever drives the stock model. Its attention reads the cache
indices and the pinned chunk from `causal_model._CURRENT_GRID_META`, which the wrapper
(`WanDiffusionWrapper._call_model`) fills from layer 0's cache before every call: call the stock model
through its wrapper (`pipe.generator`, `stock_forward`), not directly, or it reads the previous call's
indices. Its RoPE table cache `_FREQS_I_CACHE` is keyed by grid and position, not by head dim:
`build_stock_model2` empties it, so a model of other sizes built earlier leaves no entries behind.
"""
from __future__ import annotations

import ast
import importlib
import os
import types
from pathlib import Path

import torch
import torch.nn as nn

from longlive_triton.stock.source import (FAMILY_NAMES, bare_packages, device_dispatch, diffusers_standins,
                                          einops_standin, flash_attn_varlen_func, installed, instantiate, module,
                                          resolve_src, standins_during_import)

__all__ = ["StockLongLive2", "load_stock_longlive2", "resolve_stock_src2", "build_stock_model2", "stock_generator",
           "stock_pipeline", "prepare_inference", "stock_forward", "PromptTable", "FlowMatchEuler", "AttrDict",
           "SCENE_CUT_PREFIX"]

_REQUIRED_FILES = ("wan_5b/modules/model.py", "wan_5b/modules/attention.py", "utils/position_embedding_utils.py",
                   "utils/config.py", "utils/scheduler.py", "utils/wan_5b_wrapper.py", "utils/dataset.py",
                   "utils/prompt_conditioning.py", "utils/i2v_conditioning.py",
                   "pipeline/causal_diffusion_inference.py")
# Text that marks the 2.0 cached path: the multi-shot pinned sink and the shot RoPE offset.
_V2_MARKERS = ("pinned_start", "rope_temporal_offset", "class MultiShotT2VCrossAttention")
_PACKAGES = ("wan_5b", "wan_5b.modules", "wan_5b.utils", "utils", "pipeline")
_TRITON_MODULES = ("utils.rope_triton", "utils.adaln_triton")
# What LongLive 2.0's pipeline looks for at the start of a block's prompt (utils/dataset.py).
SCENE_CUT_PREFIX = "The scene transitions. "

_LOADED: dict[Path, "StockLongLive2"] = {}


class StockLongLive2(types.SimpleNamespace):
    """What `load_stock_longlive2` returns: the stock modules, classes, and how they were loaded.

    Attributes: src (Path), causal_model, model, attention, wrapper (utils.wan_5b_wrapper), pipeline
    (pipeline.causal_diffusion_inference), config (utils.config), CausalWanModel, WanDiffusionWrapper,
    CausalDiffusionInferencePipeline, triton_kernels (bool), standins (names replaced during the
    import), notes (what was changed, in words).
    """


class AttrDict(dict):
    """A dict read by key or attribute, as LongLive's OmegaConf configs are (missing attribute: AttributeError)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class FlowMatchEuler:
    """Stand-in for `FlowUniPCMultistepScheduler` when diffusers is absent: the same timesteps, Euler steps.

    set_timesteps(n, device, shift): sigmas n points from 1 - 1/num_train_timesteps down (exclusive of 0),
    shifted s -> shift*s / (1 + (shift - 1)*s); timesteps = sigmas * num_train_timesteps as int64, computed
    as the stock solver computes them. step(flow, t, x) -> (x + (sigma_next - sigma) * flow,), flow = noise - x0.
    """

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, use_dynamic_shifting: bool = False):
        if use_dynamic_shifting:
            raise NotImplementedError("FlowMatchEuler stand-in: dynamic shifting is not supported")
        self.num_train_timesteps = num_train_timesteps
        self.shift = shift

    def set_timesteps(self, num_inference_steps: int, device=None, shift: float | None = None):
        import numpy as np  # numpy's linspace, as the stock solver: torch's rounds differently

        shift = self.shift if shift is None else shift
        # The stock sigma_max: 1 - 1/num_train_timesteps as the float32 its sigma table holds.
        top = float(np.float32(1.0 - 1.0 / self.num_train_timesteps))
        sigmas = np.linspace(top, 0.0, num_inference_steps + 1)[:-1]
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
        self.timesteps = torch.from_numpy(sigmas * self.num_train_timesteps).to(device=device, dtype=torch.int64)
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        self._index = 0

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = False):
        sigma, sigma_next = self.sigmas[self._index].item(), self.sigmas[self._index + 1].item()
        self._index += 1
        return (sample + (sigma_next - sigma) * model_output,)


def _scene_cut_prefix(src: Path) -> str:
    """DEFAULT_SCENE_CUT_PREFIX as utils/dataset.py assigns it (read, not imported: the module needs PIL)."""
    tree = ast.parse((src / "utils/dataset.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "DEFAULT_SCENE_CUT_PREFIX"
                                                for t in node.targets):
            return ast.literal_eval(node.value)
    raise ValueError(f"{src / 'utils/dataset.py'} assigns no DEFAULT_SCENE_CUT_PREFIX")


def resolve_stock_src2(src_dir: str | os.PathLike | None = None) -> Path:
    """The LongLive 2.0 checkout: `src_dir`, else $LONGLIVE_SRC; checked to hold the generator and pipeline files."""
    src = resolve_src(src_dir, "longlive2", _REQUIRED_FILES)
    text = (src / "wan_5b/modules/causal_model.py").read_text(encoding="utf-8", errors="replace")
    absent = [m for m in (*_V2_MARKERS, "class CausalWanModel") if m not in text]
    if absent:
        raise ValueError(f"{src / 'wan_5b/modules/causal_model.py'} is not {FAMILY_NAMES['longlive2']}'s causal "
                         f"model (lacks {absent})")
    return src


def _standin_modules(src: Path) -> tuple[dict[str, types.ModuleType], list[str]]:
    mods: dict[str, types.ModuleType] = {}
    notes: list[str] = []
    has_diffusers = installed("diffusers")
    if not has_diffusers:
        mods.update(diffusers_standins())
        notes.append("diffusers is not installed: ModelMixin is nn.Module, ConfigMixin empty, "
                     "register_to_config the identity")
        mods["wan_5b.utils.fm_solvers"] = module(
            "wan_5b.utils.fm_solvers", FlowDPMSolverMultistepScheduler=None, get_sampling_sigmas=None,
            retrieve_timesteps=None)
        mods["wan_5b.utils.fm_solvers_unipc"] = module("wan_5b.utils.fm_solvers_unipc",
                                                       FlowUniPCMultistepScheduler=FlowMatchEuler)
        notes.append("diffusers is not installed: the UniPC sampler is FlowMatchEuler (same timesteps, Euler steps)")
    if not installed("einops"):
        mods["einops"] = einops_standin()
        notes.append("einops is not installed: a stand-in whose functions raise (GAN head and VAE only)")
    if not installed("transformers"):
        def x_clip_loss(*args, **kwargs):
            raise NotImplementedError("x_clip_loss stand-in from longlive_triton.stock.longlive2 (a training loss)")

        for name in ("transformers", "transformers.models", "transformers.models.x_clip"):
            mods[name] = module(name, path=Path(f"/nonexistent/{name.replace('.', '/')}-standin"))
        mods["transformers.models.x_clip.modeling_x_clip"] = module(
            "transformers.models.x_clip.modeling_x_clip", x_clip_loss=x_clip_loss)
        notes.append("transformers is not installed: x_clip_loss (training only) is a stand-in that raises")
    if not installed("omegaconf"):
        class OmegaConf:
            """Stand-in: utils.config imports it; only config loading (not done here) uses it."""

        mods["omegaconf"] = module("omegaconf", OmegaConf=OmegaConf)
        notes.append("omegaconf is not installed: a stand-in (config files are not loaded here)")

    def unavailable(what):
        def refuse(*args, **kwargs):
            raise NotImplementedError(f"{what} is a stand-in of longlive_triton.stock.longlive2: give the pipeline "
                                      "a text encoder and a VAE")
        return refuse

    mods["wan_5b.modules.tokenizers"] = module("wan_5b.modules.tokenizers",
                                               HuggingfaceTokenizer=unavailable("HuggingfaceTokenizer"))
    mods["wan_5b.modules.t5"] = module("wan_5b.modules.t5", umt5_xxl=unavailable("umt5_xxl"))
    mods["wan_5b.modules.vae2_2"] = module("wan_5b.modules.vae2_2", _video_vae=unavailable("_video_vae"))
    mods["utils.dataset"] = module("utils.dataset", DEFAULT_SCENE_CUT_PREFIX=_scene_cut_prefix(src))
    notes.append("wan_5b.modules.tokenizers, t5 and vae2_2 are stand-ins (the pipeline is given its text encoder "
                 "and VAE); utils.dataset gives its scene-cut prefix only")
    mods["flash_attn"] = module("flash_attn", flash_attn_varlen_func=flash_attn_varlen_func,
                                __version__="0+longlive_triton.standin")
    return mods, notes


def _set_triton_kernels(ns: StockLongLive2, on: bool) -> None:
    if on:
        with bare_packages(ns.src, _PACKAGES):
            for name in _TRITON_MODULES:  # imported now: the stock code imports them lazily, by name
                importlib.import_module(name)
    ns.causal_model._TRITON_ROPE_ENABLED = on
    ns.causal_model._TRITON_ADALN_ENABLED = on
    ns.triton_kernels = on


def load_stock_longlive2(src_dir: str | os.PathLike | None = None, *, triton_kernels: bool | None = None
                         ) -> StockLongLive2:
    """Import LongLive 2.0's `wan_5b.modules.causal_model`, wrapper and inference pipeline from a checkout.

    src_dir: the checkout (None: $LONGLIVE_SRC). triton_kernels: the stock Triton RoPE and adaLN kernels
    on or off (None: on where CUDA is available, LongLive 2.0's default there; off on a CPU). Loading
    twice from the same tree returns the same namespace (with `triton_kernels` applied); a second 2.0
    tree in the same process is refused (the module names would clash).
    """
    src = resolve_stock_src2(src_dir)
    on = torch.cuda.is_available() if triton_kernels is None else bool(triton_kernels)
    if src in _LOADED:
        _set_triton_kernels(_LOADED[src], on)
        return _LOADED[src]
    if _LOADED:
        raise ImportError(f"the stock LongLive 2.0 code is already loaded from {next(iter(_LOADED))}; "
                          f"one process can hold one 2.0 tree, not also {src}")
    notes = ["wan_5b, wan_5b.modules, wan_5b.utils, utils and pipeline are bare packages: their __init__ files "
             "are not run"]
    try:  # transformers (through peft) probes flash_attn.__spec__: let it do so before any stand-in
        importlib.import_module("peft")
    except ImportError:
        pass
    standins, standin_notes = _standin_modules(src)
    notes += standin_notes
    names = ("wan_5b.modules.attention", "wan_5b.modules.model", "wan_5b.modules.causal_model",
             "utils.wan_5b_wrapper", "pipeline.causal_diffusion_inference", "utils.config")
    with bare_packages(src, _PACKAGES), standins_during_import(standins):
        try:
            mods = {name: importlib.import_module(name) for name in names}
        except BaseException:
            import sys
            for name in names:
                sys.modules.pop(name, None)
            raise
    attention, model, causal_model = (mods[n] for n in names[:3])
    # One attention kernel for both generators: the SDPA stand-in, whatever else is installed.
    attention.flash_attn = standins["flash_attn"]
    attention.FLASH_ATTN_2_AVAILABLE = True
    for flag in ("FLASH_ATTN_3_AVAILABLE", "FLASH_ATTN_4_AVAILABLE", "TE_DPA_AVAILABLE"):
        setattr(attention, flag, False)
    dispatch = device_dispatch(attention.flash_attention, "longlive_triton.stock.longlive2")
    for mod in (attention, model, causal_model):
        mod.flash_attention = dispatch
    notes.append("wan_5b.modules.attention uses the SDPA flash_attn stand-in (FA3, FA4, TE off); flash_attention in "
                 "attention, model and causal_model calls the stock function on CUDA tensors and its CPU "
                 "equivalent on CPU tensors")
    ns = StockLongLive2(src=src, causal_model=causal_model, model=model, attention=attention,
                        wrapper=mods["utils.wan_5b_wrapper"], pipeline=mods["pipeline.causal_diffusion_inference"],
                        config=mods["utils.config"], CausalWanModel=causal_model.CausalWanModel,
                        WanDiffusionWrapper=mods["utils.wan_5b_wrapper"].WanDiffusionWrapper,
                        CausalDiffusionInferencePipeline=mods["pipeline.causal_diffusion_inference"]
                        .CausalDiffusionInferencePipeline,
                        standins=sorted(standins), notes=notes, triton_kernels=False)
    _set_triton_kernels(ns, on)
    notes.append(f"the stock Triton RoPE and adaLN kernels are {'on' if on else 'off (fp64 RoPE, eager adaLN)'}")
    _LOADED[src] = ns
    return ns


def _preset(preset):
    if isinstance(preset, str):
        from longlive_triton.models.longlive2.presets import get_preset
        return get_preset(preset)
    return preset


def build_stock_model2(stock: StockLongLive2 | str | os.PathLike | None = None, model_kwargs: dict | str = "tiny2",
                       *, device="cpu", dtype: torch.dtype = torch.float32, state_dict: dict | None = None
                       ) -> nn.Module:
    """LongLive 2.0's `CausalWanModel` with explicit arguments, on `device` in `dtype`, eval mode, no grad.

    stock: a `load_stock_longlive2` namespace, or a source path for it (None: $LONGLIVE_SRC).
    model_kwargs: constructor arguments, or a preset name of `longlive_triton.models.longlive2.presets`.
    state_dict: weights to load with strict=True (e.g. our reference's `state_dict()`); the model is then
    built on the meta device and materialised on `device`, its RoPE table recomputed on the CPU with the
    stock `rope_params`. Without weights the stock init runs on the CPU (it zeroes head.head.weight,
    so the model predicts zeros) and the model is moved to `device`.
    """
    if not isinstance(stock, StockLongLive2):
        stock = load_stock_longlive2(stock)
    stock.causal_model._FREQS_I_CACHE.clear()  # keyed without the head dim (see the module docstring)
    if isinstance(model_kwargs, str):
        model_kwargs = _preset(model_kwargs).model_kwargs()
    return instantiate(stock.CausalWanModel, dict(model_kwargs), stock.causal_model.rope_params, device=device,
                       dtype=dtype, state_dict=state_dict)


def stock_generator(stock: StockLongLive2, model: nn.Module, *, timestep_shift: float = 5.0) -> nn.Module:
    """LongLive 2.0's `WanDiffusionWrapper` around `model` (any generator with the 2.0 call protocol).

    The wrapper's constructor loads the 5B checkpoint from wan_models/; this builds the same object around
    a given model instead: its flow-matching scheduler (1000 training steps, `timestep_shift`), no compile.
    """
    cls = stock.WanDiffusionWrapper
    wrapper = cls.__new__(cls)
    nn.Module.__init__(wrapper)
    wrapper.model = model
    wrapper.uniform_timestep = False  # causal: a timestep per frame
    wrapper.scheduler = stock.wrapper.FlowMatchScheduler(shift=timestep_shift, sigma_min=0.0, extra_one_step=True)
    wrapper.scheduler.set_timesteps(1000, training=True)
    wrapper.seq_len = 28160
    wrapper.post_init()
    wrapper._compiled_model_call = None
    return wrapper


class PromptTable(nn.Module):
    """A text encoder for the stock pipeline: prompt strings looked up in a table of embeddings [L, text_dim].

    LongLive 2.0 encodes one prompt per block; a block whose prompt starts with `SCENE_CUT_PREFIX` is a
    scene cut. Every embedding must have the same length (the stock encoder pads to 512).
    """

    def __init__(self, prompts: dict[str, torch.Tensor]):
        super().__init__()
        lengths = {tuple(e.shape) for e in prompts.values()}
        if len(lengths) != 1:
            raise ValueError(f"prompt embeddings must share one shape [L, text_dim], got {sorted(lengths)}")
        self.prompts = dict(prompts)

    def forward(self, text_prompts: list[str]) -> dict:
        missing = [p for p in text_prompts if p not in self.prompts]
        if missing:
            raise KeyError(f"no embedding for prompts {missing}")
        return {"prompt_embeds": torch.stack([self.prompts[p] for p in text_prompts])}


def stock_pipeline(stock: StockLongLive2, model: nn.Module, preset="tiny2", *, prompts: dict[str, torch.Tensor],
                   **inference) -> nn.Module:
    """LongLive 2.0's own `CausalDiffusionInferencePipeline` driving `model`, set up as `configs/inference.yaml`.

    preset: a `longlive_triton.models.longlive2.presets` name or preset: the latent shape, block, window,
    sink and multi-shot settings and the sampler. `inference` overrides keys of the config's `inference`
    section (sampling_steps, sink_size, multi_shot_sink, multi_shot_rope_offset, local_attn_size,
    guidance_scale, independent_first_frame: with an `initial_latent` of one frame, LongLive 2.0's I2V, the
    first frame kept clean and its timestep zeroed in the first block). prompts: the text encoder's table (`PromptTable`). Run it with
    `pipe.inference(noise [B, F, C, H, W], [[prompt per block]], return_latents=True)`.
    At a preset other than the real one the stock config table (`utils.config.wan_default_config`,
    which sizes the caches) gets an entry for it.
    """
    cfg = _preset(preset)
    model_name = "Wan2.2-TI2V-5B"
    table = stock.config.wan_default_config
    if (cfg.num_heads, cfg.head_dim, cfg.num_layers) != tuple(table[model_name][k] for k in
                                                              ("num_heads", "head_dim", "num_transformer_blocks")):
        model_name = f"longlive_triton {cfg.dim}x{cfg.num_layers} (5B layout)"
        table.setdefault(model_name, dict(table["Wan2.2-TI2V-5B"], num_heads=cfg.num_heads, head_dim=cfg.head_dim,
                                          num_transformer_blocks=cfg.num_layers))
    section = AttrDict(sampling_steps=cfg.sampling_steps, sink_size=cfg.sink_size, guidance_scale=1.0,
                       multi_shot_sink=cfg.multi_shot_sink, multi_shot_rope_offset=cfg.multi_shot_rope_offset,
                       streaming_vae=False, async_vae=False, vae_type="wan")
    unknown = set(inference) - set(section) - {"local_attn_size", "independent_first_frame"}
    if unknown:
        raise ValueError(f"unknown inference settings {sorted(unknown)}")
    section.update(inference)
    args = AttrDict(
        model_kwargs=AttrDict(model_name=model_name, timestep_shift=cfg.timestep_shift,
                              num_frame_per_block=cfg.num_frame_per_block, local_attn_size=cfg.local_attn_size),
        num_frame_per_block=cfg.num_frame_per_block, timestep_shift=cfg.timestep_shift,
        # The latent shape: the pipeline's frame_seq_length is H*W/4 (the (2, 2) patch).
        image_or_video_shape=[1, cfg.num_frame_per_block, cfg.in_dim, cfg.latent_height, cfg.latent_width],
        inference=section)
    return stock.CausalDiffusionInferencePipeline(args, device=None, generator=stock_generator(
        stock, model, timestep_shift=cfg.timestep_shift), text_encoder=PromptTable(prompts), vae=nn.Identity())


def prepare_inference(pipe, *, batch_size: int = 1, dtype=torch.float32, device="cpu",
                      rope_temporal_offset: float = 0.0) -> None:
    """What the stock `inference()` does before its block loop, for driving single forwards by hand.

    Fresh KV and cross-attention caches as its `_initialize_kv_cache` builds them (`pipe.kv_cache_pos`,
    `pipe.crossattn_cache_pos`), the window, sink and global-sink sizes set on every module by its own
    setters, and the shot RoPE offset on the model. The settings stay until the next call.
    """
    pipe._initialize_kv_cache(batch_size=batch_size, dtype=dtype, device=device)
    pipe._initialize_crossattn_cache(batch_size=batch_size, dtype=dtype, device=device)
    dit = pipe._dit_model
    dit.local_attn_size = pipe.local_attn_size
    pipe._set_all_modules_max_attention_size(pipe.local_attn_size)
    pipe._set_all_modules_sink_size(pipe.sink_size)
    pipe._set_all_modules_global_sink_size(pipe.global_sink_size)
    dit.rope_temporal_offset = rope_temporal_offset


def stock_forward(pipe, latents: torch.Tensor, prompt_embeds: torch.Tensor, timestep: torch.Tensor | float,
                  start_frame: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One generator call as the stock block loop makes it: (flow_pred, x0_pred), both [B, F, C, H, W].

    latents [B, F, C, H, W] at latent frames start_frame..; prompt_embeds [B, L, text_dim]; timestep a
    number or [B, F]. Call it under torch.inference_mode(), as LongLive 2.0's inference.py runs its
    pipeline: the stock Triton RoPE and adaLN kernels (when on) only run with grad off. The caches of `prepare_inference` are used and updated (the stock update records
    are applied after the forward, or by the wrapper under LLV2_DEFER_KV_UPDATES=1). A scene cut is
    `pipe._pin_current_chunk(pipe.kv_cache_pos, frames)` after the block's cache pass, and the shot
    offset `pipe._dit_model.rope_temporal_offset = shot_index * offset`, as the stock loop does.
    """
    b, f = latents.shape[:2]
    if not torch.is_tensor(timestep):
        timestep = torch.full([b, f], float(timestep), device=latents.device, dtype=torch.float32)
    return pipe.generator(noisy_image_or_video=latents, conditional_dict={"prompt_embeds": prompt_embeds},
                          timestep=timestep, kv_cache=pipe.kv_cache_pos, crossattn_cache=pipe.crossattn_cache_pos,
                          current_start=start_frame * pipe.frame_seq_length,
                          cache_start=start_frame * pipe.frame_seq_length)
