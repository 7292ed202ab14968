"""Ranking metrics on impression lists and the source-bias measures of the study.

Shapes: N lists, C candidates per list, I catalogue items. Gains are binary, as in the study's
code (`Rec_SourceBias/src/metrics.py`): NDCG@k = DCG@k / IDCG@k with 1 / log2(rank + 1) discounts,
MAP@k = sum_{i<=k} P@i * rel_i / #relevant, Recall@k = hits in the top k / #relevant, Hit@k = 1
when any relevant item is in the top k, MRR@k = 1 / rank of the first relevant item in the top k
(0 beyond; RecBole's definitions). Ties are broken by a fixed random order, so no position or
source wins ties systematically.

Source bias: every candidate appears twice (HGC copy, AIGC copy). *Human-Target* counts only the
HGC copy of the positive as relevant, *LLM-Target* only the AIGC copy;
RelaDelta = (M_HGC - M_AIGC) / ((M_HGC + M_AIGC) / 2) * 100 (negative = AIGC preferred).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

KS = (1, 3, 5, 10)


def rank_order(scores_NxC: np.ndarray, seed: int = 0) -> np.ndarray:
    """Column indices sorted by descending score per row; ties in a seeded random order."""
    scores_NxC = np.asarray(scores_NxC, np.float64)
    tiebreak = np.random.default_rng(seed).random(scores_NxC.shape)
    return np.lexsort((tiebreak, -scores_NxC), axis=-1)


def _sorted_labels(scores_NxC: np.ndarray, labels_NxC: np.ndarray) -> np.ndarray:
    return np.take_along_axis(np.asarray(labels_NxC, np.float64), rank_order(scores_NxC), axis=-1)


def ndcg_at_k(scores_NxC: np.ndarray, labels_NxC: np.ndarray, k: int) -> float:
    """Mean NDCG@k over the lists (every list must hold at least one relevant item)."""
    rel = _sorted_labels(scores_NxC, labels_NxC)[:, :k]
    discounts = 1.0 / np.log2(np.arange(2, rel.shape[1] + 2))
    num_rel = np.asarray(labels_NxC).sum(-1)
    ideal = np.array([discounts[: int(min(n, k))].sum() for n in num_rel])
    return float(np.mean((rel * discounts).sum(-1) / ideal))


def map_at_k(scores_NxC: np.ndarray, labels_NxC: np.ndarray, k: int) -> float:
    """Mean AP@k over the lists; with one relevant item this is 1 / rank if rank <= k, else 0."""
    rel = _sorted_labels(scores_NxC, labels_NxC)[:, :k]
    precision = np.cumsum(rel, axis=-1) / np.arange(1, rel.shape[1] + 1)
    return float(np.mean((precision * rel).sum(-1) / np.asarray(labels_NxC).sum(-1)))


def recall_at_k(scores_NxC: np.ndarray, labels_NxC: np.ndarray, k: int) -> float:
    rel = _sorted_labels(scores_NxC, labels_NxC)[:, :k]
    return float(np.mean(rel.sum(-1) / np.asarray(labels_NxC).sum(-1)))


def hit_and_mrr_at_k(scores_NxC: np.ndarray, labels_NxC: np.ndarray, k: int) -> tuple[float, float]:
    """(Hit@k, MRR@k), means over the lists."""
    rel = _sorted_labels(scores_NxC, labels_NxC)[:, :k] > 0
    first = np.argmax(rel, axis=-1)
    hit = rel.any(-1)
    return float(hit.mean()), float(np.where(hit, 1.0 / (first + 1), 0.0).mean())


def ranking_metrics(
    scores_NxC: np.ndarray, labels_NxC: np.ndarray, ks: Sequence[int] = KS
) -> dict[str, float]:
    """NDCG, MAP, Recall, Hit and MRR at every k in `ks` that the list length allows."""
    out = {}
    for k in (k for k in ks if k <= scores_NxC.shape[-1]):
        out[f"ndcg@{k}"] = ndcg_at_k(scores_NxC, labels_NxC, k)
        out[f"map@{k}"] = map_at_k(scores_NxC, labels_NxC, k)
        out[f"recall@{k}"] = recall_at_k(scores_NxC, labels_NxC, k)
        out[f"hit@{k}"], out[f"mrr@{k}"] = hit_and_mrr_at_k(scores_NxC, labels_NxC, k)
    return out


def gini(counts: np.ndarray) -> float:
    """Gini index of non-negative counts: 0 when all equal, (n - 1) / n when one item has all."""
    x = np.sort(np.asarray(counts, np.float64))
    n, total = len(x), x.sum()
    if n == 0 or total == 0:
        return 0.0
    return float((2 * np.arange(1, n + 1) - n - 1) @ x / (n * total))


def exposure(
    scores_NxR: np.ndarray, exclude_NxI: np.ndarray, num_items: int, k: int = 10
) -> dict[str, float]:
    """What users are shown when each gets the top k of the whole paired catalogue (rows [0, I)
    the HGC copies, [I, 2I) the AIGC copies; both copies of the `exclude_NxI` items left out):
    the AIGC share of those k slots, catalogue coverage@k (items shown to anyone, either copy,
    over I) and the Gini index of item exposure@k (0: every item shown equally often)."""
    scores = np.asarray(scores_NxR, np.float64)[:, : 2 * num_items].copy()
    exclude = np.asarray(exclude_NxI, bool)
    scores[np.concatenate([exclude, exclude], axis=1)] = -np.inf
    top = rank_order(scores)[:, :k]
    items = top % num_items
    shown = np.bincount(items.ravel(), minlength=num_items)
    return {
        f"aigc_share@{k}": float((top >= num_items).mean()),
        f"coverage@{k}": float((shown > 0).mean()),
        f"gini@{k}": gini(shown),
    }


def rela_delta(m_hgc: float, m_aigc: float) -> float:
    """Relative difference in percent; negative when the AIGC copy is ranked better."""
    mean = (m_hgc + m_aigc) / 2
    return 0.0 if mean == 0 else (m_hgc - m_aigc) / mean * 100.0


def source_bias(
    scores_NxCx2: np.ndarray, labels_NxC: np.ndarray, ks: Sequence[int] = KS
) -> dict[str, float]:
    """Human- and LLM-Target metrics, their RelaDelta, and `llm_ratio` over paired lists.

    `scores_NxCx2[..., 0]` scores the HGC copy of each candidate, `[..., 1]` its AIGC copy; the
    ranked list is all 2C copies. `llm_ratio` is the share of positives whose AIGC copy scores
    strictly higher than their HGC copy (`ties` reports exact ties separately);
    `llm_ratio_ties_half` counts a tie as half a win, so identical copies give exactly 0.5.
    """
    scores_NxCx2 = np.asarray(scores_NxCx2)
    labels_NxC = np.asarray(labels_NxC)
    if scores_NxCx2.shape != (*labels_NxC.shape, 2):
        raise ValueError(f"scores {scores_NxCx2.shape} do not pair labels {labels_NxC.shape}")
    flat = scores_NxCx2.reshape(len(scores_NxCx2), -1)
    human = ranking_metrics(flat, (labels_NxC[..., None] * [1, 0]).reshape(flat.shape), ks)
    llm = ranking_metrics(flat, (labels_NxC[..., None] * [0, 1]).reshape(flat.shape), ks)
    pos = labels_NxC.astype(bool)
    diff = scores_NxCx2[..., 1][pos] - scores_NxCx2[..., 0][pos]
    wins, ties = float((diff > 0).mean()), float((diff == 0).mean())
    out = {"llm_ratio": wins, "ties": ties, "llm_ratio_ties_half": wins + ties / 2}
    for name, value in human.items():
        out[f"human/{name}"] = value
        out[f"llm/{name}"] = llm[name]
        out[f"rela_delta/{name}"] = rela_delta(value, llm[name])
    return out


def full_ranking(
    scores_NxI: np.ndarray, positive_N: np.ndarray, exclude_NxI: np.ndarray, k: int = 10
) -> dict[str, float]:
    """Recall@k and NDCG@k of one positive per row against the whole catalogue.

    `exclude_NxI` marks items that must not be recommended (the user's history); the positive is
    never excluded. Ties count against the positive (pessimistic rank).
    """
    scores_NxI = np.asarray(scores_NxI, np.float64)
    rows = np.arange(len(scores_NxI))
    pos_score = scores_NxI[rows, positive_N]
    exclude = np.asarray(exclude_NxI, bool).copy()
    exclude[rows, positive_N] = False
    above = ((scores_NxI >= pos_score[:, None]) & ~exclude).sum(-1)  # includes the positive
    hit = above <= k
    return {
        f"recall@{k}": float(hit.mean()),
        f"ndcg@{k}": float(np.where(hit, 1.0 / np.log2(above + 1), 0.0).mean()),
    }
