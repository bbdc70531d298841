"""`longlive-triton generate` with real checkpoints: small files the tests write in each real format.

The folders mirror what LongLive's README downloads: `wan_models/Wan2.1-T2V-1.3B` (config.json,
diffusion_pytorch_model.safetensors, Wan2.1_VAE.pth with its encoder half, the umT5 encoder .pth and
the google/umt5-xxl tokenizer folder) and `longlive_models/models` (longlive_base.pt with the
wrapper's `model.` keys, lora.pt with peft keys), at the tiny sizes. The text encoder is built
through the stock LongLive classes, so that test needs LONGLIVE_SRC (and transformers).
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from longlive_triton.app.cli import main
from longlive_triton.app.engine import real_engine
from longlive_triton.app.mp4 import read_mp4
from longlive_triton.models import build_model, get_preset
from longlive_triton.models.wan21_vae import build_vae_decoder
from longlive_triton.loading.weights import locate_weights

TINY = get_preset("tiny")
H, W = 8 * TINY.latent_height, 8 * TINY.latent_width
SIZE = ["--height", str(H), "--width", str(W)]
WORDS = "a cat dog runs on the sofa red fox snow jumps".split()


def _lora(model, rank: int = 4) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    sd = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.startswith("blocks."):
            sd[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=gen) * 0.1
            sd[f"base_model.model.{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=gen) * 0.1
    return sd


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    wan, ll = root / "wan_models" / "Wan2.1-T2V-1.3B", root / "longlive_models"
    (ll / "models").mkdir(parents=True)
    wan.mkdir(parents=True)
    config = {"_class_name": "WanModel", "model_type": "t2v", "eps": 1e-6,
              **{k: getattr(TINY, k) for k in ("dim", "ffn_dim", "num_heads", "num_layers", "text_dim", "text_len",
                                                "freq_dim", "in_dim", "out_dim")}}
    (wan / "config.json").write_text(json.dumps(config))
    save_file(build_model("tiny", seed=1).state_dict(), str(wan / "diffusion_pytorch_model.safetensors"))
    generator = build_model("tiny", seed=2).state_dict()
    torch.save({"generator": {f"model.{k}": v for k, v in generator.items()}}, ll / "models" / "longlive_base.pt")
    lora = _lora(build_model("tiny", seed=2))
    torch.save({"generator_lora": lora, "critic_lora": {}, "step": 100}, ll / "models" / "lora.pt")
    vae = build_vae_decoder("tiny", seed=3).state_dict()
    encoder_half = {"encoder.conv1.weight": torch.randn(8, 3, 3, 3, 3), "conv1.weight": torch.randn(32, 32, 1, 1, 1),
                    "conv1.bias": torch.randn(32)}
    torch.save({**vae, **encoder_half}, wan / "Wan2.1_VAE.pth")
    torch.save(torch.randn(2, 6, TINY.text_dim), root / "embeddings.pt")
    return {"root": root, "wan": wan, "longlive": ll, "generator": generator, "lora": lora, "vae": vae}


def test_real_engine_loads_every_file_in_the_stock_order(files):
    found = locate_weights(wan=str(files["wan"]), longlive=str(files["longlive"]), need_text_encoder=False)
    assert found.base.name == "diffusion_pytorch_model.safetensors" and found.config.name == "config.json"
    engine = real_engine(found, "stock", device="cpu", height=H, width=W)
    assert "RANDOM" not in engine.label and "lora.pt merged (rank 4)" in engine.label
    # The LongLive generator overwrote the Wan base; the LoRA is merged in fp32, then the bf16 cast.
    got = engine.model.state_dict()
    for name, weight in files["generator"].items():
        expected = weight.clone()
        key = f"base_model.model.{name.removesuffix('.weight')}.lora_A.weight"
        if key in files["lora"]:
            expected += files["lora"][key.replace("lora_A", "lora_B")] @ files["lora"][key]
        assert torch.equal(got[name], expected.bfloat16()), name
    vae = engine.vae.state_dict()
    assert all(torch.equal(vae[k], v.bfloat16()) for k, v in files["vae"].items())
    assert engine.pixel_size == (H, W) and engine.encoder is None


def test_generate_with_real_checkpoints_and_precomputed_embeddings(files, tmp_path, capsys):
    out = tmp_path / "real.mp4"
    rc = main(["generate", "--wan", str(files["wan"]), "--longlive", str(files["longlive"]), "--preset", "stock",
               "--embeddings", str(files["root"] / "embeddings.pt"), "--switch-frames", "3", "--frames", "6",
               *SIZE, "--output", str(out)])
    assert rc == 0
    meta, frames = read_mp4(out)
    assert frames.shape == (21, H, W, 3) and meta["size"] == (W, H)
    printed = capsys.readouterr().out
    assert "LongLive weights" in printed and "RANDOM WEIGHTS" not in printed
    assert "from latent frame    3 (video frame 9): embeddings[1]" in printed


def test_broken_checkpoints_are_one_clear_error(files, tmp_path, capsys):
    broken = dict(files["generator"])
    broken.pop("head.head.weight")
    torch.save({"generator": broken}, tmp_path / "longlive_base.pt")
    args = ["generate", "--wan", str(files["wan"]), "--longlive", str(files["longlive"]), "--preset", "stock",
            "--embeddings", str(files["root"] / "embeddings.pt"), "--switch-frames", "3", *SIZE]
    assert main(args + ["--generator", str(tmp_path / "longlive_base.pt"), "--output", str(tmp_path / "a.mp4")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("longlive-triton generate: error: LongLive generator") and "'head.head.weight'" in err

    torch.save({k: v[..., :1] if k == "decoder.head.2.weight" else v for k, v in files["vae"].items()},
               tmp_path / "vae.pth")
    assert main(args + ["--vae", str(tmp_path / "vae.pth"), "--output", str(tmp_path / "b.mp4")]) == 2
    err = capsys.readouterr().err
    assert "shape mismatch 1: decoder.head.2.weight" in err and "Traceback" not in err

    assert main(args + ["--lora", str(tmp_path / "nope.pt"), "--output", str(tmp_path / "c.mp4")]) == 2
    assert "LongLive LoRA: --lora" in capsys.readouterr().err


def _write_text_encoder(src: str, wan) -> None:
    """A small umT5 encoder made by the stock classes, saved as LongLive's .pth, and a word tokenizer."""
    pytest.importorskip("transformers", reason="the stock tokenizer needs transformers (pip install -e '.[text]')")
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from longlive_triton.stock.longlive1 import resolve_stock_src
    from longlive_triton.stock.text_encoder import _import_stock_t5

    t5, _ = _import_stock_t5(resolve_stock_src(src))
    torch.manual_seed(0)
    encoder = t5.umt5_xxl(encoder_only=True, return_tokenizer=False, dtype=torch.float32, device="cpu",
                          vocab_size=len(WORDS) + 3, dim=TINY.text_dim, dim_attn=TINY.text_dim, dim_ffn=64,
                          num_heads=2, encoder_layers=2, num_buckets=8)
    torch.save({k: v.bfloat16() for k, v in encoder.state_dict().items()}, wan / "models_t5_umt5-xxl-enc-bf16.pth")
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>") \
        .save_pretrained(wan / "google" / "umt5-xxl")


@pytest.mark.skipif(not os.environ.get("LONGLIVE_SRC"), reason="needs LONGLIVE_SRC (a LongLive v1.0 checkout) "
                    "for the stock text encoder classes")
def test_generate_with_the_stock_text_encoder(files, tmp_path, capsys):
    src = os.environ["LONGLIVE_SRC"]
    _write_text_encoder(src, files["wan"])
    found = locate_weights(wan=str(files["wan"]), longlive=str(files["longlive"]))
    engine = real_engine(found, "stock", device="cpu", height=H, width=W, encoder_src=src)
    cat, fox, cat2 = engine.encoder.encode(["a cat runs", "a red fox jumps on the snow", "a  cat runs "])
    assert cat.shape == (1, TINY.text_len, TINY.text_dim) and cat.dtype == torch.bfloat16
    assert cat[0, :4].abs().sum(dim=1).gt(0).all() and cat[0, 4:].eq(0).all()  # 3 words + </s>, padding zeroed
    assert fox[0, :8].abs().sum(dim=1).gt(0).all() and fox[0, 8:].eq(0).all()
    assert torch.equal(cat, cat2) and not torch.equal(cat[0, :4], fox[0, :4])  # LongLive's whitespace clean

    out = tmp_path / "t5.mp4"
    rc = main(["generate", "--wan", str(files["wan"]), "--longlive", str(files["longlive"]), "--longlive-src", src,
               "--preset", "stock", "--prompt", "a cat runs", "--switch", "3:a dog runs on the sofa", "--frames", "6",
               *SIZE, "--output", str(out)])
    assert rc == 0
    assert read_mp4(out)[1].shape == (21, H, W, 3)
    assert "from latent frame    3 (video frame 9): a dog runs on the sofa" in capsys.readouterr().out
