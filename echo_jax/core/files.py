"""Files a job reads or leaves behind: the shared data folder, jsonl files, JSON results.

The real datasets of both tracks live outside the repository, under `$ECHO_JAX_DATA` (default:
`../shared/data` relative to the working directory); nothing is downloaded at run time.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

from etils import epath

from echo_jax.core.config import ConfigError, MissingFileError

DATA_ENV = "ECHO_JAX_DATA"
DEFAULT_DATA_DIR = pathlib.Path("..") / "shared" / "data"


def data_dir(path: str | os.PathLike | None = None) -> pathlib.Path:
    """The shared data folder: `path`, else `$ECHO_JAX_DATA`, else `../shared/data`, resolved.
    MissingFileError naming `$ECHO_JAX_DATA` when it is not a folder."""
    if path is not None:
        root = pathlib.Path(path)
    elif os.environ.get(DATA_ENV):
        root = pathlib.Path(os.environ[DATA_ENV])
    else:
        root = DEFAULT_DATA_DIR
    if not root.is_dir():
        raise MissingFileError(
            f"data directory {str(root.resolve())!r} not found; set "
            f"{DATA_ENV} to the shared data directory"
        )
    return root.resolve()


def data_file(*parts: str) -> pathlib.Path:
    """`data_dir() / parts...`; MissingFileError naming the file and `$ECHO_JAX_DATA` when it
    does not exist."""
    path = data_dir().joinpath(*parts)
    if not path.is_file():
        raise MissingFileError(f"data file {path} not found (data folder: ${DATA_ENV})")
    return path


def read_jsonl(path: str | os.PathLike, *, repair: bool = False) -> list[dict[str, Any]]:
    """The JSON objects of a jsonl file, one per line (blank lines skipped); [] when the file does
    not exist. Local paths and gs://. See `read_jsonl_lines`."""
    return [row for _, row in read_jsonl_lines(path, repair=repair)]


def read_jsonl_lines(
    path: str | os.PathLike, *, repair: bool = False
) -> list[tuple[int, dict[str, Any]]]:
    """(1-based line number, object) for each non-blank line of a jsonl file, so a loader can
    name the line of a row it rejects; [] when the file does not exist.

    A malformed line, or one that is not an object, raises `ConfigError` naming the file and its
    line. With `repair`, for files appended to a line at a time by a job that may be
    killed: reading stops at the first line that does not parse or lacks its newline (a parsing
    last line without one counts too, so the next append cannot run two rows together), and the
    file is truncated there.
    """
    path = epath.Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    rows: list[tuple[int, dict[str, Any]]] = []
    start = lineno = 0
    while start < len(data):
        end = data.find(b"\n", start)
        lineno += 1
        if end < 0 and repair:
            break
        line = data[start:] if end < 0 else data[start:end]
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                if repair:
                    break
                raise ConfigError(f"{path}:{lineno}: malformed JSON line ({e.msg})") from None
            if not isinstance(row, dict):
                if repair:
                    break
                raise ConfigError(
                    f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}"
                )
            rows.append((lineno, row))
        start = len(data) if end < 0 else end + 1
    if repair and start < len(data):
        if "://" in str(path):  # a bucket: rewritten
            path.write_bytes(data[:start])
        else:  # locally truncated: a second kill cannot lose the complete lines
            os.truncate(path, start)
    return rows


def read_json(path: str | os.PathLike) -> Any | None:
    """The content of a JSON file, or None when it does not exist; `ConfigError` naming the file
    when it is not JSON (e.g. cut short)."""
    path = epath.Path(path)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def write_json(path: str | os.PathLike, value: Any, *, indent: int = 1) -> None:
    """Writes `value` (keys sorted) through a temporary file and a rename, so a reader never sees
    half a file; on process 0 only (a no-op on the other hosts of a multi-host run)."""
    import jax  # here: reading data files needs no jax

    if jax.process_index() != 0:
        return
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=indent, sort_keys=True) + "\n")
    tmp.replace(path)
