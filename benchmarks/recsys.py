"""Recommender throughput with a frozen MiniLM item tower: cached item vectors vs re-encoding.

The study's PyTorch code runs the frozen BERT inside the model's forward pass, so every epoch
(in fact every batch) re-encodes the item texts. Here the vectors are computed once and cached
(`echo_jax.recsys.item_cache`); training and evaluation only project them. This script measures,
in one run on Beauty-637:

* training examples/s through the shared loop with cached vectors, against the same training
  plus one re-encoding of every item text per epoch, and plus encoding each batch's texts (the
  study's per-batch forward);
* full-ranking evaluation time over the catalogue, with cached vectors and with re-encoding.

Encoding times are warm (jit compiled beforehand), so the ratio is not inflated by compilation.

    ECHO_JAX_DATA=/path/to/shared/data python benchmarks/recsys.py [--steps 200]

Prints a markdown table and writes benchmarks/results/recsys.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import jax
import numpy as np
from absl import logging

from echo_jax.core import files, sharding
from echo_jax.core.config import load_config
from echo_jax.core.train_loop import LoopConfig, train
from echo_jax.recsys import metrics
from echo_jax.recsys.jobs.train import build_task, prepare
from echo_jax.recsys.text_encoder import embed_texts
from echo_jax.recsys.train import Scorer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "recsys.json"))
    args = parser.parse_args()
    logging.set_verbosity(logging.WARNING)

    config = load_config(
        f"{REPO}/configs/recsys.py:beauty637",
        [
            f"train.num_steps={args.steps}",
            f"train.log_every={max(args.steps // 5, 1)}",
            f"train.checkpoint_every={args.steps}",
            "train.eval_every=0",
        ],
    )
    with tempfile.TemporaryDirectory() as tmp:
        prep = prepare(config, os.path.join(tmp, "cache"))  # encodes every text once
        texts, num_items, eval_arrays = prep.texts, len(prep.rows.items), prep.eval_arrays
        model_dir = files.data_dir() / "minilm"
        encode_s = _best_of(lambda: embed_texts(texts, model_dir))
        mesh = sharding.make_mesh(config.mesh.to_dict())
        task, _ = build_task(config, mesh, prep)
        batch = next(task.train_iter)
        batch_texts = [
            texts[r]
            for r in np.concatenate(
                [batch["history"][batch["history_mask"]], batch["candidates"].ravel()]
            )
        ]
        embed_texts(batch_texts, model_dir)
        batch_encode_s = _best_of(lambda: embed_texts(batch_texts, model_dir))
        state = train(
            task,
            LoopConfig.from_config(config.train),
            mesh,
            config.sharding.rules,
            os.path.join(tmp, "run"),
            config.seed,
            label="bench",
        )
        rows = files.read_jsonl(os.path.join(tmp, "run", "metrics.jsonl"))
        rates = [r["perf/steps_per_s"] for r in rows]
        steps_per_s = float(np.median(rates[1:]))  # the first interval includes compilation

        scorer = Scorer(prep.model, prep.table)

        def full_ranking():
            items = scorer.item_vectors(state.params)
            users = scorer.user_vectors(
                state.params, eval_arrays["history"], eval_arrays["history_mask"]
            )
            exclude = np.zeros((len(users), num_items), bool)
            return metrics.full_ranking(
                users @ items[:num_items].T, eval_arrays["positive_item"], exclude
            )

        full_ranking()
        eval_s = _best_of(full_ranking)

    batch_size = config.train.batch_size
    train_rows = len(prep.train_arrays["positive"])
    epoch_train_s = train_rows / (steps_per_s * batch_size)
    cached = steps_per_s * batch_size
    per_epoch = train_rows / (epoch_train_s + encode_s)
    per_batch = batch_size / (1 / steps_per_s + batch_encode_s)
    result = {
        "dataset": "beauty637",
        "texts": len(texts),
        "train_rows": train_rows,
        "eval_users": int(len(eval_arrays["history"])),
        "catalogue_items": num_items,
        "batch_size": batch_size,
        "steps": args.steps,
        "encode_all_texts_s": encode_s,
        "encode_one_batch_texts_s": batch_encode_s,
        "train_examples_per_s": {
            "cached": cached,
            "reencode_per_epoch": per_epoch,
            "reencode_per_batch": per_batch,
        },
        "speedup_vs_reencode_per_epoch": cached / per_epoch,
        "speedup_vs_reencode_per_batch": cached / per_batch,
        "full_ranking_eval_s": {"cached": eval_s, "reencode": eval_s + encode_s},
        "eval_speedup": (eval_s + encode_s) / eval_s,
        "device": f"{jax.devices()[0].platform} x{jax.device_count()}",
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "jax": jax.__version__,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(markdown(result))


def markdown(r: dict) -> str:
    t, e = r["train_examples_per_s"], r["full_ranking_eval_s"]
    return "\n".join(
        [
            f"Beauty-637, frozen MiniLM, {r['texts']} item texts, batch {r['batch_size']}, "
            f"{r['device']} ({r['cpu_count']} CPUs)",
            "",
            "| | cached vectors | re-encode per epoch | re-encode per batch (study) |",
            "|---|---|---|---|",
            f"| train examples/s | {t['cached']:,.0f} | {t['reencode_per_epoch']:,.0f} | "
            f"{t['reencode_per_batch']:,.0f} |",
            f"| speed-up of caching | 1.0x | {r['speedup_vs_reencode_per_epoch']:.1f}x | "
            f"{r['speedup_vs_reencode_per_batch']:.1f}x |",
            f"| full-ranking eval ({r['eval_users']} users x {r['catalogue_items']} items) | "
            f"{e['cached']:.3f} s | {e['reencode']:.3f} s ({r['eval_speedup']:.0f}x) | |",
            "",
            f"encoding all {r['texts']} texts: {r['encode_all_texts_s']:.2f} s; one batch's "
            f"texts: {r['encode_one_batch_texts_s']:.2f} s",
        ]
    )


if __name__ == "__main__":
    main()
