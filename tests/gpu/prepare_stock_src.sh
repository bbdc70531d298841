#!/usr/bin/env bash
# Copy the python files of LongLive (no assets, weights or docs) from a local git mirror of NVlabs/LongLive
# into .stock/ at the repository root: v1.0 (wan/, utils/, pipeline/) into .stock/LongLive, LongLive 2.0
# (branch main: wan_5b/, utils/, pipeline/) into .stock/LongLive2; the tree's files say which it is. That
# folder is git-ignored: it is read at run time by longlive_triton.stock.longlive1 / longlive2
# (LONGLIVE_SRC=.stock/LongLive, LONGLIVE_SRC2=.stock/LongLive2 for the tests) and is never committed.
# LongLive's code is CC-BY-NC-SA-4.0 / Apache-2.0 and stays outside this repository.
#
#   tests/gpu/prepare_stock_src.sh [MIRROR_GIT_DIR] [REF]
#   MIRROR_GIT_DIR: a clone or bare mirror of NVlabs/LongLive (default /work/.mirror/NVlabs+LongLive/repo)
#   REF: the branch, tag or commit to take (default v1.0; main is LongLive 2.0)
set -euo pipefail

mirror=${1:-/work/.mirror/NVlabs+LongLive/repo}
ref=${2:-v1.0}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
dest="$root/.stock/LongLive"

if ! git -C "$mirror" rev-parse --git-dir >/dev/null 2>&1; then
  echo "prepare_stock_src: $mirror is not a git repository (a clone or mirror of NVlabs/LongLive)" >&2
  exit 1
fi
if ! commit=$(git -C "$mirror" rev-parse --verify --quiet "$ref^{commit}"); then
  echo "prepare_stock_src: $mirror has no ref $ref" >&2
  exit 1
fi

if git -C "$mirror" cat-file -e "$commit:wan_5b/modules/causal_model.py" 2>/dev/null; then
  dest="$root/.stock/LongLive2"
  dirs=(wan_5b utils pipeline)
  required=(wan_5b/modules/causal_model.py wan_5b/modules/model.py wan_5b/modules/attention.py
            utils/wan_5b_wrapper.py pipeline/causal_diffusion_inference.py)
  family="LongLive 2.0"
else
  dirs=(wan utils pipeline)
  required=(wan/modules/causal_model.py wan/modules/model.py wan/modules/attention.py utils/memory.py)
  family="LongLive v1.0"
fi

rm -rf "$dest"
mkdir -p "$dest"
git -C "$mirror" archive --format=tar "$commit" "${dirs[@]}" | tar -x -C "$dest"
find "$dest" -type f ! -name '*.py' -delete
find "$dest" -type d -empty -delete
echo "$commit" > "$dest/LONGLIVE_COMMIT"

for f in "${required[@]}"; do
  [[ -f "$dest/$f" ]] || { echo "prepare_stock_src: $ref lacks $f: not a $family tree" >&2; exit 1; }
done
echo "LongLive $ref ($commit): $(find "$dest" -name '*.py' | wc -l) python files, $(du -sh "$dest" | cut -f1) in $dest"
