"""Executes a notebook of `notebooks/` the way CI does: smoke size, CPU, a given workdir."""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import REPO


def execute_notebook(name: str, workdir: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs `notebooks/<name>` top to bottom with `ECHO_JAX_NB_SMOKE=1` writing into `workdir`;
    a failing cell raises."""
    for key, value in (
        ("ECHO_JAX_NB_SMOKE", "1"),
        ("ECHO_JAX_NB_WORKDIR", str(workdir)),
        ("XLA_FLAGS", ""),
        ("JAX_PLATFORMS", "cpu"),
    ):
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(REPO / "notebooks" / name, as_version=4)
    NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(REPO / "notebooks")}},
    ).execute()
