"""Loaders for the real evaluation / RL-prompt sets: GSM8K, MATH-500 and AIME (jsonl files).

The files live outside the repository, in the shared data folder (`$ECHO_JAX_DATA`, default
`../shared/data`: `echo_jax.core.files.data_dir`); see that folder's README.md for provenance.
Every loader returns a list of dicts with at least `question` and `answer` (both str), plus the
source's other useful fields.
"""

import os

from echo_jax.core.config import ConfigError
from echo_jax.core.files import data_file, read_jsonl_lines

AIME_SETS = ("aime24", "aime25", "aime_all")


def _require(row: dict, keys: tuple[str, ...], path: os.PathLike, lineno: int) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise ConfigError(f"{path}:{lineno}: missing field(s) {missing}")


def gsm8k_answer(solution: str, where: str = "GSM8K") -> str:
    """The final answer of a GSM8K solution: the text after '#### ', commas removed."""
    if not isinstance(solution, str) or "####" not in solution:
        raise ConfigError(f"{where}: no '####' answer marker in solution {str(solution)[:60]!r}")
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


def load_gsm8k(split: str) -> list[dict]:
    """GSM8K train (7473) or test (1319): question, answer, solution (with <<calc>> notes)."""
    if split not in ("train", "test"):
        raise ConfigError(f"unknown GSM8K split {split!r}; valid splits: ('train', 'test')")
    path = data_file("gsm8k", f"{split}.jsonl")
    out = []
    for i, (lineno, row) in enumerate(read_jsonl_lines(path)):
        _require(row, ("question", "answer"), path, lineno)
        out.append(
            {
                "question": row["question"],
                "answer": gsm8k_answer(row["answer"], f"{path}:{lineno}"),
                "solution": row["answer"],
                "id": f"gsm8k-{split}-{i}",
            }
        )
    return out


def load_math500() -> list[dict]:
    """MATH-500: question, answer (a LaTeX string), solution, subject, level, id."""
    path = data_file("math500", "test.jsonl")
    out = []
    for i, (lineno, row) in enumerate(read_jsonl_lines(path)):
        _require(row, ("problem", "answer"), path, lineno)
        out.append(
            {
                "question": row["problem"],
                "answer": str(row["answer"]),
                "solution": row.get("solution", ""),
                "subject": row.get("subject", ""),
                "level": row.get("level"),
                "id": row.get("unique_id", f"math500-{i}"),
            }
        )
    return out


def _aime_answer(raw: str) -> str:
    """AIME answers are integers 0-999 stored with leading zeros ("025"); others are kept as is."""
    raw = str(raw).strip()
    return str(int(raw)) if raw.isdigit() else raw


def load_aime(name: str) -> list[dict]:
    """AIME 2024 ("aime24", 30), 2025 ("aime25", 30) or 1983-2025 ("aime_all": 1983-2024 + 2025)."""
    if name not in AIME_SETS:
        raise ConfigError(f"unknown AIME set {name!r}; valid sets: {AIME_SETS}")
    files = {
        "aime24": ["aime24.jsonl"],
        "aime25": ["aime25.jsonl"],
        "aime_all": ["aime_1983_2024.jsonl", "aime25.jsonl"],
    }[name]
    out = []
    for filename in files:
        path = data_file("aime", filename)
        for i, (lineno, row) in enumerate(read_jsonl_lines(path)):
            _require(row, ("problem", "answer"), path, lineno)
            rid = row.get("id", i)
            out.append(
                {
                    "question": row["problem"],
                    "answer": _aime_answer(row["answer"]),
                    "answer_raw": str(row["answer"]),
                    "id": f"{filename.removesuffix('.jsonl')}-{rid}",
                }
            )
    return out
