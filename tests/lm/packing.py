"""Packed test rows as the pipeline makes them, for the attention tests."""

import numpy as np


def ragged_packed(batch: int, length: int, seed: int, vocab: int = 64, shuffled: bool = False):
    """(tokens, positions, segment ids), each [batch, length]: rows of 1-4 examples of random
    lengths, each ending in up to 5 padding tokens (fewer in short rows); the last row is all
    padding (as the pipeline's last batch). `shuffled` permutes each row's tokens, so examples
    interleave and positions do not increase."""
    rng = np.random.default_rng(seed)
    positions, segments = np.zeros((2, batch, length), np.int32)
    for row in range(batch - 1):
        real = length - rng.integers(0, min(6, length // 2))
        cuts = np.sort(
            rng.choice(np.arange(1, real), min(rng.integers(0, 4), real - 1), replace=False)
        )
        for seg, (start, end) in enumerate(zip([0, *cuts], [*cuts, real]), 1):
            positions[row, start:end], segments[row, start:end] = np.arange(end - start), seg
        if shuffled:
            order = rng.permutation(length)
            positions[row], segments[row] = positions[row, order], segments[row, order]
    return rng.integers(0, vocab, (batch, length)).astype(np.int32), positions, segments
