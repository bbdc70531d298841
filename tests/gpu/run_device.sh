#!/usr/bin/env bash
# One device session, everything that needs the GPU in one go (see ../../README.md):
#   bash tests/gpu/run_device.sh [install|smoke|tests|gpu-suite|gpu-suite-reverse|graphs|parity|e2e|e2e-stock|
#                                 cold-start|soak|kernels|profile|vae|vae-tests|vae-bench|e2e-vae|app|multi-gpu ...]
#   (default: tests graphs parity e2e kernels profile; vae = vae-tests vae-bench, whose summary also reads
#   the tests' figures; multi-gpu needs a kind with 2 GPUs: nvidia-h200-x2)
# Logs and JSON land in $OUT (the device tool brings that folder back). Carry .stock for parity and
# the stock-class steps, and .whl: the GPU image lacks PyYAML (and maybe tqdm), and its setuptools
# cannot make the editable install that maps kernels/, patches/ and bench/ into the longlive_triton
# namespace (fill .whl with `pip download --no-deps --only-binary=:all: --python-version 3.12
# --platform manylinux2014_x86_64 -d .whl pyyaml setuptools tqdm`; the app step also needs
# imageio-ffmpeg and pillow there: add them, with `--platform manylinux_2_28_x86_64` if pip finds no wheel).
# gpu-suite runs every GPU test but the smoke cases, which repeat some of them (`pytest -m "gpu and not
# smoke" tests/`), gpu-suite-reverse the same last to first (no test may depend on another); GPU_MARK
# narrows both: GPU_MARK="gpu and not slow and not smoke" (slow: 1.3B models over many blocks) is the
# quick mode. smoke: one real-shape case per kernel and a short stock-class e2e (after every change). cold-start: three processes of the stock-class fp8 bench on
# caches of their own, the first compiling and tuning (with warmup), the next two reading the caches
# (with and without warmup): first block and prompt switches against steady.
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
export PYTHONUNBUFFERED=1
# Tuned kernel configs (kernels/_common.py AutotuneCache): one JSON per GPU model and Triton version,
# kept in .autotune (git-ignored): a step after the first reuses what the first tuned, and carrying
# .autotune into a later call (it is copied to $OUT at the end) skips the search there too.
export LONGLIVE_TRITON_CACHE_DIR=${LONGLIVE_TRITON_CACHE_DIR:-$PWD/.autotune}
steps=${*:-tests graphs parity e2e kernels profile}
steps=$(echo " $steps " | sed 's/ vae / vae-tests vae-bench /g')
# At most 8 files come back from $OUT: the install log stays behind unless the install fails.
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation -e . >/tmp/install.log 2>&1 || { cat /tmp/install.log; exit 1; }
python3 -c "import yaml, tqdm" || { echo "pyyaml or tqdm missing: add their wheels to .whl (see the top of this file)"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
status=0
for step in $steps; do
  echo "=== $step $(date -u +%H:%M:%S)"
  case $step in
    tests)   python3 -m pytest -q -m gpu tests/kernels tests/patches 2>&1 | tee "$OUT/tests.log" ;;
    smoke)   { LONGLIVE_SRC=.stock/LongLive python3 -m pytest -q -rA -m "gpu and smoke" tests/gpu/test_smoke.py; t=$?
               LONGLIVE_SRC=.stock/LongLive longlive-bench e2e --model stock --configs fp8 --blocks 7 --switch-every 5; e=$?
               [ $t = 0 ] && [ $e = 0 ]; } 2>&1 | tee "$OUT/smoke.log" ;;
    gpu-suite) LONGLIVE_SRC=.stock/LongLive python3 -m pytest -q -m "${GPU_MARK:-gpu and not smoke}" --durations=30 \
               --junitxml="$OUT/gpu-suite.xml" tests/ 2>&1 | tee "$OUT/gpu-suite.log" ;;
    gpu-suite-reverse) LONGLIVE_SRC=.stock/LongLive python3 -m pytest -q -m "${GPU_MARK:-gpu and not smoke}" --reverse-order \
               --durations=30 tests/ 2>&1 | tee "$OUT/gpu-suite-reverse.log" ;;
    parity)  LONGLIVE_SRC=.stock/LongLive PARITY_OUT="$OUT/parity.json" \
               python3 -m pytest -q -s tests/gpu/test_stock_parity.py tests/reference/test_patch_stock_class.py 2>&1 | tee "$OUT/parity.log" ;;
    kernels) longlive-bench kernels --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log" ;;
    graphs)  python3 -m pytest -q -s tests/gpu/test_graphs.py 2>&1 | tee "$OUT/graphs.log" ;;
    e2e)     longlive-bench e2e --configs exact exact,cuda_graphs=false fp8 window9 exact,token_merge_ratio=0.5 fastest --blocks 20 --profile \
               --switch-block 10 --json "$OUT/e2e.json" --html "$OUT/e2e.html" 2>&1 | tee "$OUT/e2e.log" ;;
    app)     # the longlive-triton command (not in the default steps): embedded generate, then tests/app
             { longlive-triton generate --output "$OUT/embedded.mp4" --frames 30; g=$?
               python3 -m pytest -q tests/app; t=$?; [ $g = 0 ] && [ $t = 0 ]; } 2>&1 | tee "$OUT/app.log" ;;
    e2e-stock) { rc=0; for ctx in tensor list; do
                   LONGLIVE_SRC=.stock/LongLive longlive-bench e2e --model stock --configs exact fp8 window9 fastest \
                     --context $ctx --cache-frames 12 window --blocks 12 --append "$OUT/e2e-stock.jsonl" || rc=1
                 done; exit $rc; } 2>&1 | tee "$OUT/e2e-stock.log" ;;
    cold-start) { rc=0; tc=$(mktemp -d); ac=$(mktemp -d)  # empty compile and autotune caches: process 1 is cold
                 for run in 1-cold 2-warmup 3-cache-only; do
                   echo "--- process $run"; [ $run = 3-cache-only ] && w= || w=--warmup-shapes
                   TRITON_CACHE_DIR=$tc LONGLIVE_TRITON_CACHE_DIR=$ac LONGLIVE_SRC=.stock/LongLive longlive-bench e2e \
                     --model stock --configs fp8 --blocks 16 --switch-every 5 $w --json "$OUT/cold-start-$run.json" || rc=1
                 done; exit $rc; } 2>&1 | tee "$OUT/cold-start.log" ;;
    soak)    LONGLIVE_SRC=.stock/LongLive longlive-bench e2e --model stock --configs exact fp8 fastest --cache-frames 12 \
               --blocks 100 --switch-every 25 --json "$OUT/soak.json" 2>&1 | tee "$OUT/soak.log" ;;
    profile) python3 -m longlive_triton.bench.profile_block --rows 25 2>&1 | tee "$OUT/profile.log" ;;
    vae-tests) { LONGLIVE_SRC=.stock/LongLive VAE_OUT="$OUT/vae_parity.json" python3 -m pytest -q -s \
                 tests/gpu/test_vae_gpu.py tests/kernels/test_vae_rms_norm_silu.py tests/kernels/test_vae_conv3d.py; t=$?
               python3 -m longlive_triton.bench.vae_summary "$OUT/vae_parity.json"; [ $t = 0 ]; } 2>&1 | tee "$OUT/vae_tests.log" ;;
    vae-bench) { longlive-bench kernels --only vae_rms_norm_silu vae_conv3d --json "$OUT/vae_kernels.json"; k=$?
               LONGLIVE_SRC=.stock/LongLive longlive-bench vae --profile 25 --json "$OUT/vae.json"; b=$?
               python3 -m longlive_triton.bench.vae_summary "$OUT/vae.json" "$OUT/vae_parity.json"
               [ $k = 0 ] && [ $b = 0 ]; } 2>&1 | tee "$OUT/vae_bench.log" ;;
    e2e-vae) { longlive-bench e2e --vae --configs exact fp8 --blocks 12 --json "$OUT/e2e_vae.json"; e=$?
               python3 -m longlive_triton.bench.vae_summary "$OUT/e2e_vae.json"; [ $e = 0 ]; } 2>&1 | tee "$OUT/e2e_vae.log" ;;
    multi-gpu) bash tests/gpu/multi_gpu.sh "$OUT" 2>&1 | tee "$OUT/multi_gpu.log" ;;
    install) ;;  # the package is installed above: nothing more
    *) echo "unknown step $step"; status=2 ;;
  esac
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
done
cp "$LONGLIVE_TRITON_CACHE_DIR"/autotune-*.json "$OUT/" 2>/dev/null
exit $status
