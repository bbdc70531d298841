"""The self-attention KV cache protocol of LongLive (sink, rolling window, recompute), on the `tiny` preset.

Scaled to tiny: 8 tokens per frame, 3-frame blocks (24 tokens), a 3-frame sink S = 24 and a
12-frame window, capacity C = M = 96. The spec's trace table becomes L' = 24, 48, 72, 96, 96, ...
and global end = (b + 1) * 24 after block b's first call. Bookkeeping is checked exactly; cache
contents are checked against K/V computed independently from each call's self-attention input.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import longlive_triton.models.longlive1.model as ref_model
from longlive_triton.runtime.pipeline import BlockPipeline
from longlive_triton.models import build_model, get_preset

TINY = get_preset("tiny")
FS = TINY.frame_seqlen       # 8
BLOCK = 3 * FS               # 24 tokens per block
S = 3 * FS                   # sink tokens
CAP = 12 * FS                # 96 slots
HEADS, HD = TINY.num_heads, TINY.dim // TINY.num_heads
CALLS_PER_BLOCK = 5          # 4 denoising steps + the cache pass


def rope_reference(x: torch.Tensor, grid, start_frame: int, theta: float = 10000.0) -> torch.Tensor:
    """Wan's 3-D RoPE, per token in float64: x [L, n, d] -> rotated [L, n, d]."""
    f, h, w = grid
    d = x.shape[-1]
    dims = [d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)]
    per_pair = [(a, j, dims[a]) for a in range(3) for j in range(dims[a] // 2)]
    pos = torch.tensor([(start_frame + fi, hi, wi) for fi in range(f) for hi in range(h) for wi in range(w)],
                       dtype=torch.float64)                                     # [L, 3]
    inv = torch.tensor([theta ** (-2.0 * j / D) for _, j, D in per_pair], dtype=torch.float64)
    axis = torch.tensor([a for a, _, _ in per_pair])
    ang = pos[:, axis] * inv                                                     # [L, d/2]
    cos, sin = torch.cos(ang)[:, None], torch.sin(ang)[:, None]
    x0, x1 = x[..., 0::2].double(), x[..., 1::2].double()
    out = torch.empty(x.shape, dtype=torch.float64)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out


def expected_kv(attn, x_in: torch.Tensor, start_frame: int):
    """Independent K (RMS-normed, rotated at absolute frames) and raw V for a self-attn input [B, n, C]."""
    b, n, _ = x_in.shape
    k = attn.norm_k(F.linear(x_in, attn.k.weight, attn.k.bias)).view(b, n, HEADS, HD)
    grid = (n // FS, TINY.latent_height // 2, TINY.latent_width // 2)
    k = torch.stack([rope_reference(k[i], grid, start_frame) for i in range(b)]).to(x_in.dtype)
    v = F.linear(x_in, attn.v.weight, attn.v.bias).view(b, n, HEADS, HD)
    return k, v


class Recorder:
    """Wraps model.forward (instance attribute) to log pointers, cache snapshots and layer inputs."""

    def __init__(self, model):
        self.model = model
        self.calls: list[dict] = []
        self._inputs: list = []
        self._infos: list = []
        for blk in model.blocks:
            blk.self_attn.register_forward_pre_hook(lambda mod, args: self._inputs.append(args[0].detach().clone()))
            blk.self_attn.register_forward_hook(lambda mod, args, out: self._infos.append(out[1][2]))
        original = model.forward

        def forward(*args, **kw):
            kv = kw["kv_cache"]
            self._inputs, self._infos = [], []
            before = self._snap(kv)
            out = original(*args, **kw)
            after = self._snap(kv)
            x = args[0] if args else kw["x"]
            self.calls.append({"start": kw["current_start"], "n": x.shape[2] * FS, "before": before, "after": after,
                               "inputs": self._inputs, "infos": self._infos,
                               "recache": kw.get("sink_recache_after_switch", False)})
            return out

        model.forward = forward

    @staticmethod
    def _snap(kv):
        return {"G": [int(c["global_end_index"].item()) for c in kv], "L": [int(c["local_end_index"].item()) for c in kv],
                "k": [c["k"].clone() for c in kv], "v": [c["v"].clone() for c in kv]}


def noise_and_prompt(seed: int, frames: int, batch: int = 1):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, frames, 16, TINY.latent_height, TINY.latent_width, generator=g)
    prompt = torch.randn(batch, 10, TINY.text_dim, generator=g)
    return noise, prompt


NUM_BLOCKS = 10


@pytest.fixture(scope="module")
def run10():
    """10 blocks (30 frames) through BlockPipeline, every generator call recorded."""
    model = build_model("tiny", seed=11)
    rec = Recorder(model)
    pipe = BlockPipeline(model)
    noise, prompt = noise_and_prompt(0, 3 * NUM_BLOCKS)
    torch.manual_seed(0)
    out = pipe.generate(noise, prompt)
    assert len(rec.calls) == CALLS_PER_BLOCK * NUM_BLOCKS
    return model, pipe, rec, out


def block_calls(rec, b):
    return rec.calls[CALLS_PER_BLOCK * b:CALLS_PER_BLOCK * (b + 1)]


# ----------------------------------------------------------------------------------------------
# pointers: the trace table
# ----------------------------------------------------------------------------------------------
def test_pointer_trace_table(run10):
    model, pipe, rec, _ = run10
    nl = model.num_layers
    for b in range(NUM_BLOCKS):
        calls = block_calls(rec, b)
        first = calls[0]
        assert all(c["start"] == b * BLOCK and c["n"] == BLOCK for c in calls)
        assert first["before"]["G"] == [b * BLOCK] * nl
        assert first["before"]["L"] == [min(b * BLOCK, CAP)] * nl
        assert first["after"]["G"] == [(b + 1) * BLOCK] * nl, b
        assert first["after"]["L"] == [min((b + 1) * BLOCK, CAP)] * nl, b
        for info in first["infos"]:
            assert info["is_recompute"] is False
            if b < 4:
                assert info["action"] == "direct_insert"
            else:
                assert info["action"] == "roll_and_insert"
                assert (info["num_evicted_tokens"], info["num_rolled_tokens"], info["sink_tokens"]) == (BLOCK, 2 * BLOCK, S)
            assert (info["write_start_index"], info["write_end_index"]) == (min(b * BLOCK, CAP - BLOCK), min((b + 1) * BLOCK, CAP))
        # later denoising calls and the cache pass: recomputes for b >= 1, pointers never move
        for c in calls[1:]:
            assert c["before"]["G"] == c["after"]["G"] == first["after"]["G"]
            assert c["before"]["L"] == c["after"]["L"] == first["after"]["L"]
            assert all(info["is_recompute"] is (b >= 1) for info in c["infos"])
            assert all(info["action"] == "direct_insert" for info in c["infos"])


def test_cache_sizes_and_dtype(run10):
    _, pipe, _, _ = run10
    assert len(pipe.caches.kv) == TINY.num_layers
    for c in pipe.caches.kv:
        assert c["k"].shape == c["v"].shape == (1, CAP, HEADS, HD)
        assert c["global_end_index"].dtype == c["local_end_index"].dtype == torch.long
        assert c["global_end_index"].shape == (1,)
    for c in pipe.caches.crossattn:
        assert c["k"].shape == (1, TINY.text_len, HEADS, HD)


# ----------------------------------------------------------------------------------------------
# slots written by each call
# ----------------------------------------------------------------------------------------------
def test_every_call_writes_exactly_its_slots(run10):
    model, _, rec, _ = run10
    for b in range(NUM_BLOCKS):
        for i, c in enumerate(block_calls(rec, b)):
            lend = c["after"]["L"][0]
            for layer in range(model.num_layers):
                kb, vb = c["before"]["k"][layer], c["before"]["v"][layer]
                ka, va = c["after"]["k"][layer], c["after"]["v"][layer]
                k_new, v_new = expected_kv(model.blocks[layer].self_attn, c["inputs"][layer], b * 3)
                rolled = i == 0 and b >= 4
                if rolled:  # shifted by exactly one block behind the sink
                    assert torch.equal(ka[:, S:CAP - BLOCK], kb[:, S + BLOCK:CAP])
                    assert torch.equal(va[:, S:CAP - BLOCK], vb[:, S + BLOCK:CAP])
                else:
                    assert torch.equal(va[:, :lend - BLOCK], vb[:, :lend - BLOCK])
                    assert torch.equal(ka[:, :lend - BLOCK], kb[:, :lend - BLOCK])
                # the block's own slots hold its raw V and its rotated K
                assert torch.equal(va[:, lend - BLOCK:lend], v_new), (b, i, layer)
                torch.testing.assert_close(ka[:, lend - BLOCK:lend], k_new, rtol=1e-6, atol=1e-6)
                # nothing past the end pointer
                assert torch.equal(va[:, lend:], vb[:, lend:])


def test_block0_rewrites_the_sink_on_every_call(run10):
    _, _, rec, _ = run10
    calls = block_calls(rec, 0)
    for prev, c in zip(calls, calls[1:]):
        for layer in range(2):
            assert torch.equal(c["before"]["v"][layer][:, :S], prev["after"]["v"][layer][:, :S])
            assert not torch.equal(c["after"]["v"][layer][:, :S], c["before"]["v"][layer][:, :S])
            assert not torch.equal(c["after"]["k"][layer][:, :S], c["before"]["k"][layer][:, :S])


def test_recompute_never_touches_the_sink(run10):
    _, _, rec, _ = run10
    for b in range(1, NUM_BLOCKS):
        for c in block_calls(rec, b)[1:]:
            for layer in range(2):
                assert torch.equal(c["after"]["k"][layer][:, :S], c["before"]["k"][layer][:, :S])
                assert torch.equal(c["after"]["v"][layer][:, :S], c["before"]["v"][layer][:, :S])


def test_cache_after_ten_blocks_is_sink_plus_newest_nine_frames(run10):
    model, pipe, rec, _ = run10
    sink_snapshot = block_calls(rec, 0)[-1]["after"]  # after block 0's cache pass
    for layer in range(model.num_layers):
        cache = pipe.caches.kv[layer]
        assert torch.equal(cache["k"][:, :S], sink_snapshot["k"][layer][:, :S])
        assert torch.equal(cache["v"][:, :S], sink_snapshot["v"][layer][:, :S])
        # slots [24, 96): frames 21-29 in order, as written by the cache passes of blocks 7, 8, 9
        attn = model.blocks[layer].self_attn
        ks, vs = [], []
        for b in (7, 8, 9):
            cache_pass = block_calls(rec, b)[-1]
            k, v = expected_kv(attn, cache_pass["inputs"][layer], 3 * b)
            ks.append(k)
            vs.append(v)
        assert torch.equal(cache["v"][:, S:], torch.cat(vs, 1))
        torch.testing.assert_close(cache["k"][:, S:], torch.cat(ks, 1), rtol=1e-6, atol=1e-6)
        assert int(cache["global_end_index"]) == NUM_BLOCKS * BLOCK
        assert int(cache["local_end_index"]) == CAP


# ----------------------------------------------------------------------------------------------
# attention window
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("max_attention", [None, 48, 72])
def test_attention_window_is_sink_plus_newest(monkeypatch, max_attention):
    model = build_model("tiny", seed=2)
    budget = max_attention or CAP
    rec = Recorder(model)
    if max_attention is not None:
        # set on every call: a pipeline may write its own budget on the modules before the loop
        recorded_forward = model.forward

        def forward(*a, **kw):
            for blk in model.blocks:
                blk.self_attn.max_attention_size = max_attention
            return recorded_forward(*a, **kw)

        model.forward = forward
    seen = []
    real_attention = ref_model.attention

    def spy(q, k, v):
        seen.append((q.shape[1], k.clone(), v.clone()))
        return real_attention(q, k, v)

    monkeypatch.setattr(ref_model, "attention", spy)
    pipe = BlockPipeline(model)
    noise, prompt = noise_and_prompt(1, 21)
    torch.manual_seed(1)
    pipe.generate(noise, prompt)
    per_call = 2 * model.num_layers  # self then cross attention per layer
    assert len(seen) == per_call * len(rec.calls)
    for ci, c in enumerate(rec.calls):
        lend = c["after"]["L"][0]
        for layer in range(model.num_layers):
            nq, k_att, v_att = seen[ci * per_call + 2 * layer]
            assert nq == BLOCK
            start = max(S, lend - (budget - S))
            exp_k = torch.cat([c["after"]["k"][layer][:, :S], c["after"]["k"][layer][:, start:lend]], 1)
            exp_v = torch.cat([c["after"]["v"][layer][:, :S], c["after"]["v"][layer][:, start:lend]], 1)
            assert k_att.shape[1] == min(lend, budget)
            assert torch.equal(k_att, exp_k) and torch.equal(v_att, exp_v)
            # cross-attention sees the whole padded text
            assert seen[ci * per_call + 2 * layer + 1][1].shape[1] == TINY.text_len
    # steady state at the default budget: 3 sink + 6 history + 3 own frames
    if max_attention is None:
        assert seen[-2][1].shape[1] == CAP


# ----------------------------------------------------------------------------------------------
# direct calls: recomputes of arbitrary length, and sink_recache_after_switch
# ----------------------------------------------------------------------------------------------
def fill_blocks(model, nb: int, seed: int):
    """nb blocks of first calls + cache passes by direct generator calls; returns (caches, frames)."""
    pipe = BlockPipeline(model)
    pipe.frame_seqlen = FS
    caches = pipe.init_caches(1, 3 * nb, torch.float32, torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(1, 10, TINY.text_dim, generator=g)
    frames = torch.randn(1, 16, 3 * nb, TINY.latent_height, TINY.latent_width, generator=g)
    for b in range(nb):
        x = frames[:, :, 3 * b:3 * b + 3]
        model(x, t=torch.full([1, 3], 1000.0), context=ctx, kv_cache=caches.kv, crossattn_cache=caches.crossattn,
              current_start=b * BLOCK)
        model(x, t=torch.zeros([1, 3]), context=ctx, kv_cache=caches.kv, crossattn_cache=caches.crossattn,
              current_start=b * BLOCK)
    return caches, frames, ctx


@given(nb=st.integers(1, 6), count=st.integers(1, 12), recache=st.booleans(), seed=st.integers(0, 1000))
def test_recompute_window_and_sink_recache(nb, count, recache, seed):
    model = build_model("tiny", seed=4)
    rec = Recorder(model)
    caches, frames, ctx = fill_blocks(model, nb, seed)
    total = 3 * nb
    count = min(count, total)
    first = total - count
    before = Recorder._snap(caches.kv)
    model(frames[:, :, first:total], t=torch.zeros([1, count]), context=ctx, kv_cache=caches.kv,
          crossattn_cache=caches.crossattn, current_start=first * FS, sink_recache_after_switch=recache)
    after = Recorder._snap(caches.kv)
    call = rec.calls[-1]
    assert after["G"] == before["G"] and after["L"] == before["L"]  # e = G: never moves the pointers
    lend = before["L"][0]
    n = count * FS
    ls = lend - n
    is_recompute = first > 0
    w = ls if (recache or not is_recompute) else max(ls, S)
    for layer in range(model.num_layers):
        assert call["infos"][layer]["is_recompute"] is is_recompute
        assert call["infos"][layer]["write_start_index"] == w
        k_new, v_new = expected_kv(model.blocks[layer].self_attn, call["inputs"][layer], first)
        va, vb = after["v"][layer], before["v"][layer]
        assert torch.equal(va[:, :w], vb[:, :w])                   # below the write start: untouched
        assert torch.equal(va[:, w:lend], v_new[:, w - ls:])         # the written rows, in order
        torch.testing.assert_close(after["k"][layer][:, w:lend], k_new[:, w - ls:], rtol=1e-6, atol=1e-6)
        if is_recompute and not recache:
            assert torch.equal(after["k"][layer][:, :S], before["k"][layer][:, :S])


def test_sink_recache_after_switch_writes_the_sink():
    """The interactive recache at a full window: 12 frames from frame 3 over a 5-block cache."""
    model = build_model("tiny", seed=5)
    rec = Recorder(model)
    results = {}
    for flag in (False, True):
        caches, frames, ctx = fill_blocks(model, 5, 9)
        g = torch.Generator().manual_seed(123)
        new_ctx = torch.randn(1, 10, TINY.text_dim, generator=g)
        for c in caches.crossattn:
            c["is_init"] = False
        before = Recorder._snap(caches.kv)
        model(frames[:, :, 3:15], t=torch.zeros([1, 12]), context=new_ctx, kv_cache=caches.kv,
              crossattn_cache=caches.crossattn, current_start=3 * FS, sink_recache_after_switch=flag)
        after = Recorder._snap(caches.kv)
        call = rec.calls[-1]
        assert after["G"] == before["G"] == [15 * FS] * 2 and after["L"] == before["L"] == [CAP] * 2
        for layer in range(2):
            k_new, v_new = expected_kv(model.blocks[layer].self_attn, call["inputs"][layer], 3)
            if flag:
                assert torch.equal(after["v"][layer], v_new)  # all 12 frames, the sink included
                torch.testing.assert_close(after["k"][layer], k_new, rtol=1e-6, atol=1e-6)
            else:
                assert torch.equal(after["v"][layer][:, :S], before["v"][layer][:, :S])
                assert torch.equal(after["k"][layer][:, :S], before["k"][layer][:, :S])
                assert torch.equal(after["v"][layer][:, S:], v_new[:, S:])  # first 3 recached frames dropped
        results[flag] = after
    assert not torch.equal(results[True]["v"][0][:, :S], results[False]["v"][0][:, :S])


@pytest.mark.parametrize("redo_block", [1, 2])
def test_recompute_of_an_older_block_keeps_the_pointers(redo_block):
    """A recompute that ends before the global end (e < G) writes its slots but never moves G or L."""
    model = build_model("tiny", seed=6)
    rec = Recorder(model)
    caches, frames, ctx = fill_blocks(model, 3, 17)
    before = Recorder._snap(caches.kv)
    x = frames[:, :, 3 * redo_block:3 * redo_block + 3] * 0.5
    model(x, t=torch.full([1, 3], 500.0), context=ctx, kv_cache=caches.kv, crossattn_cache=caches.crossattn,
          current_start=redo_block * BLOCK)
    after = Recorder._snap(caches.kv)
    assert after["G"] == before["G"] == [3 * BLOCK] * 2
    assert after["L"] == before["L"] == [3 * BLOCK] * 2
    call = rec.calls[-1]
    lo, hi = redo_block * BLOCK, (redo_block + 1) * BLOCK  # L' = L + (e - G)
    for layer in range(2):
        info = call["infos"][layer]
        assert info["is_recompute"] is True
        assert (info["write_start_index"], info["write_end_index"]) == (lo, hi)
        _, v_new = expected_kv(model.blocks[layer].self_attn, call["inputs"][layer], 3 * redo_block)
        assert torch.equal(after["v"][layer][:, lo:hi], v_new)
        assert torch.equal(after["v"][layer][:, :lo], before["v"][layer][:, :lo])
        assert torch.equal(after["v"][layer][:, hi:], before["v"][layer][:, hi:])
