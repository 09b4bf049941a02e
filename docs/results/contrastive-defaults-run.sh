#!/usr/bin/env bash
# Choosing the contrastive defaults (issue 24): contrastive-only pre-training, 40 epochs of the
# 50-30 pool of xca-cadml at 128², the study's recipe (2 DeepSpeed ranks x 8, fp32 on this CPU),
# seed 0; one option changed per run against the baseline (adapter on the 4x4-pooled grid,
# cosine EMA, per-rank BN, head lr x1). Judged by con_top1 / the stds in log.csv and the probe.
set -e
out=runs/defaults
mkdir -p $out
port=$(.venv/bin/python -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
run() {  # name, overrides...
  local name=$1; shift
  [ -f $out/$name/export/model.safetensors ] && return 0
  .venv/bin/deepspeed --num_gpus 2 --master_port $port launch/pretrain.py \
    --config configs/pretrain/cmunet-con-cpu.yaml \
    data.shards=runs/data/xca128 data.ratio=50-30 out=$out/$name \
    train.epochs=40 train.warmup_epochs=4 train.log_every=11 \
    train.figure_every=1000 train.checkpoint_every=1000 \
    tracking.uri=sqlite:///$PWD/$out/mlflow.db "$@" > $out/$name.log 2>&1
}
run pool4
run ema-constant cmunet.ema_schedule=constant
run sync-bn model.sync_batch_norm=true
run head-lr-0.1 cmunet.head_lr_scale=0.1
# the sync-BN run led by 0.08 in retrieval: its seed noise, and the per-pixel adapter beside it
run sync-bn-pool1 model.sync_batch_norm=true cmunet.adapter_pool=1
run pool4-seed1 seed=1
run sync-bn-seed1 model.sync_batch_norm=true seed=1
