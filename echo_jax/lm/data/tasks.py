"""seqio Tasks (one per solution style) and Mixtures (the study's presets) of generated problems.

The grain pipeline (`pipeline.py`) is what training uses; these registrations give the same data,
vocabulary and mixture rates to seqio-based tools (inspection, caching, T5X-style evaluation). Tasks
are `echo_jax_{style}` with splits train / rl / validation / test; mixtures are
`echo_jax_mix_{name}` for every name in `mixtures.MIXTURES`. `register_all` replaces earlier
registrations, so importing or re-registering never raises. `register_real(real_dir)` registers
the study's real files (`pretrain_files.py`) likewise: `echo_jax_real_{style}` (validation = the
first `eval_examples` lines, train = the rest) and `echo_jax_real_mix_{name}`, whose rates are the
file repeats times the file sizes, so sampling draws each file as often as the study's
concatenation holds it.
"""

import ast
import functools
import re
from collections.abc import Sequence

import numpy as np
import seqio
import tensorflow as tf

from echo_jax.core.config import MissingFileError
from echo_jax.lm.data import generators, mixtures, pretrain_files
from echo_jax.lm.data import vocab as vocab_lib

TASK_PREFIX = "echo_jax_"
MIXTURE_PREFIX = "echo_jax_mix_"
REAL_TASK_PREFIX = "echo_jax_real_"
REAL_MIXTURE_PREFIX = "echo_jax_real_mix_"
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_CODE_OUTPUT = re.compile(r"<llm-code-output>\n?(.*?)\n?</llm-code-output>", re.S)
_BINOPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.FloorDiv: lambda a, b: a // b,
    ast.Div: lambda a, b: a / b,
    ast.Mod: lambda a, b: a % b,
}


def task_name(style: str) -> str:
    return TASK_PREFIX + style


def mixture_name(name: str) -> str:
    return MIXTURE_PREFIX + name


def _to_int(text: str) -> int | None:
    try:
        value = float(text.strip().replace(",", "").rstrip("."))
    except ValueError:
        return None
    return int(value) if value.is_integer() else None


def _eval_arithmetic(node: ast.AST, env: dict[str, float]) -> float:
    """Evaluates numbers, names and + - * / // % only: no calls, so no generated code is run."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return node.value
    if isinstance(node, ast.Name):
        return env[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_eval_arithmetic(node.operand, env)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        return _BINOPS[type(node.op)](
            _eval_arithmetic(node.left, env), _eval_arithmetic(node.right, env)
        )
    raise ValueError(f"unsupported expression {ast.dump(node)[:60]}")


def _tinygsm_answer(solution: str) -> int | None:
    """The value `simple_math_problem` returns when its body is straight-line arithmetic."""
    try:
        fn = next(n for n in ast.parse(solution).body if isinstance(n, ast.FunctionDef))
        env: dict[str, float] = {}
        for stmt in fn.body:
            if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
                env[stmt.targets[0].id] = _eval_arithmetic(stmt.value, env)
            elif isinstance(stmt, ast.Return) and stmt.value is not None:
                return _to_int(str(_eval_arithmetic(stmt.value, env)))
    except (
        SyntaxError,
        StopIteration,
        ValueError,
        KeyError,
        AttributeError,
        ZeroDivisionError,
        OverflowError,
    ):
        return None
    return None


def final_answer(solution: str) -> int | None:
    """The integer answer of a solution in any style (code output, returned value or last boxed)."""
    if "<llm-code>" in solution:
        outputs = _CODE_OUTPUT.findall(solution)
        lines = outputs[-1].strip().splitlines() if outputs else []
        return _to_int(lines[-1]) if lines else None
    if "def simple_math_problem" in solution:
        return _tinygsm_answer(solution)
    boxed = _BOXED.findall(solution)
    return _to_int(boxed[-1]) if boxed else None


def postprocess(
    output_or_target: str, example: dict | None = None, is_target: bool = False
) -> int | None:
    """seqio postprocess_fn: the stored answer for targets, the extracted answer for predictions."""
    if is_target and example is not None and "answer" in example:
        return int(example["answer"])
    return final_answer(output_or_target)


def answer_accuracy(targets: Sequence[int], predictions: Sequence[int | None]) -> dict[str, float]:
    """Exact match of final integer answers, in percent."""
    hits = [p is not None and int(t) == p for t, p in zip(targets, predictions)]
    return {"answer_accuracy": 100.0 * float(np.mean(hits)) if hits else 0.0}


def _dataset_fn(
    split: str,
    shuffle_files: bool,
    seed: int | None = None,
    *,
    style: str,
    data_seed: int,
    sizes: dict[str, int],
    levels: tuple[int, ...],
) -> tf.data.Dataset:
    """Examples of one style: inputs = question + blank line, targets = the solution."""
    del shuffle_files, seed  # the source is already a deterministic random order
    source = generators.ProblemSource(split, data_seed, levels, sizes[split], style)

    def examples():
        for i in range(len(source)):
            ex = source[i]
            prompt = ex["question"] + "\n\n"
            yield {
                "inputs": prompt,
                "targets": ex["text"][len(prompt) :],
                "answer": ex["answer"],
                "level": ex["level"],
                "template": ex["template"],
                "uid": ex["uid"],
            }

    signature = {
        "inputs": tf.TensorSpec((), tf.string),
        "targets": tf.TensorSpec((), tf.string),
        "answer": tf.TensorSpec((), tf.int64),
        "level": tf.TensorSpec((), tf.int64),
        "template": tf.TensorSpec((), tf.string),
        "uid": tf.TensorSpec((), tf.string),
    }
    return tf.data.Dataset.from_generator(examples, output_signature=signature)


def register_all(
    seed: int = 0,
    size: int = 100_000,
    eval_size: int = 2_000,
    levels: Sequence[int] = generators.LEVELS,
    vocab_name: str = "byte",
    vocab_dir: str | None = None,
) -> list[str]:
    """(Re)registers every style Task and mixture preset; returns the registered names.

    `size` problems per style in the train split, `eval_size` in rl / validation / test.
    """
    vocabulary = vocab_lib.get_vocabulary(vocab_name, vocab_dir)
    features = {
        "inputs": seqio.Feature(vocabulary, add_eos=False),
        "targets": seqio.Feature(vocabulary, add_eos=True),
    }
    sizes = {split: (size if split == "train" else eval_size) for split in generators.SPLITS}
    names = []
    for style in generators.STYLES:
        fn = functools.partial(
            _dataset_fn, style=style, data_seed=seed, sizes=sizes, levels=tuple(levels)
        )
        seqio.TaskRegistry.remove(task_name(style))
        seqio.TaskRegistry.add(
            task_name(style),
            source=seqio.FunctionDataSource(fn, splits=generators.SPLITS, num_input_examples=sizes),
            output_features=features,
            preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
            postprocess_fn=postprocess,
            metric_fns=[answer_accuracy],
        )
        names.append(task_name(style))
    for name, rates in mixtures.MIXTURES.items():
        seqio.MixtureRegistry.remove(mixture_name(name))
        seqio.MixtureRegistry.add(
            mixture_name(name), [(task_name(style), rate) for style, rate in rates.items()]
        )
        names.append(mixture_name(name))
    return names


def _real_dataset_fn(
    split: str, shuffle_files: bool, seed: int | None = None, *, sources: dict
) -> tf.data.Dataset:
    """The lines of one style's file: inputs = question + blank line, targets = the solution."""
    del shuffle_files, seed
    source = sources[split]

    def examples():
        for i in range(len(source)):
            ex = source[i]
            prompt = ex["question"] + "\n\n"
            yield {"inputs": prompt, "targets": ex["text"][len(prompt) :]}

    signature = {k: tf.TensorSpec((), tf.string) for k in ("inputs", "targets")}
    return tf.data.Dataset.from_generator(examples, output_signature=signature)


def register_real(
    real_dir: str = "",
    eval_examples: int = 64,
    vocab_name: str = "byte",
    vocab_dir: str | None = None,
) -> list[str]:
    """(Re)registers a Task per style file found in `real_dir` and every mixture preset whose
    files are all there; returns the registered names."""
    vocabulary = vocab_lib.get_vocabulary(vocab_name, vocab_dir)
    features = {
        "inputs": seqio.Feature(vocabulary, add_eos=False),
        "targets": seqio.Feature(vocabulary, add_eos=True),
    }
    sizes, names = {}, []
    for style in generators.STYLES:
        try:
            path = pretrain_files.style_file(real_dir, style)
        except MissingFileError:
            continue
        sources = {
            "train": pretrain_files.JsonlSource(path, start=eval_examples),
            "validation": pretrain_files.JsonlSource(path, stop=eval_examples),
        }
        sizes[style] = len(sources["train"])
        name = REAL_TASK_PREFIX + style
        seqio.TaskRegistry.remove(name)
        seqio.TaskRegistry.add(
            name,
            source=seqio.FunctionDataSource(
                functools.partial(_real_dataset_fn, sources=sources),
                splits=tuple(sources),
                num_input_examples={k: len(v) for k, v in sources.items()},
            ),
            output_features=features,
            preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
        )
        names.append(name)
    for mixture, rates in mixtures.MIXTURES.items():
        if not set(rates) <= set(sizes):
            continue
        repeats = pretrain_files.repeats(mixture)
        name = REAL_MIXTURE_PREFIX + mixture
        seqio.MixtureRegistry.remove(name)
        seqio.MixtureRegistry.add(
            name, [(REAL_TASK_PREFIX + s, repeats[s] * sizes[s]) for s in repeats]
        )
        names.append(name)
    return names


register_all()
