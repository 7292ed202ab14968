"""The study's real pretraining sets, as `lm.data.download` writes them, for the grain pipeline and
the seqio Tasks (`data.source = "real"`).

Layout of `data.real_dir` (default `$ECHO_JAX_DATA/pretrain`): one `<style>.jsonl` per style
(`tinygsm.jsonl`, `omi1.jsonl`, `omi2.jsonl`), one example per line,
`{"question": ..., "text": question + "\\n\\n" + solution, "style": ...}` plus the source's extra
fields (OMI1: its correct solutions only). A line without `question` is split at its first blank
line. Next to each file an index of line offsets (`<style>.jsonl.<size>.offsets.npy`) is written on
first use (in `$TMPDIR/echo_jax_offsets` where the folder is read-only), so any example is one
seek away.

Mixtures are the study's: files repeated N times and concatenated (`tg_4xomi1` = TinyGSM once +
OMI1 four times), then shuffled; the rates of `mixtures.MIXTURES` are those repetition counts. The
first `data.eval_examples` lines of each file are the validation examples, left out of training.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import tempfile

import numpy as np

from echo_jax.core.config import ConfigError, MissingFileError
from echo_jax.core.files import data_dir
from echo_jax.lm.data import mixtures

DOWNLOAD_HINT = "python -m echo_jax.lm.data.download --dataset {style} --out {folder}"


def default_dir() -> pathlib.Path:
    return pathlib.Path(data_dir()) / "pretrain"


def style_file(real_dir: str | os.PathLike, style: str) -> pathlib.Path:
    """`<real_dir>/<style>.jsonl`; MissingFileError with the download command when absent."""
    folder = pathlib.Path(real_dir) if real_dir else default_dir()
    path = folder / f"{style}.jsonl"
    if not path.is_file():
        hint = DOWNLOAD_HINT.format(style=style, folder=folder)
        raise MissingFileError(f"no {path} (the {style} pretraining set); fetch it with: {hint}")
    return path


def repeats(mixture: str) -> dict[str, int]:
    """Style -> how many times the study repeats its file in `mixture`."""
    rates = mixtures.get_mixture(mixture)
    if any(rate != int(rate) or rate < 1 for rate in rates.values()):
        raise ConfigError(f"mixture {mixture!r} has non-integer file repeats: {rates}")
    return {style: int(rate) for style, rate in rates.items()}


def _offsets_path(path: pathlib.Path) -> pathlib.Path:
    """The index's file, named by the data file's size (a replaced file gets a new index)."""
    beside = path.with_name(f"{path.name}.{path.stat().st_size}.offsets.npy")
    if os.access(path.parent, os.W_OK):
        return beside
    key = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]
    name = f"{key}.{path.stat().st_size}.offsets.npy"
    return pathlib.Path(tempfile.gettempdir(), "echo_jax_offsets", name)


def _line_offsets(path: pathlib.Path) -> np.ndarray:
    """Start offsets of the non-blank lines, cached (rebuilt when the file is newer)."""
    cache = _offsets_path(path)
    if cache.is_file() and cache.stat().st_mtime >= path.stat().st_mtime:
        return np.load(cache)
    offsets, position = [], 0
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                offsets.append(position)
            position += len(line)
    result = np.asarray(offsets, np.int64)
    cache.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache.parent, suffix=".tmp.npy")
    with os.fdopen(fd, "wb") as f:
        np.save(f, result)
    os.replace(tmp, cache)  # concurrent processes never read a half-written index
    return result


class JsonlSource:
    """A grain random-access source over lines [start, stop) of one style's jsonl file; items are
    `{"question", "text", "style"}` as the pipeline's `Tokenize` reads them."""

    def __init__(self, path: str | os.PathLike, start: int = 0, stop: int | None = None):
        self.path = pathlib.Path(path)
        offsets = _line_offsets(self.path)
        stop = len(offsets) if stop is None else min(stop, len(offsets))
        if stop <= start:
            raise ConfigError(f"{self.path} has {len(offsets)} examples, none in [{start}, {stop})")
        self._offsets, self._start, self._stop = offsets, start, stop
        self._size = self.path.stat().st_size

    def __len__(self) -> int:
        return self._stop - self._start

    def __getitem__(self, index: int) -> dict:
        line = self._start + int(index)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            end = self._offsets[line + 1] if line + 1 < len(self._offsets) else self._size
            raw = os.pread(fd, int(end - self._offsets[line]), int(self._offsets[line]))
        finally:
            os.close(fd)
        return parse_example(raw.split(b"\n", 1)[0], f"{self.path}:{line + 1}")

    def __repr__(self) -> str:
        return f"JsonlSource({str(self.path)!r}, {self._start}, {self._stop})"


def parse_example(raw: bytes, where: str) -> dict:
    """One line as `{"question", "text", "style"}`; ConfigError naming the file and example."""
    try:
        row = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
        raise ConfigError(f"{where}: no 'text' field")
    text = row["text"]
    question = row.get("question")
    if not isinstance(question, str):
        question = text.split("\n\n", 1)[0]
    if not text.startswith(question + "\n\n"):
        raise ConfigError(f"{where}: 'text' does not start with the question and a blank line")
    return {"question": question, "text": text, "style": row.get("style", "")}


class MixtureSource:
    """The study's mixture as one random-access source: each style's file (from line `skip` on,
    after the validation examples) repeated as many times as the mixture says, concatenated."""

    def __init__(self, mixture: str, real_dir: str | os.PathLike, skip: int = 0):
        self._parts = []
        for style, count in repeats(mixture).items():  # one index per file, however repeated
            self._parts += [JsonlSource(style_file(real_dir, style), start=skip)] * count
        self._ends = np.cumsum([len(part) for part in self._parts])

    def __len__(self) -> int:
        return int(self._ends[-1])

    def __getitem__(self, index: int) -> dict:
        part = int(np.searchsorted(self._ends, index, side="right"))
        start = 0 if part == 0 else int(self._ends[part - 1])
        return self._parts[part][index - start]

    def __repr__(self) -> str:
        return f"MixtureSource({self._parts!r})"
