"""Two gloo ranks on the CPU (spawned processes, as torchrun would start them): sequence-parallel
generation and the VAE on its own rank give what one process gives, and a rank that leaves or a
world-size mismatch gives a clear error within seconds, not a hang. The scenarios themselves live
in longlive_triton/distributed/check.py, which also runs them under torchrun with NCCL on GPUs."""
import pytest
import torch

from longlive_triton.distributed.check import spawn_ranks

# Each test spawns two Python processes (a few seconds to import torch); the work itself is small.
WAIT_S = 180


def _ok(results: list[dict]) -> list[dict]:
    for r in results:
        assert "exception" not in r, f"rank {r['rank']}: {r['exception']}\n{r.get('traceback', '')}"
    return results


def test_sequence_parallel_reference_equals_one_process():
    """fp32 reference, 6 blocks (the 12-frame window fills and rolls), a prompt switch at block 3."""
    results = _ok(spawn_ranks("sp", 2, options={"timeout_s": 30, "backend": "gloo"}, wait_s=WAIT_S))
    for r in results:
        assert r["latents_rel_l2"] <= 1e-5, r
        assert r["cache_rel_l2"] <= 1e-5, r         # each rank's KV cache is its heads of the full one
        assert r["kv_heads"] == 1 and r["heads"] == 2, r
        assert "rank 1 called the generator with other inputs" in r["mismatch_error"], r
        assert r["ok"], r


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU ranks need the Triton interpreter; the GPU step runs "
                    "this under torchrun with NCCL (tests/gpu/run_device.sh multi-gpu)")
def test_sequence_parallel_patched_equals_one_process():
    """The patched self-attention (our kernels, in the interpreter): 1 layer, a 6-frame window so the
    ring rolls from block 2, a prompt switch at block 2 (keeps the interpreter's run short)."""
    options = {"timeout_s": 30, "backend": "gloo", "preset": {"window_attention": True}, "blocks": 3,
               "switch_block": 2, "layers": 1, "window": 6}
    results = _ok(spawn_ranks("sp", 2, options=options, wait_s=WAIT_S))
    for r in results:
        assert r["patched"]["window_self_attention"] == {"applied": 1, "skipped": 0}, r
        assert r["latents_rel_l2"] <= 1e-2 and r["cache_rel_l2"] <= 1e-2, r
        assert r["ok"], r


def test_vae_on_rank_1_equals_one_process_in_order():
    results = _ok(spawn_ranks("vae", 2, options={"timeout_s": 30, "backend": "gloo"}, wait_s=WAIT_S))
    gen, vae = results
    assert gen["bit_equal"] and gen["frames"] == gen["want_frames"] == 4 * 12 - 3, gen
    # (block, start latent frame, first pixel frame): 9 pixel frames for block 0, then 12 per block.
    want_order = [[0, 0, 0], [1, 3, 9], [2, 6, 21], [3, 9, 33]]
    assert [list(o) for o in gen["order"]] == want_order
    assert [list(o) for o in vae["callback_order"]] == want_order
    assert vae["first"] == "end" and vae["blocks"] == 4
    assert vae["second"] == "abort"          # rank 0's consumer left after one block
    assert gen["ok"] and vae["ok"]


@pytest.mark.parametrize("mode", ["vae", "sp"])
def test_a_rank_that_leaves_gives_a_clear_error_fast(mode):
    gen, peer = spawn_ranks("peer-exit", 2, options={"timeout_s": 30, "backend": "gloo", "mode": mode}, wait_s=WAIT_S)
    assert peer == {"rank": 1, "exited": 0}
    assert "exception" not in gen, gen
    assert gen["error"] is not None and "another rank crashed, left early" in gen["error"], gen
    assert gen["seconds_to_error"] < 10, gen  # well before the 30 s timeout: the closed connection is seen


def test_mismatched_world_sizes_give_clear_errors():
    """Rank 0 told 2 ranks, rank 1 told 3: neither hangs past the (1 s) timeout by much."""
    results = spawn_ranks("world-mismatch", 2, options={"timeout_s": 1, "backend": "gloo"}, world_sizes=[2, 3],
                          wait_s=60)
    for r in _ok(results):
        assert r["error"] is not None, r
        assert r["seconds_to_error"] < 20, r
    assert "rendezvous of 3 ranks" in results[1]["error"] and "--nproc-per-node 3" in results[1]["error"]
