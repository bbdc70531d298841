"""Multi-rank self-checks on the tiny model: the same output as one process, and failures that
surface as errors instead of hangs.

    torchrun --nproc-per-node 2 -m longlive_triton.distributed.check sp      # NCCL on two GPUs
    python -m longlive_triton.distributed.check sp --spawn 2                 # gloo on this CPU

Scenarios (each rank prints one JSON line; the exit status is non-zero when a check fails):
  sp              sequence-parallel generation against one process on the same weights and draws,
                  with the KV window rolling and a prompt switch: latents within 1e-5 (fp32
                  reference) or 1e-2 (bf16, --preset), each rank's KV cache equal to its heads of the
                  one-process cache; then inputs that differ across ranks must be refused. On GPUs the
                  tiny model is widened to head dim 128, which the kernels serve.
  vae             the VAE on rank 1: frames bit-equal to the one-process iter_video, in order, on
                  rank 0 and in rank 1's callback; a consumer leaving early ends rank 1 cleanly.
  peer-exit       rank 1 leaves in the middle of a stream (--mode vae or sp): rank 0 must raise a
                  DistributedError, at once with gloo; with NCCL once the group's timeout runs out,
                  and only with TORCH_NCCL_BLOCKING_WAIT=1 (otherwise NCCL's watchdog aborts the
                  process at the timeout, with its own message).
  world-mismatch  (--spawn only) the two ranks are told different world sizes: both must raise a
                  DistributedError once the group's timeout runs out.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import socket
import sys
import time
import traceback

import torch

from ..numerics import rel_l2
from .group import DistributedError, close_distributed, init_distributed

SCENARIOS = ("sp", "vae", "peer-exit", "world-mismatch")
FP32_BOUND, BF16_BOUND = 1e-5, 1e-2


def _tiny_inputs(frames: int, dtype: torch.dtype, device, prompts: int = 2):
    from longlive_triton.models import get_preset
    p = get_preset("tiny")
    gen = torch.Generator().manual_seed(11)
    noise = torch.randn(1, frames, p.in_dim, p.latent_height, p.latent_width, generator=gen).to(device, dtype)
    texts = [torch.randn(1, p.text_len, p.text_dim, generator=gen).to(device, dtype) for _ in range(prompts)]
    return noise, texts


def _tiny_model(dtype, device, layers: int | None = None, window: int | None = None):
    from longlive_triton.models import build_model
    overrides = {k: v for k, v in (("num_layers", layers), ("local_attn_size", window)) if v is not None}
    if torch.device(device).type == "cuda":
        # Head dim 128, which the GPU kernels serve (the tiny preset's 32 runs in the interpreter only).
        overrides.update(dim=256, ffn_dim=512)
    return build_model("tiny", dtype=dtype, device=device, seed=7, **overrides)


def _generate(model, noise, prompts, switch_frame: int):
    from longlive_triton.runtime.pipeline import BlockPipeline
    torch.manual_seed(0)
    pipe = BlockPipeline(model)
    return pipe.generate(noise, prompts, [switch_frame]), pipe


def scenario_sp(timeout_s: float, backend: str | None = None, preset: str | dict | None = None, blocks: int = 6,
                switch_block: int = 3, layers: int | None = None, window: int | None = None) -> dict:
    """preset: patch config (bf16) or None (the fp32 reference); layers, window: smaller than the
    tiny preset's 2 layers and 12-frame window, to keep the Triton interpreter's runs short."""
    from .sequence_parallel import sequence_parallel
    from ..patch import patch_model
    ctx = init_distributed(timeout_s=timeout_s, backend=backend)
    dtype = torch.float32 if preset is None else torch.bfloat16
    bound = FP32_BOUND if preset is None else BF16_BOUND
    noise, prompts = _tiny_inputs(3 * blocks, dtype, ctx.device)
    model = _tiny_model(dtype, ctx.device, layers, window)
    patched = {} if preset is None else patch_model(model, preset).counts()
    want, one = _generate(model, noise, prompts, 3 * switch_block)
    sp = sequence_parallel(model)
    got, pipe = _generate(sp, noise, prompts, 3 * switch_block)
    h = sp.kv_cache_heads
    heads = slice(ctx.rank * h, (ctx.rank + 1) * h)
    cache_rel = max(rel_l2(mine[name], full[name][:, :, heads])
                    for mine, full in zip(pipe.caches.kv, one.caches.kv) for name in ("k", "v"))
    result = {"rank": ctx.rank, "latents_rel_l2": rel_l2(got, want), "cache_rel_l2": cache_rel, "bound": bound,
              "kv_heads": pipe.caches.kv[0]["k"].shape[2], "heads": sp.num_heads, "patched": patched,
              "finite": bool(torch.isfinite(got).all())}
    # Every rank must drive the same loop: rank 1 with other noise is refused on every rank.
    try:
        _generate(sp, noise + (ctx.rank == 1) * 1e-2, prompts, 3 * switch_block)
        result["mismatch_error"] = None
    except DistributedError as e:
        result["mismatch_error"] = str(e)
    result["ok"] = (result["finite"] and result["latents_rel_l2"] <= bound and cache_rel <= bound
                    and result["kv_heads"] * ctx.world_size == result["heads"]
                    and (preset is None or any(c["applied"] for c in patched.values()))
                    and result["mismatch_error"] is not None and "other inputs" in result["mismatch_error"])
    close_distributed()
    return result


def scenario_vae(timeout_s: float, backend: str | None = None, blocks: int = 4, switch_block: int = 2) -> dict:
    from longlive_triton.runtime.pipeline import BlockPipeline
    from longlive_triton.models.wan21_vae import build_vae_decoder
    from longlive_triton.runtime.video import generate_video
    from .vae_rank import iter_video_split, serve_vae
    ctx = init_distributed(expected_world_size=2, timeout_s=timeout_s, backend=backend)
    vae = build_vae_decoder("tiny", seed=4).to(ctx.device)
    if ctx.rank == 1:
        seen = []
        first = serve_vae(vae, on_block=lambda blk: seen.append((blk.index, blk.start_frame, blk.first_pixel_frame)))
        second = serve_vae(vae)
        result = {"rank": 1, "first": first.ended, "blocks": first.blocks, "callback_order": seen,
                  "second": second.ended}
        result["ok"] = first.ended == "end" and first.blocks == blocks and second.ended == "abort" \
            and [s[0] for s in seen] == list(range(blocks))
    else:
        noise, prompts = _tiny_inputs(3 * blocks, torch.float32, ctx.device)
        model = _tiny_model(torch.float32, ctx.device)
        switches = [3 * switch_block]
        torch.manual_seed(0)
        want = generate_video(BlockPipeline(model), vae, noise, prompts, switches)
        torch.manual_seed(0)
        got = list(iter_video_split(BlockPipeline(model), noise, prompts, switches))
        frames = torch.cat([blk.pixels.to(want.device) for blk in got], dim=2)
        for blk in iter_video_split(BlockPipeline(model), noise, prompts, switches):
            break  # the consumer leaves after the first block: rank 1 must see an ABORT
        result = {"rank": 0, "order": [(b.index, b.start_frame, b.first_pixel_frame) for b in got],
                  "bit_equal": torch.equal(frames, want), "rel_l2": rel_l2(frames, want), "frames": frames.shape[2],
                  "want_frames": want.shape[2]}
        # Bit-equal on one CPU; two GPUs may pick other convolution algorithms for the same decode.
        result["ok"] = result["rel_l2"] <= FP32_BOUND and [b.index for b in got] == list(range(blocks))
    close_distributed()
    return result


def scenario_peer_exit(timeout_s: float, backend: str | None = None, mode: str = "vae") -> dict:
    """Rank 1 leaves after one block; rank 0 carries on and must get a DistributedError quickly."""
    from longlive_triton.runtime.pipeline import BlockPipeline
    from longlive_triton.models.wan21_vae import build_vae_decoder
    from .sequence_parallel import sequence_parallel
    from .vae_rank import serve_vae, stream_to_vae
    if mode not in ("vae", "sp"):
        raise ValueError(f"peer-exit mode must be vae or sp, got {mode!r}")
    ctx = init_distributed(expected_world_size=2, timeout_s=timeout_s, backend=backend)
    noise, prompts = _tiny_inputs(12, torch.float32, ctx.device, prompts=1)
    model = _tiny_model(torch.float32, ctx.device)
    if mode == "sp":
        model = sequence_parallel(model, check_inputs=False)
    if ctx.rank == 1:
        # Leave after one block without closing the group, as a crashed rank would.
        if mode == "vae":
            serve_vae(build_vae_decoder("tiny", seed=4).to(ctx.device), on_block=lambda blk: os._exit(0))
        else:
            next(BlockPipeline(model).iter_blocks(noise, prompts[0]))
        os._exit(0)
    blocks = stream_to_vae(BlockPipeline(model), noise, prompts[0]) if mode == "vae" else \
        BlockPipeline(model).iter_blocks(noise, prompts[0])
    started, error = time.perf_counter(), None
    try:
        for _ in blocks:
            started = time.perf_counter()  # the peer leaves after the first block
    except DistributedError as e:
        error = str(e)
    seconds = time.perf_counter() - started
    # gloo sees the closed connection at once; NCCL (with TORCH_NCCL_BLOCKING_WAIT=1) when the timeout runs out.
    return {"rank": 0, "mode": mode, "error": error, "seconds_to_error": seconds,
            "ok": error is not None and seconds < timeout_s + 15}


def scenario_world_mismatch(timeout_s: float, backend: str | None = None) -> dict:
    started = time.perf_counter()
    try:
        init_distributed(timeout_s=timeout_s, backend=backend)
        error = None
    except DistributedError as e:
        error = str(e)
    seconds = time.perf_counter() - started
    return {"rank": int(os.environ["RANK"]), "error": error, "seconds_to_error": seconds,
            "ok": error is not None and seconds < 3 * timeout_s + 10}


_RUN = {"sp": scenario_sp, "vae": scenario_vae, "peer-exit": scenario_peer_exit, "world-mismatch": scenario_world_mismatch}


def _child(scenario: str, rank: int, world: int, port: int, options: dict, results) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two ranks share the CPU's cores
    try:
        result = _RUN[scenario](**options)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which decides
        result = {"rank": rank, "ok": False, "exception": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    results.put((rank, result))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(scenario: str, world: int = 2, *, options: dict | None = None, wait_s: float = 120.0,
                world_sizes: list[int] | None = None) -> list[dict]:
    """Run a scenario on `world` local gloo ranks (spawned processes, no torchrun); one result per rank.

    A rank that does not report within wait_s is killed and reported as {"ok": False, "exception":
    "no result ..."}; a rank that exits without reporting (peer-exit's rank 1) as {"exited": code}.
    world_sizes: the WORLD_SIZE each rank is told (default `world` for all)."""
    import multiprocessing as mp
    if scenario not in _RUN:
        raise ValueError(f"unknown scenario {scenario!r}; known: {SCENARIOS}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    sizes = world_sizes or [world] * world
    procs = [ctx.Process(target=_child, args=(scenario, r, sizes[r], port, options or {}, results), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    out: dict[int, dict] = {}
    deadline = time.monotonic() + wait_s
    while len(out) < world and time.monotonic() < deadline:
        try:
            rank, result = results.get(timeout=0.2)
            out[rank] = result
        except queue.Empty:
            if all(not p.is_alive() for p in procs) and results.empty():
                break
    for r, p in enumerate(procs):
        p.join(timeout=max(0.0, deadline - time.monotonic()) if r in out else 0.1)
        if p.is_alive():
            p.kill()
            p.join()
        if r not in out:
            out[r] = {"rank": r, "exited": p.exitcode} if p.exitcode is not None and p.exitcode >= 0 else \
                {"rank": r, "ok": False, "exception": f"no result within {wait_s:g} s (killed)"}
    return [out[r] for r in range(world)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m longlive_triton.distributed.check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", choices=SCENARIOS)
    parser.add_argument("--spawn", type=int, metavar="N", help="run N local gloo ranks (no torchrun)")
    parser.add_argument("--timeout", type=float, default=60.0, help="process-group timeout, seconds (default 60)")
    parser.add_argument("--backend", choices=("nccl", "gloo"), help="default: nccl with CUDA, else gloo (always gloo with --spawn)")
    parser.add_argument("--preset", help="sp: patch the tiny model with this preset (bf16; default: fp32 reference)")
    parser.add_argument("--mode", default="vae", choices=("vae", "sp"), help="peer-exit: which stream (default vae)")
    args = parser.parse_args(argv)
    options: dict = {"timeout_s": args.timeout, "backend": "gloo" if args.spawn else args.backend}
    if args.scenario == "sp" and args.preset:
        options["preset"] = args.preset
    if args.scenario == "peer-exit":
        options["mode"] = args.mode
    if args.scenario == "world-mismatch":
        if args.spawn != 2:
            parser.error("world-mismatch runs with --spawn 2 (it tells the two ranks different world sizes)")
        results = spawn_ranks(args.scenario, 2, options=options, world_sizes=[2, 3], wait_s=6 * args.timeout + 60)
    elif args.spawn:
        results = spawn_ranks(args.scenario, args.spawn, options=options, wait_s=10 * args.timeout + 120)
    else:
        results = [_RUN[args.scenario](**options)]
    for result in results:
        trace = result.pop("traceback", None)
        print(json.dumps(result, default=str))
        if trace:
            print(trace, file=sys.stderr)
    return 0 if all(r.get("ok", True) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
