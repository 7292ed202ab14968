"""Optional: fetch the study's real pretraining sets from the Hugging Face Hub as jsonl.

Writes `OUT/<dataset>.jsonl` (`tinygsm`, `omi1`, `omi2`), one example per line:
`{"question": ..., "text": question + "\\n\\n" + solution, "style": ...}` plus the dataset's extra
fields, the way the study stores examples (OMI1: its correct solutions only). That folder is what
`data.source="real"` pretraining reads (`data.real_dir`, default `$ECHO_JAX_DATA/pretrain`;
`pretrain_files.py`). Fetching needs internet; nothing else in echo_jax calls it, and importing it
touches no network. `--from-files` converts raw files already on disk (parquet or jsonl, in the
dataset's own schema) the same way.

    python -m echo_jax.lm.data.download --list
    python -m echo_jax.lm.data.download --dataset omi1 --out /data/echo --max-rows 100000
    python -m echo_jax.lm.data.download --dataset tinygsm --out /data/echo --dry-run
    python -m echo_jax.lm.data.download --dataset omi2 --out /data/echo --from-files a.parquet
"""

import argparse
import dataclasses
import fnmatch
import json
import os
import pathlib
import sys
from collections.abc import Iterable, Iterator, Sequence


@dataclasses.dataclass(frozen=True)
class HubDataset:
    """Where a dataset lives on the Hub and which fields hold its question and solution."""

    style: str
    repo_id: str
    pattern: str
    question: str
    solution: str
    keep: tuple[str, ...] = ()  # extra fields copied to each row
    filter_field: str = ""  # a boolean field that must be true (OMI1: verified correct)


DATASETS = {
    "tinygsm": HubDataset("tinygsm", "TinyGSM/TinyGSM", "data/train-*.parquet", "question", "code"),
    "omi1": HubDataset(
        "omi1",
        "nvidia/OpenMathInstruct-1",
        "correct_solutions/train.jsonl",
        "question",
        "generated_solution",
        ("expected_answer", "dataset"),
        "is_correct",
    ),
    "omi2": HubDataset(
        "omi2",
        "nvidia/OpenMathInstruct-2",
        "data/train_1M-*.parquet",
        "problem",
        "generated_solution",
        ("expected_answer", "problem_source"),
    ),
}


def _rows(path: pathlib.Path, columns: Sequence[str]) -> Iterator[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq  # only needed when downloading

        for batch in pq.ParquetFile(path).iter_batches(columns=list(columns), batch_size=4096):
            yield from batch.to_pylist()
    else:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)


def download(
    name: str,
    out_dir: str,
    max_rows: int | None = None,
    pattern: str | None = None,
    cache_dir: str | None = None,
) -> pathlib.Path:
    """Downloads the matching files of dataset `name` and writes `{out_dir}/{name}.jsonl`."""
    import huggingface_hub  # only needed when downloading

    spec = DATASETS[name]
    files = sorted(
        f
        for f in huggingface_hub.list_repo_files(spec.repo_id, repo_type="dataset")
        if fnmatch.fnmatch(f, pattern or spec.pattern)
    )
    if not files:
        raise FileNotFoundError(f"no file of {spec.repo_id} matches {pattern or spec.pattern!r}")
    local = (
        huggingface_hub.hf_hub_download(spec.repo_id, f, repo_type="dataset", cache_dir=cache_dir)
        for f in files
    )
    return convert(name, local, out_dir, max_rows)


def convert(
    name: str, files: Iterable[str | os.PathLike], out_dir: str, max_rows: int | None = None
) -> pathlib.Path:
    """Writes `{out_dir}/{name}.jsonl` from raw files in dataset `name`'s schema (written to a
    temporary file and renamed when complete)."""
    spec = DATASETS[name]
    out = pathlib.Path(out_dir) / f"{name}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    columns = [spec.question, spec.solution, *spec.keep]
    if spec.filter_field:
        columns.append(spec.filter_field)
    written = 0
    with open(f"{out}.tmp", "w", encoding="utf-8") as f:
        for path in files:
            for row in _rows(pathlib.Path(path), columns):
                if spec.filter_field and not row.get(spec.filter_field, False):
                    continue
                question = row[spec.question]
                text = f"{question}\n\n{row[spec.solution]}"
                extra = {k: row.get(k) for k in spec.keep}
                example = {"question": question, "text": text, "style": spec.style, **extra}
                f.write(json.dumps(example) + "\n")
                written += 1
                if max_rows is not None and written >= max_rows:
                    break
            if max_rows is not None and written >= max_rows:
                break
    os.replace(f"{out}.tmp", out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Download TinyGSM / OpenMathInstruct-1 / -2 as jsonl."
    )
    parser.add_argument(
        "--dataset",
        choices=sorted(DATASETS),
        action="append",
        help="dataset(s) to fetch; repeat the flag for several",
    )
    parser.add_argument("--out", help="output folder (one <dataset>.jsonl per dataset)")
    parser.add_argument("--max-rows", type=int, default=None, help="stop after this many rows")
    parser.add_argument("--pattern", default=None, help="override the repository file glob")
    parser.add_argument("--cache-dir", default=None, help="huggingface_hub cache folder")
    parser.add_argument(
        "--from-files", nargs="+", help="convert these raw files instead of fetching (one dataset)"
    )
    parser.add_argument("--list", action="store_true", help="list the known datasets and exit")
    parser.add_argument("--dry-run", action="store_true", help="print what would be fetched")
    args = parser.parse_args(argv)
    if args.list:
        for name, spec in DATASETS.items():
            print(
                f"{name}: {spec.repo_id} files {spec.pattern} "
                f"(question={spec.question}, solution={spec.solution})"
            )
        return 0
    if not args.dataset or not args.out:
        parser.error("--dataset and --out are required unless --list is given")
    if args.from_files:
        if len(args.dataset) != 1:
            parser.error("--from-files converts one --dataset at a time")
        print(f"wrote {convert(args.dataset[0], args.from_files, args.out, args.max_rows)}")
        return 0
    for name in args.dataset:
        spec = DATASETS[name]
        target = pathlib.Path(args.out) / f"{name}.jsonl"
        if args.dry_run:
            print(f"would fetch {spec.repo_id} files {args.pattern or spec.pattern} -> {target}")
        else:
            print(f"wrote {download(name, args.out, args.max_rows, args.pattern, args.cache_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
