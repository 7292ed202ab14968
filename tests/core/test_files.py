"""The shared data folder and the jsonl reader: one-line errors naming the file, and the repair of
a file cut off mid-line by a killed job."""

import json

import pytest

from echo_jax.core import files
from echo_jax.core.config import ConfigError, MissingFileError


def test_missing_data_dir_names_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv("ECHO_JAX_DATA", str(tmp_path / "nope"))
    with pytest.raises(MissingFileError, match="ECHO_JAX_DATA"):
        files.data_dir()
    monkeypatch.delenv("ECHO_JAX_DATA")
    monkeypatch.chdir(tmp_path)  # no ../shared/data from here
    with pytest.raises(MissingFileError, match="ECHO_JAX_DATA"):
        files.data_dir()
    monkeypatch.setenv("ECHO_JAX_DATA", str(tmp_path))
    assert files.data_dir() == tmp_path.resolve()
    with pytest.raises(MissingFileError, match=r"gsm8k/test\.jsonl.*ECHO_JAX_DATA"):
        files.data_file("gsm8k", "test.jsonl")


def test_read_jsonl_names_the_bad_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    assert files.read_jsonl(path) == []
    path.write_text('{"a": 1}\n\n{"a": 2}\n{oops\n')
    with pytest.raises(ConfigError, match=r"rows\.jsonl:4: malformed JSON"):
        files.read_jsonl(path)
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(ConfigError, match=r"rows\.jsonl:2: expected a JSON object, got list"):
        files.read_jsonl(path)
    path.write_text('{"a": 1}\n\n{"a": 2}')  # a last line without its newline is a row
    assert files.read_jsonl(path) == [{"a": 1}, {"a": 2}]
    assert files.read_jsonl_lines(path) == [(1, {"a": 1}), (3, {"a": 2})]  # lines, not rows


def test_samples_file_drops_a_cut_off_last_line(tmp_path):
    path = tmp_path / "samples.jsonl"
    complete = '{"id": 1}\n{"id": 2}\n'
    for tail in ('{"id": 3', '{"id": 3}'):  # cut inside the record, or just before its newline
        path.write_text(complete + tail)
        assert files.read_jsonl(str(path), repair=True) == [{"id": 1}, {"id": 2}]
        assert path.read_text() == complete
    assert files.read_jsonl(str(tmp_path / "absent.jsonl"), repair=True) == []


def test_json_results_are_written_whole(tmp_path):
    path = tmp_path / "sub" / "result.json"
    assert files.read_json(path) is None
    files.write_json(path, {"b": 1, "a": [1.5, None]})
    assert files.read_json(path) == {"a": [1.5, None], "b": 1}
    assert json.loads(path.read_text()) == {"a": [1.5, None], "b": 1}
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]  # no temporary left
