#!/usr/bin/env bash
# contrastive-only, 20 epochs, one process x 16 images, fp32, 1 thread: old vs new adapter
set -e
for adapter in conv-bn-relu linear-pooled; do
  OMP_NUM_THREADS=1 .venv/bin/python launch/pretrain.py --config configs/pretrain/cmunet-con-cpu.yaml \
    data.shards=runs/data/xca128 data.ratio=50-30 out=runs/health/$adapter cmunet.adapter=$adapter \
    train.epochs=20 train.warmup_epochs=2 train.micro_batch=16 train.log_every=11 \
    train.figure_every=100 train.checkpoint_every=1000 \
    tracking.uri=sqlite:///$PWD/runs/health/mlflow.db > runs/health/$adapter.log 2>&1
done
