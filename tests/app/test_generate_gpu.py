"""`longlive-triton generate` at LongLive-1.3B's real shapes on a GPU, from checkpoints in the real formats.

The files hold random weights (bf16 to halve the writing; the loaders take any float dtype): a Wan2.1
base safetensors, a LongLive generator .pt and a rank-16 LoRA .pt, a full-width Wan VAE .pth, and
prompt embeddings [2, 512, 4096] in place of the umT5 encoder, whose weights we do not have. The run
goes through patch_model, patch_vae, CUDA graphs and a prompt switch, and writes 480x832 frames.
The generator has the 1.3B widths with 2 of its 30 layers (config.json's num_layers, which the
command reads): every file format, key name and shape is the real one, at a fifteenth of the bytes.
Writing the mp4 needs imageio-ffmpeg (the `app` extra): without it the test skips and says so.
"""
from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from longlive_triton.app.cli import main
from longlive_triton.app.mp4 import read_mp4
from longlive_triton.models import build_model, get_preset
from longlive_triton.models.wan21_vae import build_vae_decoder

pytestmark = pytest.mark.gpu
REAL = get_preset("longlive-1.3b")
LAYERS = 2


def test_generate_real_shapes_from_real_format_checkpoints(tmp_path, capsys):
    pytest.importorskip("imageio_ffmpeg", reason="writing the mp4 needs imageio-ffmpeg (pip install -e '.[app]'; "
                        "on the GPU machine carry its wheel in .whl)")
    wan, ll = tmp_path / "wan", tmp_path / "longlive" / "models"
    wan.mkdir()
    ll.mkdir(parents=True)
    (wan / "config.json").write_text(json.dumps({"_class_name": "WanModel", "model_type": "t2v", "dim": 1536,
                                                 "ffn_dim": 8960, "num_heads": 12, "num_layers": LAYERS, "text_len": 512,
                                                 "freq_dim": 256, "in_dim": 16, "out_dim": 16, "eps": 1e-6}))
    model = build_model("longlive-1.3b", dtype=torch.bfloat16, device="cuda", seed=0, num_layers=LAYERS)
    weights = {k: v.cpu() for k, v in model.state_dict().items()}
    save_file(weights, str(wan / "diffusion_pytorch_model.safetensors"))
    torch.save({"generator": {f"model.{k}": v for k, v in weights.items()}}, ll / "longlive_base.pt")
    gen = torch.Generator().manual_seed(1)
    lora = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.startswith("blocks."):
            lora[f"base_model.model.{name}.lora_A.weight"] = torch.randn(16, m.in_features, generator=gen) * 1e-2
            lora[f"base_model.model.{name}.lora_B.weight"] = torch.randn(m.out_features, 16, generator=gen) * 1e-2
    torch.save({"generator_lora": lora, "critic_lora": {}, "step": 0}, ll / "lora.pt")
    del model, weights
    torch.save(build_vae_decoder("wan2.1", seed=2).state_dict(), wan / "Wan2.1_VAE.pth")
    torch.save(torch.randn(2, 512, REAL.text_dim) * 0.2, tmp_path / "embeddings.pt")

    out = tmp_path / "real.mp4"
    rc = main(["generate", "--wan", str(wan), "--longlive", str(tmp_path / "longlive"), "--embeddings",
               str(tmp_path / "embeddings.pt"), "--switch-frames", "6", "--frames", "12", "--output", str(out)])
    captured = capsys.readouterr()
    print(captured.out)  # the patch reports and the ms-per-frame summary, for the run's log
    assert rc == 0, f"generate returned {rc}: {captured.err.strip()[-2000:]}"
    meta, frames = read_mp4(out)
    assert frames.shape == (4 * 12 - 3, 480, 832, 3) and meta["size"] == (832, 480)
    assert "lora.pt merged (rank 16)" in printed and "fast_decoder: 1 applied" in printed
    assert re.search(r"ms per video frame, generator \+ VAE: [0-9.]+ median", printed)
