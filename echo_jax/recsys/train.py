"""The recommender's pure train step and its host-driven evaluation.

The item feature table (frozen text vectors, or token ids for the small tower) is a constant of
the step: batches carry row indices into it, so a frozen tower's vectors are never recomputed.

Shapes: B batch, H history, C candidates, R text rows, F item features, N catalogue items.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from echo_jax.core.config import ConfigError
from echo_jax.core.train_state import TrainState
from echo_jax.recsys import debias as debiasing
from echo_jax.recsys import losses, metrics
from echo_jax.recsys.model import Recommender
from echo_jax.recsys.pipeline import TRAIN_KEYS

LOSSES = ("impression", "in_batch")


def make_optimizer(lr: float, weight_decay: float) -> optax.GradientTransformation:
    """Adam with decoupled weight decay (the study: Adam, lr 1e-3, wd 1e-5)."""
    return optax.adamw(lr, weight_decay=weight_decay)


def make_init_state(
    model: Recommender,
    tx: optax.GradientTransformation,
    table_RxF: np.ndarray,
    history_len: int,
    num_candidates: int,
) -> Callable:
    """`rng -> TrainState` (parameters keep their logical-axis boxes for the loop)."""
    hist = jnp.zeros((1, history_len, *table_RxF.shape[1:]), table_RxF.dtype)
    cand = jnp.zeros((1, num_candidates, *table_RxF.shape[1:]), table_RxF.dtype)

    def init_state(rng: jax.Array) -> TrainState:
        variables = model.init(rng, hist, jnp.ones((1, history_len), bool), cand)
        params = variables.get("params", {})  # none: the mean encoder over frozen vectors
        return TrainState.create(params, tx)

    return init_state


def impression_loss(
    scores_BxC: jax.Array, labels_BxC: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The study's cross-entropy over each impression's candidates, and the top-1 accuracy."""
    ce = losses.impression_cross_entropy(scores_BxC, labels_BxC)
    hit = jnp.argmax(scores_BxC, -1) == jnp.argmax(labels_BxC, -1)
    return ce, {"loss": ce, "accuracy": hit.mean()}


def make_train_step(
    model: Recommender,
    tx: optax.GradientTransformation,
    table_RxF: np.ndarray,
    loss: str,
    log_q_N: np.ndarray,
    debias: debiasing.Debias = debiasing.Debias(),  # noqa: B008  (frozen: a constant)
    rewrite_R: np.ndarray | None = None,
    negatives: int = 0,
) -> Callable:
    """`(state, batch, rng) -> (state, metrics)` for the impression or the in-batch loss.

    With `debias.enabled` the impression loss gets the black-box debiasing penalty; `rewrite_R`
    maps each text row to its rewrite's row. Disabled, the step is exactly the plain one.
    `negatives` > 0 scores the positive against that many of each row's shown negatives, drawn
    afresh every step (the study: one); 0 against all of them.
    """
    if loss not in LOSSES:
        raise ConfigError(f"train.loss {loss!r} not in {LOSSES}")
    if debias.enabled and (loss != "impression" or rewrite_R is None):
        raise ConfigError("the debiaser needs train.loss='impression' and the rewrite rows")
    table = jnp.asarray(table_RxF)
    log_q = jnp.asarray(log_q_N)

    def debiased_loss(params, batch, rng):
        variables = {"params": params}
        drop_rng, swap_rng = jax.random.split(rng)
        rngs = {"dropout": drop_rng}
        rewrite = jnp.asarray(rewrite_R)
        feats = lambda rows: table[rows]  # noqa: E731

        def user(history):
            return model.apply(
                variables,
                feats(history),
                batch["history_mask"],
                False,
                rngs=rngs,
                method=Recommender.encode_user,
            )[:, -1]

        def items(rows_BxC):
            b, c = rows_BxC.shape
            flat = model.apply(
                variables,
                feats(rows_BxC.reshape(b * c)),
                False,
                rngs=rngs,
                method=Recommender.encode_items,
            )
            return flat.reshape(b, c, -1)

        score = lambda u, v: jnp.einsum("bd,bcd->bc", u, v)  # noqa: E731
        user_BxD = user(batch["history"])
        perturbed_BxD = user(
            debiasing.perturb_history(swap_rng, batch["history"], rewrite, debias.rewrite_prob)
        )
        cand_BxCxD = items(batch["candidates"])
        scores_BxC = score(user_BxD, cand_BxCxD)
        extra, parts = debiasing.penalty(
            scores_BxC,
            score(user_BxD, items(rewrite[batch["candidates"]])),
            score(perturbed_BxD, cand_BxCxD),
            user_BxD,
            perturbed_BxD,
            debias,
        )
        ce, ce_metrics = impression_loss(scores_BxC, batch["labels"])
        return ce + extra, {**ce_metrics, "loss": ce + extra, "ce": ce, **parts}

    def loss_fn(params, batch, rng):
        if debias.enabled:
            return debiased_loss(params, batch, rng)
        variables, rngs = {"params": params}, {"dropout": rng}
        feats = lambda rows: table[rows]  # noqa: E731
        if loss == "impression":
            scores_BxC = model.apply(
                variables,
                feats(batch["history"]),
                batch["history_mask"],
                feats(batch["candidates"]),
                False,
                rngs=rngs,
            )
            return impression_loss(scores_BxC, batch["labels"])
        user_BxD = model.apply(
            variables,
            feats(batch["history"]),
            batch["history_mask"],
            False,
            rngs=rngs,
            method=Recommender.encode_user,
        )[:, -1]
        item_BxD = model.apply(
            variables, feats(batch["positive"]), False, rngs=rngs, method=Recommender.encode_items
        )
        item = batch["positive_item"]
        ce = losses.in_batch_softmax(user_BxD, item_BxD, item, log_q[item])
        return ce, {"loss": ce}

    def train_step(state: TrainState, batch: dict, rng: jax.Array):
        rng = jax.random.fold_in(rng, state.step)
        batch = {k: batch[k] for k in TRAIN_KEYS}
        if negatives:
            rng, pick = jax.random.split(rng)
            batch = sample_negatives(pick, batch, negatives)
        grads, step_metrics = jax.grad(loss_fn, has_aux=True)(state.params, batch, rng)
        step_metrics["grad_norm"] = optax.tree.norm(grads)
        return state.apply_gradients(grads, tx), step_metrics

    return train_step


def sample_negatives(rng: jax.Array, batch: dict, k: int) -> dict:
    """`batch` with `candidates` and `labels` cut to [positive, k negatives drawn without
    replacement from the row's others], the positive first."""
    labels_BxC = batch["labels"]
    keys = jax.random.uniform(rng, labels_BxC.shape) - 2.0 * labels_BxC  # the positive sorts first
    order = jnp.argsort(keys, axis=-1)[:, : k + 1]
    return {
        **batch,
        "candidates": jnp.take_along_axis(batch["candidates"], order, axis=-1),
        "labels": jnp.take_along_axis(labels_BxC, order, axis=-1),
    }


class Scorer:
    """Jitted inference: item vectors for every text row, user vectors for histories."""

    def __init__(self, model: Recommender, table_RxF: np.ndarray, batch_size: int = 512):
        self.table = jnp.asarray(table_RxF)
        self.batch_size = batch_size
        self._items = jax.jit(
            lambda p, f: model.apply({"params": p}, f, method=Recommender.encode_items)
        )
        self._users = jax.jit(
            lambda p, h, m: model.apply({"params": p}, h, m, method=Recommender.encode_user)[:, -1]
        )

    def item_vectors(self, params: Any) -> np.ndarray:
        """`[R, D]` for every row of the table."""
        return np.concatenate(
            [
                np.asarray(self._items(params, self.table[s : s + self.batch_size]))
                for s in range(0, len(self.table), self.batch_size)
            ]
        )

    def user_vectors(
        self, params: Any, history_MxH: np.ndarray, mask_MxH: np.ndarray
    ) -> np.ndarray:
        out = []
        for s in range(0, len(history_MxH), self.batch_size):
            rows, mask = history_MxH[s : s + self.batch_size], mask_MxH[s : s + self.batch_size]
            pad = self.batch_size - len(rows)  # one shape, one compile
            rows = np.pad(rows, ((0, pad), (0, 0)))
            mask = np.pad(mask, ((0, pad), (0, 0)), constant_values=True)
            out.append(np.asarray(self._users(params, self.table[rows], mask))[: len(rows) - pad])
        return np.concatenate(out)


def evaluate_arrays(
    users_MxD: np.ndarray, items_RxD: np.ndarray, arrays: dict[str, np.ndarray], num_items: int
) -> dict[str, float]:
    """All evaluation metrics from user and item vectors.

    `eval/*`: the impression lists as shown (HGC copies); `eval/full/*`: the positive against
    every HGC item in the catalogue, history excluded; `bias/*`: the paired lists (every
    candidate once per source), Human- vs LLM-Target; `exposure/*`: each user's top 10 of the
    whole paired catalogue (AIGC share, coverage, Gini of exposure).
    """

    def scores(rows):
        return np.einsum("md,m...d->m...", users_MxD, items_RxD[rows])

    out = {
        f"eval/{k}": v
        for k, v in metrics.ranking_metrics(scores(arrays["candidates"]), arrays["labels"]).items()
    }
    hist = arrays["history_items"]
    exclude = np.zeros((len(hist), num_items), bool)
    rows = np.repeat(np.arange(len(hist)), hist.shape[1])
    keep = hist.ravel() >= 0
    exclude[rows[keep], hist.ravel()[keep]] = True
    full = metrics.full_ranking(
        users_MxD @ items_RxD[:num_items].T, arrays["positive_item"], exclude
    )
    out.update({f"eval/full/{k}": v for k, v in full.items()})
    if len(items_RxD) >= 2 * num_items:
        shown = metrics.exposure(users_MxD @ items_RxD[: 2 * num_items].T, exclude, num_items)
        out.update({f"exposure/{k}": v for k, v in shown.items()})
    bias = metrics.source_bias(scores(arrays["paired"]), arrays["labels"])
    out.update({f"bias/{k}": v for k, v in bias.items()})
    return out


def make_evaluate(scorer: Scorer, arrays: dict[str, np.ndarray], num_items: int) -> Callable:
    """`state -> {metric: value}` on the evaluation impressions."""

    def evaluate(state: TrainState) -> dict[str, float]:
        items = scorer.item_vectors(state.params)
        users = scorer.user_vectors(state.params, arrays["history"], arrays["history_mask"])
        return evaluate_arrays(users, items, arrays, num_items)

    return evaluate
