#!/usr/bin/env bash
# The `multi-gpu` step of run_device.sh (two GPUs of one host, NCCL), also runnable on its own:
#   bash tests/gpu/multi_gpu.sh OUT_DIR
# 1. the 2-rank checks of longlive_triton/distributed/check.py with NCCL (tiny model widened to head
#    dim 128): sequence-parallel == one GPU (reference fp32, then the exact preset), the VAE on rank 1
#    == one-GPU iter_video, and a rank that leaves -> a DistributedError once the timeout runs out;
# 2. sequence-parallel generation at 1.3B shapes against one GPU (acceptance: SP=2 >= 1.7x);
# 3. the VAE on GPU 1 pipelined with the generator on GPU 0 (acceptance: interval <= 1.05x the
#    generator alone), and both against one GPU doing generator + VAE in turn.
# Not covered: NCCL collectives inside captured CUDA graphs (the sequence-parallel forward runs eagerly).
set -uo pipefail
OUT=${1:-$(mktemp -d)}
# NVLink multicast stays off (the device notes: using it can put the shared host's GPUs out of service).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
gpus=$(nvidia-smi -L | wc -l)
if [ "$gpus" -lt 2 ]; then echo "multi-gpu: needs 2 GPUs, this machine has $gpus"; exit 2; fi
run2() { python3 -m torch.distributed.run --nproc-per-node 2 "$@"; }
status=0
step() { echo "--- $* $(date -u +%H:%M:%S)"; "$@" || status=1; }
step run2 -m longlive_triton.distributed.check sp --timeout 120
step run2 -m longlive_triton.distributed.check sp --preset exact --timeout 120
step run2 -m longlive_triton.distributed.check vae --timeout 120
# NCCL reports a dead peer only when the timeout runs out, and raises only with blocking waits.
step env TORCH_NCCL_BLOCKING_WAIT=1 python3 -m torch.distributed.run --nproc-per-node 2 \
  -m longlive_triton.distributed.check peer-exit --mode sp --timeout 20
step env TORCH_NCCL_BLOCKING_WAIT=1 python3 -m torch.distributed.run --nproc-per-node 2 \
  -m longlive_triton.distributed.check peer-exit --mode vae --timeout 20
step run2 -m longlive_triton.bench e2e --devices 2 --configs exact fp8 --blocks 20 --json "$OUT/e2e_sp2.json"
step run2 -m longlive_triton.bench vae --devices 2 --generator exact fastest --generator-blocks 20 \
  --json "$OUT/vae_split.json"
exit $status
