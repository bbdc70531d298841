"""`longlive-triton generate` with the embedded default: a playable mp4, read back; switches; errors.

Most runs use `--preset stock` (the unpatched reference, fast on the CPU); one runs the console script
as a user would, with the default preset, so the Triton kernels go through the CPU interpreter.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from longlive_triton.app.cli import main
from longlive_triton.app.engine import embedded_engine
from longlive_triton.app.mp4 import read_mp4
from longlive_triton.models import get_preset
from longlive_triton.runtime.video import iter_video

TINY = get_preset("tiny")
H, W = 8 * TINY.latent_height, 8 * TINY.latent_width


def _luma_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of the luma (0-255) of two frame stacks [T, H, W, 3]."""
    weights = np.array([0.299, 0.587, 0.114], np.float32)
    return float(np.abs(a.astype(np.float32) @ weights - b.astype(np.float32) @ weights).mean())


def _generate(tmp_path, *extra) -> tuple[int, np.ndarray]:
    out = tmp_path / "out.mp4"
    rc = main(["generate", "--preset", "stock", "--device", "cpu", "--output", str(out), *extra])
    if rc != 0:
        return rc, None
    meta, frames = read_mp4(out)
    assert meta["size"] == (W, H) and meta["fps"] == 16
    return rc, frames


def test_console_script_writes_a_playable_mp4_through_the_interpreter(tmp_path):
    """The command as a user types it (one block, to stay quick), default preset `exact`: on a machine
    without a GPU the kernels run in Triton's interpreter, on a GPU on the GPU."""
    exe = shutil.which("longlive-triton", path=os.path.dirname(sys.executable))
    assert exe is not None, "the longlive-triton console script is not installed (pip install -e .)"
    out = tmp_path / "out.mp4"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the command chooses it itself
    done = subprocess.run([exe, "generate", "--output", str(out), "--frames", "3"], capture_output=True, text=True,
                          timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    meta, frames = read_mp4(out)
    assert frames.shape == (9, H, W, 3) and meta["codec"] == "h264"  # 4F - 3 frames for F = 3
    on_gpu = torch.cuda.is_available()
    assert ("CPU interpreter" in done.stderr) != on_gpu
    assert "fused_block: 2 applied" in done.stdout and "fast_decoder: 1 applied" in done.stdout
    assert "RANDOM WEIGHTS" in done.stdout and "ms per video frame" in done.stdout
    assert frames.std() > 10  # a picture, not a flat frame


def test_switches_frames_and_seed(tmp_path, capsys):
    rc, frames = _generate(tmp_path, "--prompt", "a cat", "--switch", "3:a dog", "--frames", "6", "--seed", "5")
    assert rc == 0 and frames.shape == (21, H, W, 3)
    printed = capsys.readouterr().out
    assert "from latent frame    3 (video frame 9): a dog" in printed and "RANDOM WEIGHTS" in printed

    # The file holds what the pipeline decodes, up to the H.264 loss (small in luma; yuv420p halves the
    # chroma resolution, which costs more on these noise-like pictures): the same run through the API.
    engine = embedded_engine("stock", device="cpu")
    embeds = engine.encoder.encode(["a cat", "a dog"])
    pixels = torch.cat([b.pixels for b in iter_video(engine.pipeline(), engine.vae, engine.noise(6, 5), embeds, [3])],
                       dim=2)
    expected = ((pixels[0].float() * 0.5 + 0.5).clamp(0, 1) * 255).permute(1, 2, 3, 0).numpy()
    assert _luma_diff(frames, expected) < 4

    rc, other_seed = _generate(tmp_path, "--prompt", "a cat", "--switch", "3:a dog", "--frames", "6", "--seed", "6")
    assert _luma_diff(other_seed, frames) > 20
    rc, no_switch = _generate(tmp_path, "--prompt", "a cat", "--frames", "6", "--seed", "5")
    assert _luma_diff(no_switch[:9], frames[:9]) < 2         # the first block has the same prompt...
    assert _luma_diff(no_switch[9:], frames[9:]) > 8         # ...the switch changes the rest


def test_prompt_file_and_embeddings_file(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompts": ["a cat", "a dog"]}\n')
    rc, from_file = _generate(tmp_path, "--prompts", str(jsonl), "--switch-frames", "3", "--frames", "6")
    rc2, from_cli = _generate(tmp_path, "--prompt", "a cat", "--switch", "3:a dog", "--frames", "6")
    assert rc == rc2 == 0 and np.array_equal(from_file, from_cli)

    embeds = embedded_engine("stock", device="cpu").encoder.encode(["a cat", "a dog"])
    torch.save(torch.cat(embeds).float(), tmp_path / "e.pt")
    rc, from_embeddings = _generate(tmp_path, "--embeddings", str(tmp_path / "e.pt"), "--switch-frames", "3",
                                    "--frames", "6")
    assert rc == 0 and np.array_equal(from_embeddings, from_cli)


@pytest.mark.parametrize("args, message", [
    (["--wan", "/no/such/wan_models"], "--wan '/no/such/wan_models': checkpoint '/no/such/wan_models' not found"),
    (["--prompts", "PROMPTS"], "line 1: not valid JSON"),
    (["--output", "/proc/longlive-test.mp4"], "cannot be written"),
    (["--output", "NOFOLDER/out.mp4"], "does not exist"),
    (["--output", "out.avi"], "give a name ending in .mp4"),
    (["--frames", "7"], "must be a positive multiple of 3"),
    (["--prompt", "a cat", "--switch", "30:a dog", "--frames", "6"], "fall at or after the end of the video"),
    (["--embeddings", "missing.pt"], "embeddings file 'missing.pt' does not exist"),
    (["--frames", "-3"], "must be a positive multiple of 3"),
    pytest.param(["--device", "cuda"], "no CUDA GPU", marks=pytest.mark.skipif(torch.cuda.is_available(),
                                                                               reason="this machine has a GPU")),
])
def test_user_errors_are_one_clear_line(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    args = [a.replace("PROMPTS", str(tmp_path / "bad.jsonl")).replace("NOFOLDER", str(tmp_path / "nofolder"))
            for a in args]
    if "--output" not in args:
        args += ["--output", str(tmp_path / "out.mp4")]
    assert main(["generate", "--preset", "stock", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("longlive-triton generate: error: ") and message in "\n".join(err), err
    assert "Traceback" not in "\n".join(err)
    assert not (tmp_path / "out.mp4").exists()


def test_missing_weights_name_every_file_and_how_to_get_it(tmp_path, capsys):
    (tmp_path / "wan").mkdir()
    assert main(["generate", "--wan", str(tmp_path / "wan"), "--output", str(tmp_path / "o.mp4")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("longlive-triton generate: error: the real-weights run cannot start; missing:")
    for what in ("Wan2.1 base weights", "Wan2.1 VAE", "LongLive generator", "LongLive LoRA",
                 "umT5-XXL text encoder", "umT5 tokenizer"):
        assert what in err
    assert "huggingface-cli download Wan-AI/Wan2.1-T2V-1.3B" in err
    assert "huggingface-cli download Efficient-Large-Model/LongLive-1.3B" in err


def test_missing_mp4_writer_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # as if it were not installed
    assert main(["generate", "--preset", "stock", "--output", str(tmp_path / "o.mp4")]) == 2
    assert "pip install 'longlive-triton[app]'" in capsys.readouterr().err
