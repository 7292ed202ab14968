"""Ranking and source-bias metrics against hand-computed values."""

import numpy as np
import pytest

from echo_jax.recsys import metrics


def test_ranking_metrics_by_hand():
    scores = np.array([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.6, 0.1]])
    labels = np.array([[0, 0, 1, 0], [1, 0, 1, 0]])  # row 0: rank 2; row 1: ranks 2 and 3
    d = 1 / np.log2([2, 3, 4])
    ndcg3 = [d[1] / d[0], (d[1] + d[2]) / (d[0] + d[1])]
    assert metrics.ndcg_at_k(scores, labels, 3) == pytest.approx(np.mean(ndcg3))
    assert metrics.ndcg_at_k(scores, labels, 1) == 0.0
    ap3 = [1 / 2, (1 / 2 + 2 / 3) / 2]
    assert metrics.map_at_k(scores, labels, 3) == pytest.approx(np.mean(ap3))
    assert metrics.recall_at_k(scores, labels, 2) == pytest.approx(np.mean([1, 0.5]))
    out = metrics.ranking_metrics(scores, labels, ks=(1, 3, 5))
    assert "ndcg@5" not in out and out["recall@3"] == 1.0


def test_ties_are_broken_without_favouring_the_first_column():
    n = 2000
    labels = np.zeros((n, 2))
    labels[:, 0] = 1
    share_first = metrics.recall_at_k(np.zeros((n, 2)), labels, 1)
    assert 0.45 < share_first < 0.55


def test_source_bias_on_paired_lists_by_hand():
    # two lists of 2 candidates x (HGC, AIGC); positives: candidate 0 in list 0, 1 in list 1
    scores = np.array(
        [
            [[0.5, 0.9], [0.1, 0.2]],  # AIGC copy of the positive ranks 1st
            [[0.3, 0.0], [0.8, 0.4]],
        ]
    )  # HGC copy ranks 1st
    labels = np.array([[1, 0], [0, 1]])
    out = metrics.source_bias(scores, labels, ks=(1, 3))
    assert out["llm_ratio"] == 0.5 and out["ties"] == 0.0
    assert out["human/ndcg@1"] == 0.5 and out["llm/ndcg@1"] == 0.5
    # list 0: HGC copy at rank 2; list 1: AIGC copy at rank 2
    assert out["human/map@3"] == pytest.approx((1 / 2 + 1) / 2)
    assert out["rela_delta/ndcg@1"] == 0.0


def test_rela_delta_sign():
    assert metrics.rela_delta(0.4, 0.6) == pytest.approx(-40.0)  # AIGC preferred: negative
    assert metrics.rela_delta(0.6, 0.4) == pytest.approx(40.0)
    assert metrics.rela_delta(0.0, 0.0) == 0.0


def test_full_ranking_excludes_history_and_counts_ties_against_the_positive():
    scores = np.array([[0.9, 0.5, 0.7, 0.1], [0.2, 0.2, 0.2, 0.2]])
    exclude = np.array([[True, False, False, False], [False] * 4])
    out = metrics.full_ranking(scores, np.array([1, 3]), exclude, k=2)
    # row 0: item 0 excluded, item 2 above -> rank 2; row 1: 4-way tie -> rank 4
    assert out["recall@2"] == 0.5
    assert out["ndcg@2"] == pytest.approx(0.5 / np.log2(3))


def test_hit_and_mrr_by_hand():
    scores = np.array([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.6, 0.1], [0.9, 0.8, 0.7, 0.1]])
    labels = np.array([[0, 0, 1, 0], [1, 0, 1, 0], [0, 0, 0, 1]])  # first relevant: ranks 2, 2, 4
    out = metrics.ranking_metrics(scores, labels, ks=(1, 3))
    assert out["hit@1"] == 0.0 and out["mrr@1"] == 0.0
    assert out["hit@3"] == pytest.approx(2 / 3)
    assert out["mrr@3"] == pytest.approx((1 / 2 + 1 / 2 + 0) / 3)


def test_gini_and_exposure_of_the_paired_catalogue_by_hand():
    assert metrics.gini(np.array([3, 3, 3])) == 0.0
    assert metrics.gini(np.array([0, 0, 6])) == pytest.approx(2 / 3)
    # 3 items: rows 0-2 HGC, rows 3-5 AIGC; user 0 has item 0 in its history
    scores = np.array([[9.0, 1.0, 2.0, 8.0, 5.0, 3.0], [1.0, 2.0, 3.0, 6.0, 5.0, 4.0]])
    exclude = np.array([[True, False, False], [False, False, False]])
    out = metrics.exposure(scores, exclude, num_items=3, k=2)
    # user 0: rows 4 (AIGC item 1), 5 (AIGC item 2); user 1: rows 3, 4 (AIGC items 0, 1)
    assert out["aigc_share@2"] == 1.0
    assert out["coverage@2"] == 1.0
    assert out["gini@2"] == pytest.approx(metrics.gini(np.array([1, 2, 1])))
