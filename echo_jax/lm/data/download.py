"""Optional: fetch the study's real pretraining sets from the Hugging Face Hub as jsonl.

Writes one `{"text": question + "\\n\\n" + solution, "style": ...}` per line, the way the study
stores examples. Needs internet; nothing else in echo_jax calls it, and importing it touches no
network.

    python -m echo_jax.lm.data.download --list
    python -m echo_jax.lm.data.download --dataset omi1 --out /data/echo --max-rows 100000
    python -m echo_jax.lm.data.download --dataset tinygsm --out /data/echo --dry-run
"""

import argparse
import dataclasses
import fnmatch
import json
import pathlib
import sys
from collections.abc import Iterator, Sequence


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
    out = pathlib.Path(out_dir) / f"{name}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    columns = [spec.question, spec.solution, *spec.keep]
    if spec.filter_field:
        columns.append(spec.filter_field)
    written = 0
    with open(out, "w", encoding="utf-8") as f:
        for filename in files:
            local = huggingface_hub.hf_hub_download(
                spec.repo_id, filename, repo_type="dataset", cache_dir=cache_dir
            )
            for row in _rows(pathlib.Path(local), columns):
                if spec.filter_field and not row.get(spec.filter_field, False):
                    continue
                text = f"{row[spec.question]}\n\n{row[spec.solution]}"
                extra = {k: row.get(k) for k in spec.keep}
                f.write(json.dumps({"text": text, "style": spec.style, **extra}) + "\n")
                written += 1
                if max_rows is not None and written >= max_rows:
                    return out
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
