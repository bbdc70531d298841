"""The stock text encoder: LongLive's umT5-XXL encoder and tokenizer, imported from a LongLive checkout.

    from longlive_triton.stock.text_encoder import load_stock_text_encoder
    enc = load_stock_text_encoder(src, "wan_models/Wan2.1-T2V-1.3B/models_t5_umt5-xxl-enc-bf16.pth",
                                  "wan_models/Wan2.1-T2V-1.3B/google/umt5-xxl", text_len=512,
                                  device="cuda", dtype=torch.bfloat16)
    [emb] = enc.encode(["a cat"])                 # [1, 512, 4096], padding rows zero

No LongLive code is part of this package: `wan/modules/t5.py` and `tokenizers.py` are imported
from the checkout named by `src` (or $LONGLIVE_SRC), with `wan` and `wan.modules` registered as
bare packages so their `__init__` files (the generator, VAE and CLIP stacks) do not run, as
`longlive_triton.stock.longlive1` does. The tokenizer needs `transformers`, `ftfy` and `regex`. Without CUDA,
`torch.cuda.current_device` answers 0 during the import (t5.py calls it in a default argument).

The encoder's sizes are read from the checkpoint's tensor shapes and passed to the stock
`umt5_xxl(encoder_only=True, ...)`, so the real file builds umT5-XXL and a small file written in
the same format (the tests') builds a small encoder through the same classes. The model is built on
the meta device and receives the checkpoint's tensors (strict), then moves to `device` in `dtype`.
`encode` does what LongLive's `WanTextEncoder.forward` does: tokenize to `text_len` with the
whitespace clean, run the encoder with the attention mask, zero the rows past each prompt's length.
"""
from __future__ import annotations

import importlib
import os
import re
import sys
import types
from pathlib import Path
from typing import Sequence

import torch

from longlive_triton.loading.checkpoints import CheckpointError
from longlive_triton.stock.longlive1 import _check_package_slots, _module, resolve_stock_src

__all__ = ["StockTextEncoder", "load_stock_text_encoder", "t5_encoder_sizes"]

_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def _import_stock_t5(src: Path) -> tuple[types.ModuleType, types.ModuleType]:
    _check_package_slots(src)
    for name in ("wan", "wan.modules"):
        if name not in sys.modules:
            sys.modules[name] = _module(name, path=src / name.replace(".", "/"))
    sys.modules["wan"].modules = sys.modules["wan.modules"]
    # t5.py evaluates torch.cuda.current_device() as a default argument of T5EncoderModel (a class not
    # used here) when it is imported; without CUDA that call fails, so it answers 0 during the import.
    current_device = torch.cuda.current_device
    if not torch.cuda.is_available():
        torch.cuda.current_device = lambda: 0
    try:
        t5 = importlib.import_module("wan.modules.t5")
    except ImportError as e:
        sys.modules.pop("wan.modules.t5", None)
        sys.modules.pop("wan.modules.tokenizers", None)
        raise ImportError(f"the stock text encoder ({src}/wan/modules/t5.py) could not be imported: {e}. "
                          f"Its tokenizer needs transformers, ftfy and regex: "
                          f"pip install 'longlive-triton[text]'") from e
    finally:
        torch.cuda.current_device = current_device
    return t5, sys.modules["wan.modules.tokenizers"]


def t5_encoder_sizes(state_dict: dict) -> dict:
    """The `umt5_xxl` arguments that give a T5Encoder of this state dict's shapes."""
    try:
        vocab, dim = state_dict["token_embedding.weight"].shape
        layers = 1 + max(int(m.group(1)) for k in state_dict if (m := _BLOCK.match(k)))
        shared = "pos_embedding.embedding.weight" in state_dict
        buckets, heads = state_dict["pos_embedding.embedding.weight" if shared
                                    else "blocks.0.pos_embedding.embedding.weight"].shape
        return dict(vocab_size=vocab, dim=dim, dim_attn=state_dict["blocks.0.attn.q.weight"].shape[0],
                    dim_ffn=state_dict["blocks.0.ffn.fc1.weight"].shape[0], num_heads=heads,
                    encoder_layers=layers, num_buckets=buckets, shared_pos=shared)
    except (KeyError, ValueError, AttributeError) as e:
        raise CheckpointError(f"not a umT5 encoder state dict (as models_t5_umt5-xxl-enc-bf16.pth): "
                              f"cannot read its sizes ({type(e).__name__}: {e})") from None


class StockTextEncoder:
    """The stock T5Encoder + HuggingfaceTokenizer, as LongLive's WanTextEncoder runs them."""

    label = "umT5-XXL text encoder (LongLive's own classes)"

    def __init__(self, model: torch.nn.Module, tokenizer, text_len: int):
        self.model, self.tokenizer, self.text_len = model, tokenizer, text_len
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> list[torch.Tensor]:
        ids, mask = self.tokenizer(list(texts), return_mask=True, add_special_tokens=True)
        ids, mask = ids.to(self.device), mask.to(self.device)
        context = self.model(ids, mask)
        for row, length in zip(context, mask.gt(0).sum(dim=1)):
            row[length:] = 0.0
        return [row.unsqueeze(0) for row in context]


def load_stock_text_encoder(src: str | os.PathLike | None, weights: str | os.PathLike, tokenizer: str | os.PathLike,
                            *, text_len: int, device, dtype: torch.dtype) -> StockTextEncoder:
    """Build the stock umT5 encoder from `weights` (a torch state dict file) and the tokenizer folder."""
    t5, tokenizers = _import_stock_t5(resolve_stock_src(src))
    weights, tokenizer = Path(weights), Path(tokenizer)
    try:
        sd = torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - an unreadable file is one clear error
        raise CheckpointError(f"text encoder {str(weights)!r} could not be read ({type(e).__name__}: {e})") from None
    if not isinstance(sd, dict):
        raise CheckpointError(f"text encoder {str(weights)!r} holds a {type(sd).__name__}, not a state dict")
    sizes = t5_encoder_sizes(sd)
    model = t5.umt5_xxl(encoder_only=True, return_tokenizer=False, dtype=dtype, device="meta", **sizes)
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"text encoder {str(weights)!r} does not match the stock "
                              f"T5Encoder({sizes}): {e}") from None
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    if not tokenizer.is_dir():
        raise FileNotFoundError(f"tokenizer folder {str(tokenizer)!r} does not exist (Wan2.1's google/umt5-xxl)")
    tok = tokenizers.HuggingfaceTokenizer(name=str(tokenizer), seq_len=text_len, clean="whitespace")
    return StockTextEncoder(model, tok, text_len)
