#!/usr/bin/env bash
# The e2e figures of an older tree beside the working tree's, on the same card in one call (a refactor must
# leave them within noise). Make the older tree here first, then carry it:
#   mkdir .before && git archive <rev> | tar -x -C .before     (.before is git-ignored via .git/info/exclude)
#   bash tests/gpu/before_after.sh [BEFORE_DIR] [e2e args...]  (default: .before --configs exact fp8 --blocks 8)
# The older tree installs non-editably into its own folder and runs first; the working tree's editable
# install (run_device.sh's) runs second. JSON of both lands in $OUT (before.json, after.json).
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
before=${1:-.before}; shift || true
args=("$@"); [ ${#args[@]} = 0 ] && args=(--configs exact fp8 --blocks 8)
[ -d "$before" ] || { echo "before_after: no tree at $before"; exit 2; }
python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/before-site "$before" >/tmp/before-install.log 2>&1 \
  || { cat /tmp/before-install.log; exit 1; }
rc=0
echo "=== before ($before)"
PYTHONPATH=/tmp/before-site:${PYTHONPATH:-} python3 -m longlive_triton.bench e2e "${args[@]}" --json "$OUT/before.json" || rc=1
echo "=== after (working tree)"
python3 -m longlive_triton.bench e2e "${args[@]}" --json "$OUT/after.json" || rc=1
exit $rc
