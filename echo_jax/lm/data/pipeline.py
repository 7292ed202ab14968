"""The grain input pipeline for pretraining on a style mixture, and packed batches for evaluation.

Reads top to bottom: one `ProblemSource` per style -> this process's shard -> seeded shuffle ->
repeat -> `MapDataset.mix` with the mixture's rates -> tokenize -> `to_iter_dataset` -> first-fit
packing into rows of `seq_len` -> batch. Everything is indexed and seeded, so the iterator state
(grain's `get_state`, saved with `grain.checkpoint.CheckpointSave`) resumes the exact same stream.

Each example is `encode(question + "\\n\\n") + encode(solution) + [EOS]`; inputs = tokens[:-1] and
targets = tokens[1:]. Batch features, all [B, L] with B = batch_size, L = seq_len:
  inputs, targets   int32 token ids (0 = padding);
  loss_mask         float32, 1 on targets that are solution tokens or the final EOS ("solution"), or
                    on every real target ("all"); 0 on padding;
  segment_ids       int32, 1, 2, ... per packed example in the row, 0 on padding;
  positions         int32 position within its own example, from 0.
"""

import threading
from collections.abc import Sequence

import grain
import numpy as np
from absl import logging

from echo_jax.core.config import ConfigError
from echo_jax.lm.data import generators, mixtures, pretrain_files
from echo_jax.lm.data import vocab as vocab_lib

FEATURES = ("inputs", "targets", "loss_mask", "segment_ids", "positions")
LOSS_ON = ("solution", "all")
SOURCES = ("synthetic", "real")
_PACKED = ("inputs", "targets", "loss_mask")


class Tokenize(grain.transforms.Map):
    """Tokenizes a `ProblemSource` item into next-token inputs, targets and a loss mask.

    Examples longer than seq_len + 1 tokens are truncated; `num_truncated` counts them (a warning is
    logged the first time) because truncation cuts off the answer the model should learn.
    """

    def __init__(self, vocabulary, seq_len: int, loss_on: str):
        if loss_on not in LOSS_ON:
            raise ConfigError(f"unknown loss_on {loss_on!r}; valid: {LOSS_ON}")
        self._vocab, self._seq_len, self._loss_on = vocabulary, seq_len, loss_on
        self.num_truncated = 0
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def map(self, element: dict) -> dict[str, np.ndarray]:
        prompt = element["question"] + "\n\n"
        solution = element["text"][len(prompt) :]
        prompt_ids = list(self._vocab.encode(prompt))
        tokens = np.asarray(
            prompt_ids + list(self._vocab.encode(solution)) + [self._vocab.eos_id], dtype=np.int32
        )
        if len(tokens) > self._seq_len + 1:
            with self._lock:
                self.num_truncated += 1
                if self.num_truncated == 1:
                    logging.warning(
                        "truncating an example of %d tokens to seq_len + 1 = %d",
                        len(tokens),
                        self._seq_len + 1,
                    )
            tokens = tokens[: self._seq_len + 1]
        loss_mask = np.ones(len(tokens) - 1, np.float32)
        if self._loss_on == "solution":
            loss_mask[: len(prompt_ids) - 1] = 0.0  # target j is token j + 1
        return {"inputs": tokens[:-1], "targets": tokens[1:], "loss_mask": loss_mask}


def _rename_packed(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Keeps the documented features; grain names packing metadata per feature."""
    return {
        "inputs": row["inputs"].astype(np.int32),
        "targets": row["targets"].astype(np.int32),
        "loss_mask": row["loss_mask"].astype(np.float32),
        "segment_ids": row["inputs_segment_ids"].astype(np.int32),
        "positions": row["inputs_positions"].astype(np.int32),
    }


def _pack(
    ds: grain.IterDataset, seq_len: int, num_bins: int, seed: int, shuffle_bins: bool
) -> grain.IterDataset:
    length = {name: seq_len for name in _PACKED}
    packed = grain.experimental.FirstFitPackIterDataset(
        ds, length_struct=length, num_packing_bins=num_bins, seed=seed, shuffle_bins=shuffle_bins
    )
    return packed.map(_rename_packed)


def make_train_iterator(
    *,
    mixture: str,
    seed: int,
    seq_len: int,
    batch_size: int,
    levels: Sequence[int],
    loss_on: str = "solution",
    vocab_name: str = "byte",
    process_index: int = 0,
    process_count: int = 1,
    examples_per_style: int = 100_000,
    num_workers: int = 0,
    read_threads: int = 4,
    packing_bins: int = 64,
    vocab_dir: str | None = None,
    omi1_print_share: float = 0.0,
    source: str = "synthetic",
    real_dir: str = "",
    real_skip: int = 0,
) -> grain.DatasetIterator:
    """An endless, checkpointable iterator of packed [batch_size, seq_len] pretraining batches.

    `batch_size` is this process's share of the global batch. Each style has its own source of
    `examples_per_style` training problems; the mixture's rates set how often each is drawn.
    `omi1_print_share`: see `generators.ends_in_print`.
    First-fit packing fills max(batch_size, packing_bins) rows at a time: more bins, denser rows
    (about 0.8 -> 0.84 real tokens per slot at seq_len 640, 0.85 -> 0.93 at 1024, levels 1-4).
    `num_workers` > 0 adds grain multiprocessing prefetch (needs absl flags parsed, as in main.py).
    `source="real"` reads the study's files instead (`pretrain_files`: each repeated as the
    mixture says, concatenated, shuffled; their first `real_skip` lines left out for validation).
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    rates = mixtures.get_mixture(mixture)
    vocabulary = vocab_lib.get_vocabulary(vocab_name, vocab_dir)
    if source == "real":
        files = pretrain_files.MixtureSource(mixture, real_dir, skip=real_skip)
        shard = grain.MapDataset.source(files)[process_index::process_count]
        ds = shard.shuffle(seed=generators.stable_hash("shuffle", seed, mixture) % 2**32).repeat()
    else:
        datasets = []
        for style in rates:
            problems = generators.ProblemSource(
                "train", seed, levels, examples_per_style, style, omi1_print_share
            )
            shard = grain.MapDataset.source(problems)[process_index::process_count]
            style_seed = generators.stable_hash("shuffle", seed, style) % 2**32
            datasets.append(shard.shuffle(seed=style_seed).repeat())
        ds = grain.MapDataset.mix(datasets, weights=list(rates.values()))
    ds = ds.map(Tokenize(vocabulary, seq_len, loss_on))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=256))
    ds = _pack(ds, seq_len, max(batch_size, packing_bins), seed=seed, shuffle_bins=True)
    ds = ds.batch(batch_size, drop_remainder=True)
    if num_workers > 0:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter(ds)


def make_eval_batches(
    *,
    style: str,
    split: str,
    seed: int,
    num_examples: int,
    seq_len: int,
    batch_size: int,
    levels: Sequence[int],
    loss_on: str = "solution",
    vocab_name: str = "byte",
    vocab_dir: str | None = None,
    omi1_print_share: float = 0.0,
    source: str = "synthetic",
    real_dir: str = "",
) -> list[dict[str, np.ndarray]]:
    """Deterministic packed batches of `num_examples` problems of one style, for per-style loss
    (`source="real"`: the first `num_examples` lines of the style's file).

    The last batch is filled up with all-padding rows (loss_mask 0), so every batch has one shape.
    """
    vocabulary = vocab_lib.get_vocabulary(vocab_name, vocab_dir)
    if source == "real":
        path = pretrain_files.style_file(real_dir, style)
        source = pretrain_files.JsonlSource(path, stop=num_examples)
    else:
        source = generators.ProblemSource(
            split, seed, levels, num_examples, style, omi1_print_share
        )
    ds = grain.MapDataset.source(source).map(Tokenize(vocabulary, seq_len, loss_on))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=64))
    rows = list(_pack(ds, seq_len, num_bins=batch_size, seed=seed, shuffle_bins=False))
    if not rows:
        return []
    num_pad = -len(rows) % batch_size
    rows += [{k: np.zeros_like(v) for k, v in rows[0].items()}] * num_pad
    return [
        {k: np.stack([r[k] for r in rows[i : i + batch_size]]) for k in FEATURES}
        for i in range(0, len(rows), batch_size)
    ]
