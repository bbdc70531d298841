"""Prompts with switch points: the command line, LongLive's JSONL prompt file and its interactive YAML config."""
from __future__ import annotations

import json

import pytest
import torch

from longlive_triton.app.prompts import PromptError, from_command_line, load_prompt_file, parse_switch_frames
from longlive_triton.app.embeddings import EmbeddingsError, HashedPromptEmbeddings, load_embeddings_file

# LongLive's interactive config, as it ships (the keys this reader does not use are LongLive's own).
LONGLIVE_YAML = """\
denoising_step_list: [1000, 750, 500, 250]
num_frame_per_block: 3
model_kwargs: {local_attn_size: 12, timestep_shift: 5.0, sink_size: 3}
data_path: DATA
output_folder: videos/interactive
num_output_frames: 240
seed: 1
switch_frame_indices: 40, 80
global_sink: true
"""


def test_command_line_switches_sort_and_keep_colons():
    s = from_command_line("a cat", ["80:a bird: flying", "40:a dog"])
    assert s.texts == ("a cat", "a dog", "a bird: flying")
    assert s.switch_frames == (40, 80)
    assert s.effective_switches(3) == [42, 81]  # LongLive's rule: the next block boundary


@pytest.mark.parametrize("spec", ["40", "x:a dog", "40:", ":a dog"])
def test_command_line_refuses_a_bad_switch(spec):
    with pytest.raises(PromptError, match="FRAME:PROMPT"):
        from_command_line("a cat", [spec])


def test_command_line_refuses_two_switches_at_one_frame():
    with pytest.raises(PromptError, match="increasing"):
        from_command_line("a cat", ["40:a dog", "40:a bird"])


def test_longlive_jsonl_and_yaml(tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompts": ["a boy stands", "the boy runs", "the boy jumps"]}) + "\n\n"
                    + json.dumps({"prompts": ["a hacker types", "screens flash", "the hacker smiles"]}) + "\n")
    s = load_prompt_file(data, line=1, switch_frames=(40, 80))
    assert s.texts == ("a hacker types", "screens flash", "the hacker smiles") and s.switch_frames == (40, 80)

    config = tmp_path / "interactive.yaml"
    config.write_text(LONGLIVE_YAML.replace("DATA", "prompts.jsonl"))  # relative: found next to the YAML
    s = load_prompt_file(config)
    assert s.texts[0] == "a boy stands" and s.switch_frames == (40, 80)
    assert (s.num_frames, s.seed) == (240, 1)
    assert load_prompt_file(config, switch_frames=(3, 6)).switch_frames == (3, 6)

    inline = tmp_path / "inline.yml"
    inline.write_text("prompts: [a cat, a dog]\nswitch_frame_indices: [6]\n")
    assert load_prompt_file(inline).texts == ("a cat", "a dog")


@pytest.mark.parametrize("name, text, message", [
    ("bad.jsonl", '{"prompts": ["a cat"]}\n{"prompts": ["a dog"\n', "line 2: not valid JSON"),
    ("bad.jsonl", '{"prompt": "a cat"}\n', "line 1: expected an object with a non-empty list of strings"),
    ("two.jsonl", '{"prompts": ["a cat", "a dog"]}\n', "need 1 switch frames: pass --switch-frames"),
    ("bad.yaml", "prompts: [a cat\n", "not valid YAML"),
    ("bad.yaml", "prompts: [a cat, a dog]\nswitch_frame_indices: 40, x\n", "'x' is not a latent frame index"),
    ("bad.yaml", "prompts: [a cat, a dog]\nswitch_frame_indices: [40, 80]\n", "2 prompt(s) need 1 switch frame(s)"),
    ("bad.yaml", "data_path: missing.jsonl\n", "data_path 'missing.jsonl' not found"),
    ("bad.yaml", "prompts: ['a cat', '  ']\nswitch_frame_indices: 3\n", "prompt 1 is '  '"),
    ("bad.txt", "a cat\n", "unknown kind '.txt'"),
])
def test_bad_prompt_files_get_one_clear_error(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(PromptError) as e:
        load_prompt_file(path)
    assert message in str(e.value) and str(path) in str(e.value)


def test_missing_prompt_file_and_late_switch(tmp_path):
    with pytest.raises(PromptError, match="does not exist"):
        load_prompt_file(tmp_path / "nope.jsonl")
    with pytest.raises(PromptError, match=r"switch frame\(s\) \[10\] fall at or after the end"):
        from_command_line("a cat", ["10:a dog"]).check_length(12, 3)  # 10 -> block 12: after the video
    with pytest.raises(PromptError, match="latent frame indices"):
        parse_switch_frames(True)


def test_hashed_embeddings_follow_the_text():
    enc = HashedPromptEmbeddings(16, 8, device="cpu", dtype=torch.float32)
    a, a2, b = enc.encode(["a red cat", "a red cat", "a blue dog runs"])
    assert a.shape == (1, 16, 8) and torch.equal(a, a2) and not torch.equal(a, b)
    assert a[0, :4].abs().sum(dim=1).gt(0).all() and a[0, 4:].eq(0).all()  # 3 words + end, zero padding
    assert b[0, :5].abs().sum(dim=1).gt(0).all() and b[0, 5:].eq(0).all()


def test_embeddings_files(tmp_path):
    emb = torch.randn(2, 5, 8)
    torch.save(emb, tmp_path / "e.pt")
    torch.save({"prompt_embeds": emb}, tmp_path / "d.pt")
    from safetensors.torch import save_file
    save_file({"prompt_embeds": emb}, str(tmp_path / "e.safetensors"))
    for name in ("e.pt", "d.pt", "e.safetensors"):
        got = load_embeddings_file(tmp_path / name, text_len=16, text_dim=8, device="cpu", dtype=torch.bfloat16)
        assert len(got) == 2 and got[1].shape == (1, 5, 8) and got[1].dtype == torch.bfloat16
        assert torch.equal(got[1][0], emb[1].bfloat16())
    with pytest.raises(EmbeddingsError, match="8 wide, the generator takes 4096"):
        load_embeddings_file(tmp_path / "e.pt", text_len=512, text_dim=4096, device="cpu", dtype=torch.float32)
    with pytest.raises(EmbeddingsError, match="5 tokens per prompt, more than the generator's text_len 4"):
        load_embeddings_file(tmp_path / "e.pt", text_len=4, text_dim=8, device="cpu", dtype=torch.float32)
    (tmp_path / "junk.pt").write_text("not a tensor")
    with pytest.raises(EmbeddingsError, match="not a torch file"):
        load_embeddings_file(tmp_path / "junk.pt", text_len=16, text_dim=8, device="cpu", dtype=torch.float32)
