#!/bin/bash
# Multi-node launch without SLURM: run this on every node with the same MASTER_ADDR.
#
#   NNODES=8 NODE_RANK=<0..7> MASTER_ADDR=<node 0 host> bash launch/torchrun_multinode.sh recipes/70b_math.yaml
#
# GPUS_PER_NODE (default 8) is the number of training processes per node; MASTER_PORT
# (default 29500) must be free on node 0. Every node first checks the recipe against the
# whole world's size, so a bad recipe stops with one `error:` line before torchrun starts.
set -euo pipefail
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
HERE=$(dirname "$0")
export CUDA_DEVICE_MAX_CONNECTIONS=1
# How long torchrun lets its workers save after it forwards SIGTERM, before it kills them.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}
WORLD_SIZE=$((NNODES * GPUS_PER_NODE)) RANK=0 python "$HERE/pretrain_psft.py" "$@" --validate-only >/dev/null
exec torchrun \
  --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
  --master-addr "$MASTER_ADDR" --master-port "${MASTER_PORT:-29500}" \
  "$HERE/pretrain_psft.py" "$@"
