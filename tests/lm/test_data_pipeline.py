"""Tokenizers, the grain pipeline (packing, masks, mixture rates, checkpointing) and seqio tasks."""

import collections
import importlib

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
import seqio

from echo_jax.lm.data import generators, mixtures, pipeline, tasks, vocab

SEQ_LEN = 640  # longest level-1/2 example is ~620 bytes, so nothing is truncated here
LEVELS = (1, 2)
BYTES = seqio.ByteVocabulary()


def _train_iterator(mixture="tg_omi1_omi2", seed=1, batch_size=4, **kwargs):
    return pipeline.make_train_iterator(
        mixture=mixture,
        seed=seed,
        seq_len=SEQ_LEN,
        batch_size=batch_size,
        levels=LEVELS,
        examples_per_style=600,
        **kwargs,
    )


def _segments(batch):
    """Yields (row, segment id, token ids of the whole example) for every packed example."""
    for r, seg_row in enumerate(batch["segment_ids"]):
        for s in range(1, seg_row.max() + 1):
            idx = np.flatnonzero(seg_row == s)
            yield r, idx, np.append(batch["inputs"][r, idx], batch["targets"][r, idx[-1]])


def _style(text: str) -> str:
    solution = text.split("\n\n", 1)[1]
    if "<llm-code>" in solution:
        return "omi1"
    return "tinygsm" if solution.startswith("def simple_math_problem") else "omi2"


def test_byte_vocabulary():
    v = vocab.get_vocabulary("byte")
    assert (v.vocab_size, v.pad_id, v.eos_id, v.unk_id) == (259, 0, 1, 2)
    assert list(v.encode("A\n")) == [ord("A") + 3, ord("\n") + 3]
    with pytest.raises(ValueError, match="byte"):
        vocab.get_vocabulary("gpt2")


def test_spm_vocabulary_roundtrips_and_is_deterministic(tmp_path):
    a = vocab.get_vocabulary("spm", str(tmp_path / "a"), examples_per_style=150, vocab_size=600)
    b = vocab.get_vocabulary("spm", str(tmp_path / "b"), examples_per_style=150, vocab_size=600)
    files = [next((tmp_path / d).glob("*.model")).read_bytes() for d in "ab"]
    assert files[0] == files[1]
    assert (a.vocab_size, a.pad_id, a.eos_id, a.unk_id) == (600, 0, 1, 2)
    text = generators.format_example(generators.make_problem(5, 0, 4), "tinygsm") + "\n\tü€"
    ids = list(a.encode(text))
    assert a.decode(ids) == text and list(b.encode(text)) == ids
    assert len(ids) < 0.6 * len(text.encode())  # it does merge
    assert [a.decode([i]) for i in a.encode("2024")] == ["2", "0", "2", "4"]  # split_digits


def test_train_batches_have_the_documented_layout():
    batch = next(_train_iterator(batch_size=8))
    assert set(batch) == set(pipeline.FEATURES)
    for name, dtype in [
        ("inputs", np.int32),
        ("targets", np.int32),
        ("loss_mask", np.float32),
        ("segment_ids", np.int32),
        ("positions", np.int32),
    ]:
        assert batch[name].shape == (8, SEQ_LEN) and batch[name].dtype == dtype
    pad = batch["segment_ids"] == 0
    assert not batch["inputs"][pad].any() and not batch["loss_mask"][pad].any()
    num_examples = 0
    for r, idx, tokens in _segments(batch):
        num_examples += 1
        assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1))  # contiguous
        assert np.array_equal(batch["positions"][r, idx], np.arange(len(idx)))
        assert np.array_equal(batch["targets"][r, idx[:-1]], batch["inputs"][r, idx[1:]])
        assert tokens[-1] == BYTES.eos_id and BYTES.eos_id not in tokens[:-1]
        text = BYTES.decode(tokens.tolist())
        prompt_len = len(text.split("\n\n", 1)[0].encode()) + 2
        expected = (np.arange(len(idx)) + 1 >= prompt_len).astype(np.float32)
        assert np.array_equal(batch["loss_mask"][r, idx], expected)  # solution + final EOS
        assert tasks.final_answer(text.split("\n\n", 1)[1]) is not None
    assert num_examples > 8  # rows hold more than one example
    assert (~pad).mean() > 0.7  # packing is reasonably dense


def test_loss_on_all_masks_every_real_target():
    batch = next(_train_iterator(loss_on="all"))
    assert np.array_equal(batch["loss_mask"], (batch["segment_ids"] > 0).astype(np.float32))
    with pytest.raises(ValueError, match="loss_on"):
        next(_train_iterator(loss_on="prompt"))


@pytest.mark.parametrize("mixture", ["tg_4xomi1", "tg_omi1_omi2"])
def test_mixture_rates_are_honoured(mixture):
    it = _train_iterator(mixture=mixture, batch_size=8)
    counts = collections.Counter()
    for _ in range(64):  # 8 packing rounds of 64 rows
        batch = next(it)
        counts.update(_style(BYTES.decode(t.tolist())) for _, _, t in _segments(batch))
    total = sum(counts.values())
    assert total > 500
    shares = mixtures.mixture_shares(mixture)
    assert set(counts) == set(shares)
    for style, share in shares.items():
        assert abs(counts[style] / total - share) < 0.03, (style, counts)


def test_checkpoint_restore_reproduces_the_stream(tmp_path):
    it = _train_iterator()
    for _ in range(4):
        next(it)
    manager = ocp.CheckpointManager(tmp_path)
    manager.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    expected = [next(it) for _ in range(3)]
    restored = _train_iterator()
    ocp.CheckpointManager(tmp_path).restore(
        4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored))
    )
    for want, got in zip(expected, [next(restored) for _ in range(3)]):
        assert all(np.array_equal(want[k], got[k]) for k in pipeline.FEATURES)
    fresh = next(_train_iterator())
    assert not np.array_equal(fresh["inputs"], expected[0]["inputs"])
    other_seed = next(_train_iterator(seed=2))
    assert not np.array_equal(other_seed["inputs"], fresh["inputs"])


def test_processes_read_disjoint_shards():
    texts = []
    for index in range(2):
        it = _train_iterator(process_index=index, process_count=2)
        batches = [next(it), next(it)]
        texts.append({BYTES.decode(t.tolist()) for b in batches for *_, t in _segments(b)})
    assert texts[0] and texts[1] and not texts[0] & texts[1]
    with pytest.raises(ValueError, match="process_index"):
        _train_iterator(process_index=2, process_count=2)


def test_eval_batches_are_deterministic_and_of_one_style():
    kwargs = dict(
        style="omi1",
        split="validation",
        seed=0,
        num_examples=30,
        seq_len=SEQ_LEN,
        batch_size=4,
        levels=LEVELS,
    )
    batches = pipeline.make_eval_batches(**kwargs)
    again = pipeline.make_eval_batches(**kwargs)
    assert all(
        np.array_equal(a[k], b[k]) for a, b in zip(batches, again) for k in pipeline.FEATURES
    )
    assert all(b["inputs"].shape == (4, SEQ_LEN) for b in batches)
    texts = [BYTES.decode(t.tolist()) for b in batches for *_, t in _segments(b)]
    assert len(texts) == 30 and {_style(t) for t in texts} == {"omi1"}
    source = generators.ProblemSource("validation", 0, LEVELS, 30, "omi1")
    assert sorted(texts) == sorted(source[i]["text"] for i in range(30))


def test_seqio_tasks_and_mixtures_are_registered_idempotently():
    names = tasks.register_all(seed=0, size=40, eval_size=12, levels=LEVELS)
    importlib.reload(tasks)  # importing again re-registers the defaults without raising
    names = tasks.register_all(seed=0, size=40, eval_size=12, levels=LEVELS)
    assert {f"echo_jax_{s}" for s in generators.STYLES} <= set(seqio.TaskRegistry.names())
    assert {f"echo_jax_mix_{m}" for m in mixtures.MIXTURES} <= set(seqio.MixtureRegistry.names())
    assert len(names) == len(generators.STYLES) + len(mixtures.MIXTURES)
    task = seqio.get_mixture_or_task("echo_jax_omi1")
    assert set(task.splits) == set(generators.SPLITS)
    examples = list(
        task.get_dataset(
            sequence_length={"inputs": 512, "targets": 512}, split="validation", shuffle=False
        ).as_numpy_iterator()
    )
    assert len(examples) == 12
    for ex in examples:
        solution = BYTES.decode(ex["targets"].tolist())
        assert ex["targets"][-1] == BYTES.eos_id and "<llm-code>" in solution
        assert tasks.postprocess(solution) == ex["answer"]
        assert tasks.postprocess(solution, ex, is_target=True) == ex["answer"]
    assert task.metric_fns[0]([3, 4], [3, None]) == {"answer_accuracy": 50.0}
    mix = seqio.get_mixture_or_task("echo_jax_mix_tg_4xomi1")
    assert {t.name: mix.get_rate(t) for t in mix.tasks} == {
        "echo_jax_tinygsm": 1.0,
        "echo_jax_omi1": 4.0,
    }
    mixed = list(
        mix.get_dataset(
            sequence_length={"inputs": 512, "targets": 512},
            split="test",
            shuffle=False,
            num_epochs=1,
        )
        .take(5)
        .as_numpy_iterator()
    )
    assert len(mixed) == 5 and all(ex["targets"][-1] == BYTES.eos_id for ex in mixed)


def test_final_answer_never_runs_code():
    problem = generators.make_problem(0, 1, 3)
    for style in generators.STYLES:
        assert tasks.final_answer(generators.render_solution(problem, style)) == problem.answer
    sneaky = "def simple_math_problem() -> int:\n    x = __import__('os').getpid()\n    return x"
    assert tasks.final_answer(sneaky) is None
    assert tasks.final_answer("no answer here") is None
