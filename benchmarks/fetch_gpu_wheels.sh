#!/usr/bin/env bash
# Download the wheels benchmarks/gpu_check.sh installs on the H200 device machine into .whl/.
#
#   bash benchmarks/fetch_gpu_wheels.sh [--dest DIR] [--check-only] [--help]
#
# The device machine (Python 3.12, torch 2.11 CUDA) reaches no package index, so whatever
# its image lacks travels as wheels (the image's package list: benchmarks/gpu_image_packages.txt).
# Missing there, needed here:
#   megatron-core  the version this checkout's .venv has (cpu_compat and the tests pin the line)
#   datasets       and of its requirements the two the image lacks: dill, multiprocess
# Everything else the package and its tests import (torch, numpy, packaging, psutil, pyarrow,
# pandas, fsspec, huggingface-hub, xxhash, tokenizers, sentencepiece, jinja2, pyyaml,
# safetensors, tensorboard, tqdm, transformers, pytest, pytest-timeout) is in the image.
# The package itself does not travel as a wheel: gpu_check.sh puts the checkout on PYTHONPATH,
# so the code that runs is always the code that was sent (a wheel could go stale).
#
# Versions are those of this checkout's .venv (what the CPU tests ran), so the device runs
# what was tested here. One version of each: pip refuses two of one name in one install.
# Needs pip and PyPI here; prints the total size, which counts towards the 64 MiB a device
# call may carry (the rest of the working tree is well under 1 MiB).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/.whl"
CHECK_ONLY=0
LIMIT_MIB=56 # of the 64 MiB a call carries; leaves room for the working tree itself

usage() { sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --dest) [ $# -ge 2 ] || { echo "fetch_gpu_wheels: error: --dest needs a directory" >&2; exit 2; }; DEST="$2"; shift 2 ;;
    --check-only) CHECK_ONLY=1; shift ;;
    *) echo "fetch_gpu_wheels: error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

# The interpreter whose pip downloads, and whose installed versions are pinned.
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi

version_of() { # NAME DEFAULT: the version installed for $PY, else DEFAULT
  "$PY" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: print(sys.argv[2])" "$1" "$2"
}

# name==version, each pinned to the venv's (fallbacks: what this checkout was tested with).
SPECS=(
  "megatron-core==$(version_of megatron-core 0.16.1)"
  "datasets==$(version_of datasets 5.2.0)"
  "dill==$(version_of dill 0.4.1)"
  "multiprocess==$(version_of multiprocess 0.70.19)"
)

if [ "$CHECK_ONLY" = 0 ]; then
  mkdir -p "$DEST"
  # A manylinux tag pip matches only exactly: the README's list plus the common newer ones.
  PLATFORMS=()
  for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
    manylinux1_x86_64 manylinux_2_24_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64; do
    PLATFORMS+=(--platform "$p")
  done
  for spec in "${SPECS[@]}"; do
    name="${spec%%==*}"
    want="${spec##*==}"
    norm="$(echo "$name" | tr '-' '_')"
    # Drop other versions of this name left by an earlier fetch (two versions stop the install).
    for old in "$DEST/${norm}"-*.whl; do
      [ -e "$old" ] || continue
      case "$(basename "$old")" in "${norm}-${want}-"*) ;; *) rm -f "$old" ;; esac
    done
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${PLATFORMS[@]}" -d "$DEST" "$spec"
  done
fi

# Exactly one wheel per name, each the pinned version, and the total under the limit.
fail=0
for spec in "${SPECS[@]}"; do
  norm="$(echo "${spec%%==*}" | tr '-' '_')"
  want="${spec##*==}"
  found=("$DEST/${norm}"-*.whl)
  if [ ! -e "${found[0]}" ]; then
    echo "fetch_gpu_wheels: error: no wheel for $spec in $DEST" >&2; fail=1
  elif [ "${#found[@]}" -ne 1 ]; then
    echo "fetch_gpu_wheels: error: ${#found[@]} wheels for ${spec%%==*} in $DEST; keep one" >&2; fail=1
  else
    case "$(basename "${found[0]}")" in "${norm}-${want}-"*) ;; *)
      echo "fetch_gpu_wheels: error: $(basename "${found[0]}") is not $spec" >&2; fail=1 ;; esac
  fi
done
[ "$fail" = 0 ] || exit 1
bytes=$(cat "$DEST"/*.whl | wc -c)
printf '%s\n' "$DEST"/*.whl | while read -r w; do printf '%10d  %s\n' "$(wc -c <"$w")" "$(basename "$w")"; done
echo "total $bytes bytes ($((bytes / 1048576)) MiB) in $DEST; the device call may carry 64 MiB"
if [ "$bytes" -gt $((LIMIT_MIB * 1048576)) ]; then
  echo "fetch_gpu_wheels: error: the wheels exceed ${LIMIT_MIB} MiB; the device call would refuse the tree" >&2
  exit 1
fi
