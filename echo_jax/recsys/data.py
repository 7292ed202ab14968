"""MIND-format recommender data: behaviors/text loaders, text hygiene and the Beauty-637 set.

The released Amazon-Beauty data has human-written (HGC) descriptions for only 637 of its 9155 items
(``Amazon_Beauty_sample``), while every item has a Mistral-7B rewrite. ``build_beauty637`` therefore
restricts the full interaction logs to those 637 items so that every item exists in both sources.
"""

from __future__ import annotations

import csv
import html
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from echo_jax.core.config import ConfigError, MissingFileError
from echo_jax.core.files import DATA_ENV, data_dir

log = logging.getLogger(__name__)

HGC = "hgc"
MISTRAL = "Mistral-7B-Instruct-v0.2"
LLM_SOURCES = (MISTRAL, "gemini-pro", "gpt-3.5-turbo-0613", "llama")
REWRITE_SOURCE = "gpt-3.5-turbo-0613-rewrite"
ALL_SOURCES = (HGC, *LLM_SOURCES, REWRITE_SOURCE)
BEAUTY_SPLITS = {
    "train": "train/behaviors.tsv",
    "train1": "train/behaviors1.tsv",
    "train2": "train/behaviors2.tsv",
    "dev": "dev/behaviors.tsv",
}
NEWS_COLUMNS = 5  # id, category, subcategory, title, abstract


class ItemRef(NamedTuple):
    """One text copy of an item: the same item id can appear once per source in a candidate list."""

    item_id: str
    source: str


@dataclass(frozen=True)
class Impression:
    """One MIND behaviors row: clicked history and the shown candidates with click labels."""

    impression_id: str
    user: str
    timestamp: int
    history: tuple[str, ...]
    candidates: tuple[tuple[str, int], ...]

    @property
    def positives(self) -> tuple[str, ...]:
        return tuple(item for item, label in self.candidates if label == 1)


def paired_candidates(imp: Impression, sources: tuple[str, str]) -> list[tuple[ItemRef, int]]:
    """Candidate list holding every candidate once per source (the source-bias evaluation list)."""
    return [(ItemRef(item, src), label) for item, label in imp.candidates for src in sources]


@dataclass
class RecDataset:
    """Impressions per split, the item ids, their text per source, and how the set was built."""

    splits: dict[str, list[Impression]]
    items: list[str]
    texts: dict[str, dict[str, str]]
    counts: dict = field(default_factory=dict)


@dataclass
class TextTable:
    """Item texts per source plus, per source, the requested items that have no (non-empty) text."""

    texts: dict[str, dict[str, str]]
    missing: dict[str, list[str]]


def clean_text(s: str) -> str:
    """Undo HTML entities and normalise whitespace: such surface tells can leak the text source."""
    return " ".join(html.unescape(s).split())


def _parse_behaviors_row(fields: list[str], where: str) -> Impression:
    if len(fields) != 5:
        raise ConfigError(f"{where}: expected 5 tab-separated fields, got {len(fields)}")
    imp_id, user, ts, history, impressions = fields
    candidates = []
    for token in impressions.split():
        item, sep, label = token.rpartition("-")
        if not sep or not item or label not in ("0", "1"):
            raise ConfigError(f"{where}: malformed candidate {token!r} (want ITEM-0 or ITEM-1)")
        candidates.append((item, int(label)))
    try:
        timestamp = int(ts)
    except ValueError:
        raise ConfigError(f"{where}: timestamp {ts!r} is not an integer") from None
    if not imp_id or not user or not candidates:
        raise ConfigError(f"{where}: empty impression id, user or candidate list")
    return Impression(imp_id, user, timestamp, tuple(history.split()), tuple(candidates))


def read_behaviors(path: str | os.PathLike) -> list[Impression]:
    """Read a MIND ``behaviors.tsv`` (no header); a malformed row raises naming file and line."""
    impressions = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip("\n")
            if line.strip():
                impressions.append(_parse_behaviors_row(line.split("\t"), f"{path}:{lineno}"))
    return impressions


def read_item_texts(path: str | os.PathLike, clean: bool = False) -> dict[str, str]:
    """Read a MIND ``news*.tsv``: id -> abstract (the only filled text column; may be empty).

    Quoted abstracts can span lines, so rows are parsed with ``csv`` and ``"`` quoting, as
    ``pandas.read_table`` does; blank lines are skipped.
    """
    texts: dict[str, str] = {}
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quotechar='"', strict=True)
        start = 1
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                raise ConfigError(f"{path}:{start}: malformed row ({e})") from None
            where, start = f"{path}:{start}", reader.line_num + 1
            if not row:
                continue
            if len(row) != NEWS_COLUMNS or not row[0]:
                raise ConfigError(
                    f"{where}: expected {NEWS_COLUMNS} columns with an id, got {row!r}"
                )
            if row[0] in texts:
                raise ConfigError(f"{where}: duplicate item id {row[0]!r}")
            texts[row[0]] = clean_text(row[4]) if clean else row[4]
    return texts


def text_path(domain_dir: str | os.PathLike, source: str) -> Path:
    """``news.tsv`` holds the human text; ``news_<source>.tsv`` an LLM version."""
    name = "news.tsv" if source == HGC else f"news_{source}.tsv"
    return Path(domain_dir) / "text" / name


def load_texts(
    root: str | os.PathLike,
    sources: tuple[str, ...] = ALL_SOURCES,
    clean: bool = False,
    items: list[str] | None = None,
) -> TextTable:
    """Texts of ``sources`` under domain dir ``root`` (e.g. ``.../Amazon_Beauty_sample``).

    Items without non-empty text in a source (relative to ``items``, or to the union of ids over
    ``sources``) are left out of that source's dict and listed in ``missing``, and logged.
    """
    raw = {src: read_item_texts(text_path(root, src), clean=clean) for src in sources}
    wanted = sorted(set().union(*raw.values())) if items is None else list(items)
    texts, missing = {}, {}
    for src, table in raw.items():
        texts[src] = {i: table[i] for i in wanted if table.get(i, "").strip()}
        missing[src] = [i for i in wanted if i not in texts[src]]
        if missing[src]:
            log.warning("%s: %d of %d items have no text", src, len(missing[src]), len(wanted))
    return TextTable(texts, missing)


def _resample_split(
    rows: list[Impression], pool: list[str], rng: np.random.Generator, num_negatives: int
) -> tuple[list[Impression], dict[str, int]]:
    """Restrict rows to ``pool`` items and draw fresh negatives from the pool.

    The ``history_items_*`` counts cover the rows whose positive is in the pool.
    """
    index = {item: i for i, item in enumerate(pool)}
    pool_arr = np.asarray(pool)
    kept: list[Impression] = []
    c = dict.fromkeys(
        [
            "rows_read",
            "dropped_positive_without_text",
            "dropped_empty_history",
            "rows_kept",
            "history_items_read",
            "history_items_removed",
            "history_items_kept",
        ],
        0,
    )
    c["rows_read"] = len(rows)
    for imp in rows:
        (pos,) = imp.positives
        if pos not in index:
            c["dropped_positive_without_text"] += 1
            continue
        history = tuple(h for h in imp.history if h in index)
        c["history_items_read"] += len(imp.history)
        c["history_items_removed"] += len(imp.history) - len(history)
        if not history:
            c["dropped_empty_history"] += 1
            continue
        allowed = np.ones(len(pool), dtype=bool)
        allowed[[index[h] for h in history] + [index[pos]]] = False
        negatives = rng.choice(pool_arr[allowed], size=num_negatives, replace=False)
        cands = [(pos, 1)] + [(str(n), 0) for n in negatives]
        order = rng.permutation(len(cands))  # no fixed positive slot for ties to exploit
        kept.append(
            Impression(
                imp.impression_id, imp.user, imp.timestamp, history, tuple(cands[k] for k in order)
            )
        )
        c["history_items_kept"] += len(history)
    c["rows_kept"] = len(kept)
    return kept, c


def _without_clicks_of(
    rows: list[Impression], held_out: list[Impression]
) -> tuple[list[Impression], int]:
    """`rows` minus the impressions whose (user, clicked item) is a held-out click.

    The released `behaviors1.tsv` holds every dev click (all 1750 (user, positive) pairs of
    `dev/behaviors.tsv`), so a loop trained on it would be evaluated on its own training clicks.
    """
    clicks = {(imp.user, pos) for imp in held_out for pos in imp.positives}
    kept = [imp for imp in rows if not any((imp.user, p) in clicks for p in imp.positives)]
    return kept, len(rows) - len(kept)


def build_beauty637(
    root: str | os.PathLike | None = None,
    seed: int = 0,
    clean: bool = False,
    sources: tuple[str, ...] = ALL_SOURCES,
    num_negatives: int = 4,
) -> RecDataset:
    """Full Beauty logs restricted to the items that have both HGC and Mistral text.

    ``root`` is the ``rec_source_bias`` directory (default: under the shared data folder,
    ``echo_jax.core.files.data_dir``). Impressions
    whose positive lacks either text are dropped, history items without both texts are removed
    (rows left with no history are dropped) and the negatives are resampled from the pool,
    excluding the positive and the history. The loop halves `train1`/`train2` lose the rows that
    repeat a dev click. The candidate order is shuffled. Deterministic per
    ``seed``; each split draws from its own generator.
    """
    root = Path(root) if root is not None else data_dir() / "rec_source_bias"
    if not root.is_dir():
        raise MissingFileError(f"{root} not found; set {DATA_ENV} to the shared data directory")
    sources = tuple(dict.fromkeys((HGC, MISTRAL, *sources)))
    table = load_texts(root / "Amazon_Beauty_sample", sources, clean=clean)
    pool = sorted(set(table.texts[HGC]) & set(table.texts[MISTRAL]))
    pool_set = set(pool)
    texts = {src: {i: t for i, t in table.texts[src].items() if i in pool_set} for src in sources}
    counts: dict = {
        "seed": seed,
        "clean": clean,
        "items_with_hgc": len(table.texts[HGC]),
        "items_with_hgc_and_mistral": len(pool),
        "pool_items_missing_text": {s: len(pool_set - set(texts[s])) for s in sources},
        "splits": {},
    }
    splits = {}
    for k, (split, rel) in enumerate(BEAUTY_SPLITS.items()):
        rng = np.random.default_rng([seed, k])
        splits[split], counts["splits"][split] = _resample_split(
            read_behaviors(root / "Amazon_Beauty" / rel), pool, rng, num_negatives
        )
    for half in ("train1", "train2"):
        c = counts["splits"][half]
        splits[half], c["dropped_dev_clicks"] = _without_clicks_of(splits[half], splits["dev"])
        c["rows_kept"] -= c["dropped_dev_clicks"]
    counts["users"] = len({imp.user for rows in splits.values() for imp in rows})
    used = {i for rows in splits.values() for imp in rows for i in (*imp.history, *imp.positives)}
    counts["pool_items_clicked"] = len(used)
    return RecDataset(splits, pool, texts, counts)
