"""bench/probe_fp8_block.py runs its variants at small shapes in the interpreter: every row timed,
and the FFN up's FP8 scales match the fp32 reference (the interpreter accumulates in fp32)."""
import torch

from longlive_triton.bench.probe_fp8_block import probe


def test_probe_runs_small():
    calls = []

    def timer(fn):
        fn()
        calls.append(fn.__name__)
        return 2.0, 1.0, 3.0

    rows, saved, rel = probe(torch.device("cpu"), tokens=48, dim=128, ffn=256, timer=timer)
    assert calls == ["up_fused", "up_precise", "up_unfused", "up_bare", "down_separate", "down_fused", "o_bf16_adaln",
                     "o_fp8_fused"]
    assert len(rows) == 8 and all(len(r) == 6 for r in rows)
    assert saved == 0.0
    assert set(rel) == {"up_fused", "up_precise"}
    assert all(r.shape == (48, 2) and r.max() <= 1e-4 for r in rel.values())
