#!/bin/bash
# Phase 1 on Beauty-637 with the study's settings (source_bias.py:beauty637_study), then with one
# of echo_jax's former choices at a time (benchmarks/RESULTS.md, "With the study's settings").
# Needs the shared data folder; writes runs/ablation/<name>/ and a line per run to done.txt.
set -u
cd "$(dirname "$0")/.."
mkdir -p runs/ablation
run() {
  name=$1
  shift
  python -m echo_jax.main --config=configs/source_bias.py:beauty637_study \
    --workdir="runs/ablation/$name" --config.phases.encoders='("sasrec","mean")' \
    --config.phases.rhos='(0.0,)' --config.phases.rho_encoder=sasrec "$@" \
    > "runs/ablation/$name.log" 2>&1
  echo "$name rc=$?" >> runs/ablation/done.txt
}
run study
run projection --config.model.item_projection=True --config.model.dim=64
run sentence_pooling --config.model.pooling=sentence
run four_negatives --config.train.negatives=0
run our_training --config.train.batch_size=64 --config.train.num_steps=200 \
  --config.train.checkpoint_every=100
run all_ours --config.model.item_projection=True --config.model.dim=64 \
  --config.model.pooling=sentence --config.train.negatives=0 --config.train.batch_size=64 \
  --config.train.num_steps=200 --config.train.checkpoint_every=100
