#!/usr/bin/env bash
# Copy the python files of LongLive v1.0 (wan/, utils/, pipeline/; no assets, weights or docs) from a
# local git mirror of NVlabs/LongLive into .stock/LongLive at the repository root. That folder is
# git-ignored: it is read at run time by longlive_triton.stock.longlive1 (LONGLIVE_SRC=.stock/LongLive) and is
# never committed. LongLive's code is CC-BY-NC-SA-4.0 / Apache-2.0 and stays outside this repository.
#
#   tests/gpu/prepare_stock_src.sh [MIRROR_GIT_DIR] [REF]
#   MIRROR_GIT_DIR: a clone or bare mirror of NVlabs/LongLive (default /work/.mirror/NVlabs+LongLive/repo)
#   REF: the branch, tag or commit to take (default v1.0)
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

rm -rf "$dest"
mkdir -p "$dest"
git -C "$mirror" archive --format=tar "$commit" wan utils pipeline | tar -x -C "$dest"
find "$dest" -type f ! -name '*.py' -delete
find "$dest" -type d -empty -delete
echo "$commit" > "$dest/LONGLIVE_COMMIT"

for f in wan/modules/causal_model.py wan/modules/model.py wan/modules/attention.py utils/memory.py; do
  [[ -f "$dest/$f" ]] || { echo "prepare_stock_src: $ref lacks $f: not a LongLive v1.0 tree" >&2; exit 1; }
done
echo "LongLive $ref ($commit): $(find "$dest" -name '*.py' | wc -l) python files, $(du -sh "$dest" | cut -f1) in $dest"
