"""From impressions to arrays of text rows, and the grain iterator of training batches.

Every (item, source) text is one *row* of a feature table (row = source_index * N + item_index).
Batches carry row indices only; the model looks the features up on device. Histories keep the
last H clicks, left-padded (row 0 with mask 0), so the latest click sits at position H - 1.

Shapes: M impressions, H history length, C candidates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import grain
import numpy as np

from echo_jax.core.config import ConfigError
from echo_jax.recsys.data import Impression, RecDataset


@dataclasses.dataclass(frozen=True)
class TextRows:
    """The row layout of a dataset's texts: `sources[0]` is the human (HGC) source."""

    items: tuple[str, ...]
    sources: tuple[str, ...]

    def __post_init__(self):
        object.__setattr__(self, "_index", {item: i for i, item in enumerate(self.items)})

    def item_index(self, item: str) -> int:
        return self._index[item]

    def row(self, item: str, source_index: int) -> int:
        return source_index * len(self.items) + self._index[item]

    def texts(self, dataset: RecDataset) -> list[str]:
        """All texts in row order."""
        return [dataset.texts[src][item] for src in self.sources for item in self.items]


def swap_mask(num_rows: int, history_len: int, share: float, seed: int) -> np.ndarray:
    """`[M, H]` bool: which history slots show their AIGC text.

    Slot uniforms are fixed per seed and compared with `share`, so the swapped sets are nested
    as the share grows (a larger share only adds swaps): phase 2's curve is over one draw.
    """
    return np.random.default_rng(seed).random((num_rows, history_len)) < share


def encode_impressions(
    imps: Sequence[Impression],
    rows: TextRows,
    history_len: int,
    aigc_share: float = 0.0,
    swap_seed: int = 0,
) -> dict[str, np.ndarray]:
    """Arrays for training and evaluation (HGC candidates, histories swapped at `aigc_share`).

    history, history_mask: `[M, H]`; candidates, labels: `[M, C]` (HGC rows); paired: `[M, C, 2]`
    (the HGC and AIGC row of each candidate); positive: `[M]` HGC row of the clicked item;
    positive_item, history_items: catalogue indices, for accidental hits and full ranking.
    """
    m = len(imps)
    c = len(imps[0].candidates)
    out = {
        "history": np.zeros((m, history_len), np.int32),
        "history_mask": np.zeros((m, history_len), bool),
        "history_items": np.full((m, history_len), -1, np.int32),
        "candidates": np.zeros((m, c), np.int32),
        "paired": np.zeros((m, c, 2), np.int32),
        "labels": np.zeros((m, c), np.float32),
        "positive": np.zeros((m,), np.int32),
        "positive_item": np.zeros((m,), np.int32),
    }
    swapped = swap_mask(m, history_len, aigc_share, swap_seed)
    for r, imp in enumerate(imps):
        if len(imp.candidates) != c or len(imp.positives) != 1:
            raise ValueError(f"impression {imp.impression_id}: want {c} candidates, 1 positive")
        hist = imp.history[-history_len:]
        for j, item in enumerate(hist, start=history_len - len(hist)):
            out["history"][r, j] = rows.row(item, int(swapped[r, j]))
            out["history_mask"][r, j] = True
            out["history_items"][r, j] = rows.item_index(item)
        for j, (item, label) in enumerate(imp.candidates):
            out["candidates"][r, j] = rows.row(item, 0)
            out["paired"][r, j] = (rows.row(item, 0), rows.row(item, 1))
            out["labels"][r, j] = label
        (pos,) = imp.positives
        out["positive"][r] = rows.row(pos, 0)
        out["positive_item"][r] = rows.item_index(pos)
    return out


def positive_log_q(positive_item_M: np.ndarray, num_items: int) -> np.ndarray:
    """log of each item's share of the training positives (its in-batch sampling probability)."""
    counts = np.bincount(positive_item_M, minlength=num_items).astype(np.float64)
    return np.log(np.maximum(counts, 1.0) / len(positive_item_M)).astype(np.float32)


TRAIN_KEYS = ("history", "history_mask", "candidates", "labels", "positive", "positive_item")


def make_train_iterator(
    arrays: dict[str, np.ndarray],
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.DatasetIterator:
    """Endless, shuffled, checkpointable iterator of `batch_size` rows of this process's shard.

    Row indices are shuffled and batched as a `MapDataset` and the arrays gathered per batch:
    per-row dicts through grain's iterator batching cost ~50x more on CPU.
    """
    num_rows = len(arrays["positive"])
    if batch_size > num_rows // process_count:
        raise ConfigError(f"batch size {batch_size} exceeds the {num_rows} training impressions")
    train_arrays = {k: arrays[k] for k in TRAIN_KEYS}
    ds = grain.MapDataset.range(num_rows)[process_index::process_count]
    ds = ds.shuffle(seed=seed).repeat().batch(batch_size, drop_remainder=True)
    ds = ds.map(lambda rows: {k: v[rows] for k, v in train_arrays.items()})
    return iter(ds.to_iter_dataset())
