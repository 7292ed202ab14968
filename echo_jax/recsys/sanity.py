"""Source-bias sanity check of the frozen text tower on an IR benchmark with human/LLM doc pairs.

Cocktail's NQ-UTD corpus holds every document twice, human-written and rewritten by
Llama-2-7b-chat (same ``_id``). If the encoder has the reported source bias, a query should be
closer to the LLM copy of its relevant document more often than not.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from echo_jax.recsys.data import clean_text, data_root
from echo_jax.recsys.text_encoder import embed_texts

COCKTAIL_LLM = "llama-2-7b-chat-tmp0.2"


def _read_jsonl(path: Path) -> dict[str, dict]:
    with open(path, encoding="utf-8") as f:
        return {row["_id"]: row for row in map(json.loads, f) if row}


def _doc_text(row: dict) -> str:
    """BEIR convention: title and text joined (NQ-UTD titles are empty)."""
    return f"{row.get('title', '')} {row['text']}".strip()


def cocktail_llm_preference(
    data_root_dir: str | os.PathLike | None = None,
    clean: bool = False,
    corpus: str = "nq-utd",
    model_dir: str | os.PathLike | None = None,
) -> dict:
    """Share of (query, relevant doc) pairs where cos(query, LLM copy) > cos(query, human copy).

    Relevant = qrels score > 0. ``clean`` applies :func:`clean_text` to queries and both copies.
    The encoder defaults to the frozen MiniLM under the data root.
    """
    root = data_root(data_root_dir)
    base = root / "hgc_aigc_pairs_cocktail" / corpus
    queries = {q: row["text"] for q, row in _read_jsonl(base / "queries.jsonl").items()}
    human = _read_jsonl(base / "corpus" / "human.jsonl")
    llm = _read_jsonl(base / "corpus" / f"{COCKTAIL_LLM}.jsonl")
    pairs = []
    with open(base / "qrels" / "test.tsv", encoding="utf-8") as f:
        next(f)  # header: query-id corpus-id score
        for line in f:
            qid, did, score = line.rstrip("\n").split("\t")
            if int(score) > 0:
                pairs.append((qid, did, int(score)))
    docs = sorted({d for _, d, _ in pairs})
    qids = sorted({q for q, _, _ in pairs})
    raw = ([queries[q] for q in qids] + [_doc_text(human[d]) for d in docs]
           + [_doc_text(llm[d]) for d in docs])
    texts = [clean_text(t) for t in raw] if clean else raw
    emb = embed_texts(texts, model_dir or root / "minilm")
    q_emb = dict(zip(qids, emb[:len(qids)]))
    h_emb = dict(zip(docs, emb[len(qids):len(qids) + len(docs)]))
    l_emb = dict(zip(docs, emb[len(qids) + len(docs):]))
    diff = np.array([q_emb[q] @ l_emb[d] - q_emb[q] @ h_emb[d] for q, d, _ in pairs])
    grades = np.array([s for _, _, s in pairs])
    return {
        "corpus": corpus,
        "clean": clean,
        "pairs": len(pairs),
        "llm_preferred": int((diff > 0).sum()),
        "ties": int((diff == 0).sum()),
        "share": float((diff > 0).mean()),
        "mean_cos_diff": float(diff.mean()),
        "share_by_grade": {int(g): float((diff[grades == g] > 0).mean()) for g in np.unique(grades)},
        "texts_changed_by_cleaning": sum(a != b for a, b in zip(raw, texts)),
    }
