#!/bin/bash
# Multi-node launch without SLURM: run this on every node with the same MASTER_ADDR.
#
#   NNODES=8 NODE_RANK=<0..7> MASTER_ADDR=<node 0 host> bash launch/torchrun_multinode.sh recipes/70b_math.yaml
set -euo pipefail
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
export CUDA_DEVICE_MAX_CONNECTIONS=1
exec torchrun \
  --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
  --master-addr "$MASTER_ADDR" --master-port "${MASTER_PORT:-29500}" \
  "$(dirname "$0")/pretrain_psft.py" "$@"
