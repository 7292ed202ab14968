"""Phase 3 of the source-bias study: the user / data / recommender feedback loop.

Iteration 0 is the HGC-dominant start: the recommender trains on the first training half
(`train1`) as logged, every text human-written. Each later iteration t works on half t % 2:

1. the users' history items show their AIGC text with probability a_{t-1}, the previous
   iteration's AIGC click share (a_0 = 0);
2. the recommender of iteration t-1 ranks each impression's list holding both copies of every
   candidate, and the simulated user clicks the top-ranked copy of the relevant item (with
   `click_eta > 0` a copy drawn with probability proportional to rank^-eta, the study's
   position-biased option); a_t is the share of AIGC clicks;
3. these clicks, with their source, are iteration t's training data: the clicked copy as the
   positive against negatives drawn from the other copies of the list, and the histories of
   step 1. The recommender is re-initialised and retrained on them. (The study's code trains on
   human-text histories and uses the swapped ones only to compute the clicking users; here the
   AIGC share of histories enters the training data too, as the loop's premise says);

   The study's choices are options beside ours: `loop.init="same"` resets every iteration to
   the same initial weights (ours, "new": a new seed per iteration), `loop.train_histories=
   "human"` trains on the unswapped histories (ours, "swapped"), `loop.click_epochs=3` draws
   the clicks anew for each of 3 epochs (the training data hold each draw; ours, 1; with
   `click_eta` 0 every draw clicks the top-ranked copy, so only the negatives differ), and
   `train.negatives=1` scores the clicked copy against one of the other copies;
4. the dev split, its histories swapped at a_t, measures source bias and accuracy.

Every interaction keeps its provenance: iteration t's training arrays, with the source of every
history item and candidate and the list the user was shown, are saved in
`seed<s>/iter<t>/interactions.npz` right after iteration t-1 finishes, so a resumed loop never
needs an earlier model again. Each iteration trains through the shared loop (Orbax checkpoints,
resumable mid-training) and is done once its `record.json` exists; `seed<s>/metrics.jsonl` holds
one object per finished iteration, `seed<s>/loop_settings.json` the settings a rerun must match.
"""

from __future__ import annotations

import functools
import json
import os
import sys

import jax
import ml_collections
import numpy as np

from echo_jax.core import rng, sharding
from echo_jax.core.config import ConfigError
from echo_jax.core.stages import check_workdir, run_stage
from echo_jax.core.train_loop import LoopConfig, train
from echo_jax.core.train_state import TrainState
from echo_jax.core.workdir import RESUME_MAY_CHANGE
from echo_jax.recsys.jobs.train import (
    Prepared,
    build_task,
    feature_table,
    load_dataset,
    model_config,
)
from echo_jax.recsys.model import Recommender
from echo_jax.recsys.pipeline import encode_impressions
from echo_jax.recsys.train import Scorer

HALVES = ("train1", "train2")
UNDEBIASED = "undebiased"
# training arrays, plus the list the user was shown (both copies of each candidate) and its labels
INTERACTION_KEYS = (
    "history",
    "history_mask",
    "history_items",
    "candidates",
    "labels",
    "positive",
    "positive_item",
    "paired",
    "shown_labels",
)


def swap_histories(
    arrays: dict[str, np.ndarray], share: float, num_items: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Copy of `arrays` whose real history items show their AIGC text with probability `share`.

    `arrays["history"]` must hold HGC rows (row = item index); AIGC rows are `item + N`.
    """
    swap = (rng.random(arrays["history"].shape) < share) & arrays["history_mask"]
    return {**arrays, "history": arrays["history"] + swap.astype(np.int32) * num_items}


def click_ranks(
    scores_MxCx2: np.ndarray, labels_MxC: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """`[M, 2]` 0-based rank of the positive's HGC and AIGC copy among all 2C copies (ties in a
    random order)."""
    m = len(scores_MxCx2)
    flat = scores_MxCx2.reshape(m, -1)
    order = np.lexsort((rng.random(flat.shape), -flat), axis=-1)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(flat.shape[1])[None].repeat(m, 0), axis=-1)
    positive = np.argmax(labels_MxC, axis=-1)
    return rank.reshape(scores_MxCx2.shape)[np.arange(m), positive]


def simulate_clicks(
    scores_MxCx2: np.ndarray, labels_MxC: np.ndarray, eta: float, rng: np.random.Generator
) -> np.ndarray:
    """`[M]` source clicked (0 HGC, 1 AIGC): the better-ranked copy of the relevant item, or with
    `eta > 0` one of its two copies with probability proportional to (rank + 1)^-eta."""
    ranks = click_ranks(scores_MxCx2, labels_MxC, rng)
    if eta <= 0:
        return (ranks[:, 1] < ranks[:, 0]).astype(np.int32)
    weight = (ranks + 1.0) ** -eta
    return (rng.random(len(ranks)) < weight[:, 1] / weight.sum(-1)).astype(np.int32)


def clicked_impressions(
    arrays: dict[str, np.ndarray], clicked_M: np.ndarray, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Training impressions from clicks: the clicked copy of the positive against C - 1
    negatives drawn from the other 2C - 1 copies of the list (the other copy of the positive
    included), in a random order."""
    m, c = arrays["labels"].shape
    copies = arrays["paired"].reshape(m, 2 * c)
    clicked_slot = 2 * np.argmax(arrays["labels"], axis=-1) + clicked_M
    out = {
        **arrays,
        "candidates": np.zeros((m, c), np.int32),
        "labels": np.zeros((m, c), np.float32),
    }
    for r in range(m):
        others = np.delete(np.arange(2 * c), clicked_slot[r])
        slots = np.concatenate([[clicked_slot[r]], rng.choice(others, c - 1, replace=False)])
        order = rng.permutation(c)
        out["candidates"][r] = copies[r, slots[order]]
        out["labels"][r] = order == 0
    out["positive"] = copies[np.arange(m), clicked_slot].astype(np.int32)
    return out


def source_of(rows: np.ndarray, num_items: int) -> np.ndarray:
    """The source index (0 HGC, 1 AIGC, 2 rewrite) of text rows."""
    return (rows // num_items).astype(np.int8)


class LoopData:
    """What every iteration of one loop shares: text rows, features, the halves and dev arrays."""

    def __init__(self, config: ml_collections.ConfigDict, cache_dir: str):
        d = config.data
        ds, self.rows = load_dataset(d, with_rewrite=True)
        self.table, vocab_size = feature_table(config, ds, self.rows, cache_dir)
        self.model = Recommender(model_config(config, vocab_size))
        self.num_items = len(self.rows.items)
        self.halves = [encode_impressions(ds.splits[h], self.rows, d.history_len) for h in HALVES]
        for half in self.halves:
            half["shown_labels"] = half["labels"]
        self.dev = encode_impressions(ds.splits[d.eval_split], self.rows, d.history_len)
        self.texts = self.rows.texts(ds)

    def prepared(self, train_arrays: dict, eval_arrays: dict) -> Prepared:
        return Prepared(self.rows, self.texts, self.table, self.model, train_arrays, eval_arrays)


def _save_interactions(path: str, arrays: dict, num_items: int, sources: tuple) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(
        tmp,
        **{k: arrays[k] for k in INTERACTION_KEYS},
        history_source=np.where(
            arrays["history_mask"], source_of(arrays["history"], num_items), -1
        ),
        candidate_source=source_of(arrays["candidates"], num_items),
        positive_source=source_of(arrays["positive"], num_items),
        source_names=np.asarray(sources),
    )
    os.replace(tmp, path)


def _load_interactions(path: str) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in INTERACTION_KEYS}


def _next_interactions(
    data: LoopData,
    state: TrainState,
    iteration: int,
    share: float,
    seed: int,
    loop: ml_collections.ConfigDict,
) -> dict[str, np.ndarray]:
    """Iteration `iteration`'s training data, clicked under the recommender `state` by users
    whose histories are swapped at `share` (trained on them, or on the human ones)."""
    logged = data.halves[iteration % 2]
    half = swap_histories(
        logged,
        share,
        data.num_items,
        rng.loop_stream(seed, iteration, rng.LoopPurpose.TRAIN_SWAP),
    )
    scorer = Scorer(data.model, data.table)
    users = scorer.user_vectors(state.params, half["history"], half["history_mask"])
    items = scorer.item_vectors(state.params)
    scores = np.einsum("md,mcsd->mcs", users, items[half["paired"]])
    trained_on = logged if loop.get("train_histories", "swapped") == "human" else half
    epochs = []
    for epoch in range(loop.get("click_epochs", 1)):
        stream = functools.partial(rng.loop_epoch_stream, seed, iteration, epoch=epoch)
        clicked = simulate_clicks(
            scores, half["labels"], loop.click_eta, stream(rng.LoopPurpose.CLICKS)
        )
        epochs.append(clicked_impressions(trained_on, clicked, stream(rng.LoopPurpose.NEGATIVES)))
    return {k: np.concatenate([e[k] for e in epochs]) for k in epochs[0]}


def iteration_record(iteration: int, arrays: dict, result: dict, num_items: int) -> dict:
    """The per-iteration metrics: click share in the data, source bias and accuracy on dev."""
    record = {
        "iteration": iteration,
        "half": HALVES[iteration % 2],
        "aigc_click_share": float(source_of(arrays["positive"], num_items).mean()),
        "history_aigc_share": float(
            source_of(arrays["history"], num_items)[arrays["history_mask"]].mean()
        ),
        "llm_ratio": result["bias/llm_ratio"],
        "ndcg@5": result["eval/ndcg@5"],
        "full/recall@10": result["eval/full/recall@10"],
        "hit@5": result["eval/hit@5"],
        "mrr@5": result["eval/mrr@5"],
        **{k: v for k, v in result.items() if k.startswith("exposure/")},
    }
    for metric in ("ndcg", "map"):
        for k in (1, 3, 5):
            name = f"{metric}@{k}"
            record[f"rela_delta_{name}"] = result[f"bias/rela_delta/{name}"]
            record[f"{name}/human_target"] = result[f"bias/human/{name}"]
            record[f"{name}/llm_target"] = result[f"bias/llm/{name}"]
    return record


def _write_metrics(path: str, records: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in records)
    os.replace(tmp, path)


# An iteration's training depends on its data and the model/train/debias blocks: a rerun may add
# iterations, seeds or phase-1/2 runs (`loop_settings.json` guards what the iterations share).
ITERATION_MAY_CHANGE = (*RESUME_MAY_CHANGE, "loop.*", "phases.*")


def check_settings(loop: ml_collections.ConfigDict) -> None:
    """Raises `ConfigError` for loop settings that cannot run."""
    if loop.iterations < 1 or loop.train_steps < 1:
        raise ConfigError(
            f"loop.iterations ({loop.iterations}) and loop.train_steps "
            f"({loop.train_steps}) must be >= 1"
        )
    if not loop.seeds:
        raise ConfigError("loop.seeds is empty")
    if loop.click_eta < 0:
        raise ConfigError(
            f"loop.click_eta must be >= 0 (0: no position bias), got {loop.click_eta}"
        )
    for key, values in STUDY_OPTIONS.items():
        if loop.get(key, values[0]) not in values:
            raise ConfigError(f"loop.{key} must be one of {values}, got {loop[key]!r}")
    if loop.get("click_epochs", 1) < 1:
        raise ConfigError(f"loop.click_epochs must be >= 1, got {loop.click_epochs}")


# the study's choices (module doc) and echo_jax's defaults; a loop's settings record them only
# when they differ, so loops run before they were options still resume
STUDY_OPTIONS = {"init": ("new", "same"), "train_histories": ("swapped", "human")}


def _settings(config: ml_collections.ConfigDict) -> dict:
    """What a loop's finished iterations depend on (not how many there are, nor the seeds)."""
    loop = {k: v for k, v in config.loop.to_dict().items() if k in ("train_steps", "click_eta")}
    defaults = {key: values[0] for key, values in STUDY_OPTIONS.items()} | {"click_epochs": 1}
    loop |= {k: config.loop[k] for k, v in defaults.items() if config.loop.get(k, v) != v}
    return json.loads(
        json.dumps(
            {
                "loop": loop,
                "debias": config.debias.to_dict(),
                "data": config.data.to_dict(),
                "model": config.model.to_dict(),
                "train": config.train.to_dict(),
            }
        )
    )


def run_seed(
    config: ml_collections.ConfigDict, data: LoopData, seed: int, workdir: str, label: str = "loop"
) -> list[dict]:
    """The whole loop for one seed in `workdir`; finished iterations are read, not rerun.

    Iteration t's data are computed at the end of iteration t - 1 (the last iteration computes
    those of the next one too, so a rerun with more iterations continues) and carried in memory;
    they are read back from `interactions.npz` only when a run resumes.
    """
    loop = config.loop
    check_settings(loop)
    check_workdir(workdir, _settings(config), filename="loop_settings.json", what="a loop run")
    mesh = sharding.make_mesh(config.mesh.to_dict())
    sub = ml_collections.ConfigDict(config.to_dict())
    sub.seed = seed
    sub.train.num_steps = loop.train_steps
    is_chief = jax.process_index() == 0
    records: list[dict] = []
    arrays = data.halves[0]

    def iteration(t: int, iter_dir: str) -> dict:
        nonlocal arrays
        if arrays is None:  # resumed: this iteration's data were saved by the previous one
            arrays = _load_interactions(os.path.join(iter_dir, "interactions.npz"))
        elif t == 0 and is_chief:
            _save_interactions(
                os.path.join(iter_dir, "interactions.npz"),
                arrays,
                data.num_items,
                data.rows.sources,
            )
        click_share = float(source_of(arrays["positive"], data.num_items).mean())
        dev = swap_histories(
            data.dev,
            click_share,
            data.num_items,
            rng.loop_stream(seed, t, rng.LoopPurpose.DEV_SWAP),
        )
        task, evaluate = build_task(sub, mesh, data.prepared(arrays, dev))
        state = train(
            task,
            LoopConfig.from_config(sub.train),
            mesh,
            sub.sharding.rules,
            iter_dir,
            rng.loop_train_seed(seed, t if loop.get("init", "new") == "new" else 0),
            config=sub,
            label=f"{label} iter {t}",
            may_change=ITERATION_MAY_CHANGE,
        )
        record = iteration_record(t, arrays, evaluate(state), data.num_items)
        arrays = _next_interactions(data, state, t + 1, click_share, seed, loop)
        if is_chief:  # before the record that marks iteration t finished
            _save_interactions(
                os.path.join(workdir, f"iter{t + 1:02d}", "interactions.npz"),
                arrays,
                data.num_items,
                data.rows.sources,
            )
        print(
            f"[{label}] iteration {t}: AIGC click share {record['aigc_click_share']:.3f}, "
            f"llm_ratio {record['llm_ratio']:.3f}, RelaΔ NDCG@5 "
            f"{record['rela_delta_ndcg@5']:.1f} %, NDCG@5 (dev) {record['ndcg@5']:.3f}, "
            f"history AIGC share {record['history_aigc_share']:.3f}",
            file=sys.stderr,
        )
        return record

    for t in range(loop.iterations + 1):
        iter_dir = os.path.join(workdir, f"iter{t:02d}")
        stage = run_stage(
            functools.partial(iteration, t, iter_dir),
            label=label,
            index=t + 1,
            total=loop.iterations + 1,
            name=f"iteration {t}",
            result_file=os.path.join(iter_dir, "record.json"),
        )
        records.append(stage.result)
        if stage.skipped:
            arrays = None
        elif is_chief:
            _write_metrics(os.path.join(workdir, "metrics.jsonl"), records)
    return records


def run_arm(
    config: ml_collections.ConfigDict, workdir: str, data: LoopData, label: str = "loop"
) -> dict[int, list[dict]]:
    """Every seed of one loop (the debiaser as `config.debias` says): seed -> records."""
    return {
        s: run_seed(config, data, s, os.path.join(workdir, f"seed{s}"), f"{label} seed {s}")
        for s in config.loop.seeds
    }


def arm_name(debias: ml_collections.ConfigDict) -> str:
    """The arm's directory and label: `undebiased`, or the debiaser's alpha and beta."""
    return (
        f"debiased-a{debias.alpha:g}-b{debias.beta:g}"
        if debias.alpha or debias.beta
        else UNDEBIASED
    )
