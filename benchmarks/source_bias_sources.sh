#!/bin/bash
# Phase 1 on Beauty-637 with the study's settings (source_bias.py:beauty637_study) for each of
# the four LLM sources, raw and cleaned (benchmarks/RESULTS.md, "Beauty-637: four LLM sources").
# Needs the shared data folder; writes runs/sources/<source>-<raw|clean>/ and a line per run to
# runs/sources/done.txt.
set -u
cd "$(dirname "$0")/.."
mkdir -p runs/sources
for source in Mistral-7B-Instruct-v0.2 gemini-pro gpt-3.5-turbo-0613 llama; do
  for clean in False True; do
    name="$source-$([ "$clean" = True ] && echo clean || echo raw)"
    python -m echo_jax.main --config=configs/source_bias.py:beauty637_study \
      --workdir="runs/sources/$name" --config.data.aigc_source="$source" \
      --config.data.clean="$clean" --config.phases.rhos='(0.0,)' \
      > "runs/sources/$name.log" 2>&1
    echo "$name rc=$?" >> runs/sources/done.txt
  done
done
