"""The denoising schedule and the block-step loop (prompt switches included) on the `tiny` reference generator."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from longlive_triton.runtime.pipeline import BlockPipeline, PipelineConfig
from longlive_triton.models import build_model, get_preset
from longlive_triton.runtime.scheduler import FlowMatchSchedule

TINY = get_preset("tiny")
FS = TINY.frame_seqlen
S = 3 * FS


def inputs(seed: int, frames: int, batch: int = 1, prompts: int = 1):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, frames, 16, TINY.latent_height, TINY.latent_width, generator=g)
    ps = [torch.randn(batch, 10, TINY.text_dim, generator=g) for _ in range(prompts)]
    return noise, ps


def run(model, noise, prompts, switches=(), seed=0, config=None):
    pipe = BlockPipeline(model, config)
    torch.manual_seed(seed)
    return pipe.generate(noise, prompts if len(prompts) > 1 else prompts[0], switches), pipe


@pytest.fixture(scope="module")
def model():
    return build_model("tiny", seed=21)


# ----------------------------------------------------------------------------------------------
# schedule
# ----------------------------------------------------------------------------------------------
def test_warped_timesteps():
    sched = FlowMatchSchedule(5.0)
    t = sched.denoising_timesteps([1000, 750, 500, 250])
    assert t.dtype == torch.float32
    torch.testing.assert_close(t, torch.tensor([1000.0, 937.5, 833.3333, 625.0]), rtol=0, atol=1e-3)
    assert torch.equal(sched.denoising_timesteps([1000, 750], warp=False), torch.tensor([1000.0, 750.0]))
    # sigma table: shift 5 over linspace(1, 0, 1001)[:-1]
    raw = torch.linspace(1, 0, 1001)[:-1]
    torch.testing.assert_close(sched.sigmas, 5 * raw / (1 + 4 * raw), rtol=0, atol=1e-7)
    assert sched.sigmas.dtype == sched.timesteps.dtype == torch.float32
    with pytest.raises(ValueError):
        sched.denoising_timesteps([])
    with pytest.raises(ValueError):
        sched.denoising_timesteps([1001])
    with pytest.raises(ValueError):
        FlowMatchSchedule(0.0)


def test_sigma_is_t_over_1000_and_nearest():
    sched = FlowMatchSchedule(5.0)
    t = sched.denoising_timesteps([1000, 750, 500, 250])
    flow = torch.ones(4, 1, 1, 1, dtype=torch.float64)
    sigma = -sched.flow_to_x0(flow, torch.zeros_like(flow), t).flatten()
    torch.testing.assert_close(sigma, t.double() / 1000, rtol=0, atol=1e-6)
    # a timestep between table entries takes the nearest entry's sigma
    near = sched.timesteps[10:12].double()
    mid_lo = (near[0] * 0.8 + near[1] * 0.2).float().reshape(1)
    s = -sched.flow_to_x0(flow[:1], torch.zeros_like(flow[:1]), mid_lo).flatten()
    assert s.item() == sched.sigmas[10].double().item()


@given(seed=st.integers(0, 2**16), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_flow_to_x0_in_float64(seed, dtype):
    sched = FlowMatchSchedule(5.0)
    g = torch.Generator().manual_seed(seed)
    t = sched.denoising_timesteps([1000, 750, 500, 250])
    flow = torch.randn(4, 16, 4, 8, generator=g).to(dtype)
    xt = torch.randn(4, 16, 4, 8, generator=g).to(dtype)
    sigma = sched.sigmas[torch.tensor([0, 250, 500, 750])].double().reshape(-1, 1, 1, 1)
    expected = (xt.double() - sigma * flow.double()).to(dtype)
    out = sched.flow_to_x0(flow, xt, t)
    assert out.dtype == dtype
    assert torch.equal(out, expected)


def test_flow_to_x0_float64_is_observable():
    """Guard: a float32 computation gives other bits for fp32 inputs, so the test above discriminates."""
    sched = FlowMatchSchedule(5.0)
    g = torch.Generator().manual_seed(0)
    t = sched.denoising_timesteps([750] * 8)
    flow, xt = torch.randn(8, 16, 4, 8, generator=g), torch.randn(8, 16, 4, 8, generator=g)
    f32 = xt - sched.sigmas[250] * flow
    assert not torch.equal(sched.flow_to_x0(flow, xt, t), f32)


@given(seed=st.integers(0, 2**16), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_add_noise(seed, dtype):
    sched = FlowMatchSchedule(5.0)
    g = torch.Generator().manual_seed(seed)
    t = sched.denoising_timesteps([750, 500, 250])
    x0 = torch.randn(3, 16, 4, 8, generator=g).to(dtype)
    eps = torch.randn(3, 16, 4, 8, generator=g).to(dtype)
    sigma = sched.sigmas[torch.tensor([250, 500, 750])].reshape(-1, 1, 1, 1)  # float32
    expected = ((1 - sigma) * x0 + sigma * eps).to(dtype)
    out = sched.add_noise(x0, eps, t)
    assert out.dtype == dtype
    assert torch.equal(out, expected)


# ----------------------------------------------------------------------------------------------
# the loop: shape, validation, determinism, RNG order
# ----------------------------------------------------------------------------------------------
def test_output_shape_and_signal(model):
    noise, (p,) = inputs(0, 9)
    out, _ = run(model, noise, [p])
    assert out.shape == noise.shape and out.dtype == noise.dtype
    assert torch.isfinite(out).all() and out.abs().mean() > 1e-2
    assert not torch.allclose(out, noise)


def test_bad_inputs_raise(model):
    pipe = BlockPipeline(model)
    noise, (p,) = inputs(0, 9)
    with pytest.raises(ValueError, match="multiple"):
        pipe.generate(noise[:, :8], p)
    with pytest.raises(ValueError, match="noise"):
        pipe.generate(noise[0], p)
    with pytest.raises(ValueError, match="prompt"):
        pipe.generate(noise, p[0])                       # 2-D prompt
    with pytest.raises(ValueError, match="prompt"):
        pipe.generate(noise, torch.cat([p, p]))          # batch 2 prompt, batch 1 noise
    with pytest.raises(ValueError, match="text_len"):
        pipe.generate(noise, torch.randn(1, TINY.text_len + 1, TINY.text_dim))
    with pytest.raises(ValueError, match="switch"):
        pipe.generate(noise, [p, p], [])
    with pytest.raises(ValueError, match="switch"):
        pipe.generate(noise, [p, p, p], [6, 3])
    with pytest.raises(ValueError):
        PipelineConfig(num_frame_per_block=0)
    with pytest.raises(ValueError):
        PipelineConfig(local_attn_size=2)
    with pytest.raises(TypeError):
        BlockPipeline(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("bad, error, match", [
    (lambda n, p: (n[:, :, :8], p, []), ValueError, "noise has 8 latent channels, the generator takes 16"),
    (lambda n, p: (n[..., :7], p, []), ValueError, "multiples of the patch size 2x2, got 4x7"),
    (lambda n, p: (n[:, :, :, :3], p, []), ValueError, "multiples of the patch size 2x2, got 3x8"),
    (lambda n, p: (n, p[..., :40], []), ValueError, r"prompt embeddings must be \[B=1, L, text_dim=48\]"),
    (lambda n, p: (n, p.double(), []), TypeError, "prompt embeddings are torch.float64"),
    (lambda n, p: (n.index_fill(1, torch.tensor([4]), float("nan")), p, []), ValueError, "noise holds NaN"),
    (lambda n, p: (n, [p, p], [9]), ValueError, "switch frame index 9 is past the last latent frame"),
])
def test_bad_inputs_are_refused_before_any_work(model, bad, error, match, monkeypatch):
    """Refused with a clear error before the first generator call (not deep in torch, not silently)."""
    noise, (p,) = inputs(0, 9)
    noise, prompts, switches = bad(noise, p)
    pipe = BlockPipeline(model)
    monkeypatch.setattr(pipe, "predict_x0", lambda *a, **k: pytest.fail("the generator ran"))
    with pytest.raises(error, match=match):
        pipe.generate(noise, prompts, switches)


def test_determinism(model):
    noise, (p,) = inputs(0, 9)
    a, _ = run(model, noise, [p], seed=5)
    b, _ = run(model, noise, [p], seed=5)
    c, _ = run(model, noise, [p], seed=6)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # block 0's last step already depends on the draws
    assert not torch.allclose(a[:, :3], c[:, :3])


@pytest.mark.parametrize("steps,switch", [((1000, 750, 500, 250), ()), ((1000, 500), ()), ((1000, 750, 500, 250), (6,))])
def test_rng_order_three_draws_per_block(model, monkeypatch, steps, switch):
    draws = []
    real = torch.randn_like

    def counting(x, *a, **kw):
        draws.append(tuple(x.shape))
        return real(x, *a, **kw)

    monkeypatch.setattr(torch, "randn_like", counting)
    noise, ps = inputs(0, 12, batch=2, prompts=1 + len(switch))
    run(model, noise, ps, switch, config=PipelineConfig(denoising_steps=steps))
    blocks = 4
    assert draws == [(2 * 3, 16, TINY.latent_height, TINY.latent_width)] * ((len(steps) - 1) * blocks)


def test_rng_draws_are_the_global_stream(model, monkeypatch):
    """The draws come from torch's global generator in order: replaying them reproduces the run."""
    noise, (p,) = inputs(3, 6)
    recorded = []
    real = torch.randn_like

    def record(x, *a, **kw):
        recorded.append(real(x, *a, **kw))
        return recorded[-1]

    monkeypatch.setattr(torch, "randn_like", record)
    out, _ = run(model, noise, [p], seed=9)
    torch.manual_seed(9)
    replay = [real(r) for r in recorded]
    assert all(torch.equal(a, b) for a, b in zip(replay, recorded))


def test_iter_blocks_matches_generate(model):
    noise, (p,) = inputs(1, 12)
    full, _ = run(model, noise, [p], seed=3)
    pipe = BlockPipeline(model)
    torch.manual_seed(3)
    blocks = list(pipe.iter_blocks(noise, p))
    assert [s for s, _ in blocks] == [0, 3, 6, 9]
    assert all(x.shape == (1, 3, 16, TINY.latent_height, TINY.latent_width) for _, x in blocks)
    assert torch.equal(torch.cat([x for _, x in blocks], 1), full)
    seen = []
    torch.manual_seed(3)
    again = BlockPipeline(model).generate(noise, p, on_block=lambda s, x: seen.append((s, x.clone())))
    assert torch.equal(again, full)
    assert [s for s, _ in seen] == [0, 3, 6, 9]


def test_five_generator_calls_per_block_with_context_pass_at_zero(model, monkeypatch):
    noise, (p,) = inputs(1, 6)
    pipe = BlockPipeline(model)
    calls = []
    real = model.forward

    def spy(*a, **kw):
        calls.append((kw["current_start"], kw["t"].clone()))
        return real(*a, **kw)

    monkeypatch.setattr(model, "forward", spy)
    torch.manual_seed(0)
    pipe.generate(noise, p)
    assert [c[0] for c in calls] == [0] * 5 + [S] * 5
    ts = [c[1] for c in calls[:5]]
    assert all(t.dtype == torch.float32 and t.shape == (1, 3) for t in ts)
    torch.testing.assert_close(torch.stack([t[0, 0] for t in ts]), torch.tensor([1000.0, 937.5, 833.3333, 625.0, 0.0]),
                               rtol=0, atol=1e-3)


# ----------------------------------------------------------------------------------------------
# interactive switches
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("global_sink", [True, False])
def test_switch_keeps_the_past_and_changes_the_future(model, global_sink):
    noise, (pa, pb) = inputs(2, 18, prompts=2)
    cfg = PipelineConfig(global_sink=global_sink)
    single, _ = run(model, noise, [pa], seed=4, config=cfg)
    switched, _ = run(model, noise, [pa, pb], [12], seed=4, config=cfg)
    assert torch.equal(switched[:, :12], single[:, :12])
    for f0 in (12, 15):
        assert not torch.allclose(switched[:, f0:f0 + 3], single[:, f0:f0 + 3])


def _spy_recache(pipe, log):
    real = pipe.recache_after_switch

    def wrapped(output, start_frame, prompt_embeds):
        before = [(c["k"].clone(), c["v"].clone(), int(c["global_end_index"]), int(c["local_end_index"]))
                  for c in pipe.caches.kv]
        real(output, start_frame, prompt_embeds)
        after = [(c["k"].clone(), c["v"].clone(), int(c["global_end_index"]), int(c["local_end_index"]))
                 for c in pipe.caches.kv]
        log.append({"start": start_frame, "prompt": prompt_embeds, "before": before, "after": after,
                    "is_init": [c["is_init"] for c in pipe.caches.crossattn]})

    pipe.recache_after_switch = wrapped


def _spy_forward(monkeypatch, model, log):
    real = model.forward

    def spy(*a, **kw):
        log.append({"start": kw["current_start"], "context": kw["context"], "t": kw["t"].clone(),
                    "flag": kw.get("sink_recache_after_switch", False),
                    "k0": kw["kv_cache"][0]["k"].clone(),
                    "cross_init": [c["is_init"] for c in kw["crossattn_cache"]]})
        out = real(*a, **kw)
        log[-1]["cross_k_after"] = [c["k"].clone() for c in kw["crossattn_cache"]]
        return out

    monkeypatch.setattr(model, "forward", spy)


def _recomputed_or_changed(after: torch.Tensor, before: torch.Tensor, layer: int) -> bool:
    """A re-cached V under a new prompt: layer 0's reads only the latents and t = 0, so it is the same
    values recomputed (fp32 rounding apart); every later layer has seen the prompt (tiny model: its
    changes are of order 0.1)."""
    diff = (after - before).abs().max().item()
    return diff <= 1e-5 if layer == 0 else diff > 1e-3


def test_global_sink_keeps_the_sink_slots(model, monkeypatch):
    noise, (pa, pb) = inputs(2, 21, prompts=2)
    pipe = BlockPipeline(model, PipelineConfig(global_sink=True))
    recaches, calls = [], []
    _spy_recache(pipe, recaches)
    _spy_forward(monkeypatch, model, calls)
    torch.manual_seed(0)
    pipe.generate(noise, [pa, pb], [15])
    (r,) = recaches
    assert r["start"] == 15 and r["prompt"] is pb
    for layer, ((kb, vb, gb, lb), (ka, va, ga, la)) in enumerate(zip(r["before"], r["after"])):
        assert (ga, la) == (gb, lb) == (15 * FS, 12 * FS)        # pointers kept
        assert torch.equal(ka[:, :S], kb[:, :S]) and torch.equal(va[:, :S], vb[:, :S])
        # The rest is re-cached under the new prompt. Layer 0's V reads only the latents and t = 0,
        # which the re-cache recomputes (in one 12-frame call instead of 3-frame ones: fp32 rounding
        # may differ); every later layer has seen the prompt.
        assert _recomputed_or_changed(va[:, S:], vb[:, S:], layer)
    rc = [c for c in calls if c["t"].shape[1] == 12]
    assert len(rc) == 1 and rc[0]["start"] == 3 * FS          # frames 3..14, rs = 15 - 12
    assert rc[0]["context"] is pb and rc[0]["flag"] is False
    assert torch.all(rc[0]["t"] == 0)


def test_global_sink_recache_from_frame_zero_rewrites_the_sink(model, monkeypatch):
    """A switch at frame 0: the recache is not a recompute there, so even global_sink rewrites the sink."""
    noise, (pa, pb) = inputs(2, 18, prompts=2)
    pipe = BlockPipeline(model, PipelineConfig(global_sink=True))
    recaches, calls = [], []
    _spy_recache(pipe, recaches)
    _spy_forward(monkeypatch, model, calls)
    torch.manual_seed(0)
    pipe.generate(noise, [pa, pb], [12])
    (r,) = recaches
    rc = [c for c in calls if c["t"].shape[1] == 12]
    assert len(rc) == 1 and rc[0]["start"] == 0 and rc[0]["flag"] is False
    for layer, ((kb, vb, gb, lb), (ka, va, ga, la)) in enumerate(zip(r["before"], r["after"])):
        assert (ga, la) == (gb, lb) == (12 * FS, 12 * FS)
        assert _recomputed_or_changed(va[:, :S], vb[:, :S], layer)


def test_local_sink_zeroes_then_rewrites_the_sink(model, monkeypatch):
    noise, (pa, pb) = inputs(2, 24, prompts=2)
    pipe = BlockPipeline(model, PipelineConfig(global_sink=False))
    recaches, calls = [], []
    _spy_recache(pipe, recaches)
    _spy_forward(monkeypatch, model, calls)
    torch.manual_seed(0)
    pipe.generate(noise, [pa, pb], [15])
    (r,) = recaches
    rc = [c for c in calls if c["t"].shape[1] == 12]
    assert len(rc) == 1
    rc = rc[0]
    assert rc["start"] == 3 * FS and rc["flag"] is True and rc["context"] is pb
    assert torch.count_nonzero(rc["k0"]) == 0                   # zeroed before the recache call
    for (kb, vb, gb, lb), (ka, va, ga, la) in zip(r["before"], r["after"]):
        assert (ga, la) == (gb, lb) == (15 * FS, 12 * FS)        # pointers kept
        assert torch.count_nonzero(va[:, :S]) == va[:, :S].numel()  # the sink rewritten
        assert not torch.equal(va[:, :S], vb[:, :S])


def test_switch_resets_cross_attention_cache(model, monkeypatch):
    noise, (pa, pb) = inputs(2, 18, prompts=2)
    calls = []
    _spy_forward(monkeypatch, model, calls)
    pipe = BlockPipeline(model)
    recaches = []
    _spy_recache(pipe, recaches)
    torch.manual_seed(0)
    pipe.generate(noise, [pa, pb], [12])
    assert recaches[0]["is_init"] == [False] * TINY.num_layers
    recache_idx = next(i for i, c in enumerate(calls) if c["t"].shape[1] == 12)
    assert calls[recache_idx]["cross_init"] == [False] * TINY.num_layers  # recache computes from pb
    nxt = calls[recache_idx + 1]
    assert nxt["start"] == 12 * FS and nxt["context"] is pb
    assert nxt["cross_init"] == [False] * TINY.num_layers
    # the recomputed cross K equals a pure prompt-B run's
    monkeypatch.undo()
    ref_calls = []
    _spy_forward(monkeypatch, model, ref_calls)
    torch.manual_seed(0)
    BlockPipeline(model).generate(noise[:, :3], pb)
    for a, b in zip(nxt["cross_k_after"], ref_calls[0]["cross_k_after"]):
        assert torch.equal(a, b)
    for a, b in zip(calls[recache_idx - 1]["cross_k_after"], ref_calls[0]["cross_k_after"]):
        assert not torch.allclose(a, b)


def test_switch_off_block_boundary_applies_at_next_block(model):
    noise, (pa, pb) = inputs(2, 18, prompts=2)
    single, _ = run(model, noise, [pa], seed=4)
    late, _ = run(model, noise, [pa, pb], [7], seed=4)
    at9, _ = run(model, noise, [pa, pb], [9], seed=4)
    assert torch.equal(late, at9)
    assert torch.equal(late[:, :9], single[:, :9])
    assert not torch.allclose(late[:, 9:12], single[:, 9:12])


def test_effective_switch_frames_of_longlive_example(model):
    """switch_frame_indices 40, 80, 120, 160, 200 with 3-frame blocks switch at 42, 81, 120, 162, 201."""
    pipe = BlockPipeline(model)
    seen, used = [], []
    pipe.recache_after_switch = lambda out, start, p: seen.append((start, p))
    pipe.denoise_block = lambda noisy, p, start: (used.append((start, p)), noisy)[1]
    pipe.cache_pass = lambda x0, p, start: None
    noise = torch.randn(1, 240, 16, TINY.latent_height, TINY.latent_width)
    prompts = [torch.full((1, 4, TINY.text_dim), float(i + 1)) for i in range(6)]
    for _ in pipe.iter_blocks(noise, prompts, [40, 80, 120, 160, 200]):
        pass
    assert [s for s, _ in seen] == [42, 81, 120, 162, 201]
    assert [p is prompts[i + 1] for i, (_, p) in enumerate(seen)] == [True] * 5
    bounds = [0, 42, 81, 120, 162, 201, 240]
    for start, p in used:
        seg = max(i for i in range(6) if bounds[i] <= start)
        assert p is prompts[seg]


# ----------------------------------------------------------------------------------------------
# batches
# ----------------------------------------------------------------------------------------------
# Bit-equality across batch rows is not available on the CPU: BLAS computes the rows of a small GEMM
# (e.g. the time embedding's B*F = 6 rows) in different micro-kernels, so identical rows can differ
# by an fp32 ulp, and bf16 attention amplifies that to ~1e-3 after a few blocks. These tests compare
# with a tolerance three orders below the O(1) difference between distinct samples.
BATCH_TOL = {"rtol": 1e-2, "atol": 3e-3}


def test_batch_of_identical_samples_gives_identical_outputs(model, monkeypatch):
    noise, (p,) = inputs(5, 9)
    real = torch.randn_like

    def same_noise(x, *a, **kw):  # the draw for sample 0 repeated for sample 1
        half = real(x[: x.shape[0] // 2], *a, **kw)
        return torch.cat([half, half])

    monkeypatch.setattr(torch, "randn_like", same_noise)
    out, _ = run(model, torch.cat([noise, noise]), [torch.cat([p, p])])
    torch.testing.assert_close(out[0], out[1], **BATCH_TOL)
    assert (out[0] - out[1]).abs().mean() < 1e-4


def test_batch_two_equals_two_single_runs_with_the_same_draws(model, monkeypatch):
    """Per-sample noise and prompt: replay the batch run's randn_like draws one sample at a time."""
    noise, (p,) = inputs(6, 9, batch=2)
    real = torch.randn_like
    drawn = []

    def record(x, *a, **kw):
        drawn.append(real(x, *a, **kw))
        return drawn[-1]

    monkeypatch.setattr(torch, "randn_like", record)
    batch_out, _ = run(model, noise, [p], seed=1)
    assert len(drawn) == 9 and all(d.shape[0] == 6 for d in drawn)  # [B*3, ...], sample-major
    for i in range(2):
        queue = [d[3 * i:3 * i + 3] for d in drawn]
        monkeypatch.setattr(torch, "randn_like", lambda x, *a, **kw: queue.pop(0))
        single, _ = run(model, noise[i:i + 1], [p[i:i + 1]])
        assert not queue
        torch.testing.assert_close(single[0], batch_out[i], **BATCH_TOL)
        assert (single[0] - batch_out[i]).abs().mean() < 1e-4
    assert (batch_out[0] - batch_out[1]).abs().mean() > 0.1


# ----------------------------------------------------------------------------------------------
# the attention budget follows the pipeline's local_attn_size (stock _set_all_modules_max_attention_size)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("local", [15, -1])
def test_attention_budget_follows_pipeline_local_attn_size(monkeypatch, local):
    """Regression (fixed in 3c79cee): a pipeline window other than the model's sets the budget."""
    import longlive_triton.models.longlive1.model as ref_model

    model = build_model("tiny", seed=8)           # built with local_attn_size 12
    lengths = []
    real = ref_model.attention

    def spy(q, k, v):
        lengths.append(k.shape[1])
        return real(q, k, v)

    monkeypatch.setattr(ref_model, "attention", spy)
    noise, (p,) = inputs(0, 21)
    run(model, noise, [p], config=PipelineConfig(local_attn_size=local))
    per_call = 2 * TINY.num_layers
    self_lengths = lengths[0::2][::TINY.num_layers]              # layer 0's self-attention, per call
    first_calls = self_lengths[0::5]                            # each block's first call
    capacity = (21 if local == -1 else local) * FS
    budget = capacity if local != -1 else 32760                 # spec section 5.5, M from the pipeline
    expected = [min((b + 1) * 3 * FS, capacity, budget) for b in range(7)]
    assert len(lengths) == per_call * 5 * 7
    assert first_calls == expected


def test_context_as_wans_list(model, monkeypatch):
    """context_as_list passes the prompt embeddings as Wan's list of [L, text_dim] tensors (the stock
    model takes both forms); the latents are the tensor form's."""
    noise, (p,) = inputs(3, 3, batch=2)
    forms = []
    forward = model.forward

    def spy(*args, **kwargs):
        forms.append(type(kwargs["context"]).__name__)
        return forward(*args, **kwargs)

    as_tensor, _ = run(model, noise, [p])
    monkeypatch.setattr(model, "forward", spy)
    as_list, _ = run(model, noise, [p], config=PipelineConfig(context_as_list=True))
    assert set(forms) == {"list"} and torch.allclose(as_list, as_tensor, **BATCH_TOL)
