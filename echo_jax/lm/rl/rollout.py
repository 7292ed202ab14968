"""The host side of an RL step: encode prompts, sample with the current policy, decode, grade in
the sandbox, and the rollout's metrics.

Prompts are padded to `max_prompt_len` and completions to `max_new_tokens`, so every RL step has
the same shapes and nothing recompiles. Metrics per rollout: `reward_mean`, `accuracy`,
`response_length`, `style_share/<style>`, `style_accuracy/<style>` (styles present).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from echo_jax.lm import grading
from echo_jax.lm.rl.common import RolloutInfo
from echo_jax.lm.sampler import Sampler, SamplingParams, pad_prompts


def encode_prompts(
    questions: Sequence[str], vocabulary: Any, max_prompt_len: int
) -> list[list[int]]:
    """`question + "\\n\\n"`, the pretraining layout without the solution (no chat template)."""
    prompts = [list(vocabulary.encode(q + "\n\n")) for q in questions]
    longest = max(len(p) for p in prompts)
    if longest > max_prompt_len:
        raise ValueError(f"a prompt has {longest} tokens > max_prompt_len {max_prompt_len}")
    return prompts


def decode_completions(tokens_BxN: np.ndarray, lengths_B: np.ndarray, vocabulary: Any) -> list[str]:
    """Text of each completion (the vocabulary drops EOS and everything after it)."""
    return [vocabulary.decode(row[:n].tolist()) for row, n in zip(tokens_BxN, lengths_B)]


@dataclasses.dataclass(frozen=True)
class Sample:
    """One graded rollout: device-side prompts and sampler output, host-side `RolloutInfo`."""

    prompts_BxP: np.ndarray
    prompt_lengths_B: np.ndarray
    completions_BxN: jax.Array
    completion_lengths_B: jax.Array
    info: RolloutInfo
    seconds_sampling: float
    seconds_grading: float


def sample_and_grade(
    sampler: Sampler,
    params: Any,
    problems: Sequence[dict],
    vocabulary: Any,
    sampling: SamplingParams,
    samples_per_prompt: int,
    max_prompt_len: int,
    rng: jax.Array,
    *,
    dataset: str,
    grade_timeout_s: float = 2.0,
    rows_per_call: int = 0,
    grader: str = "strict",
    grade_with_prompt: bool = True,
) -> Sample:
    """Samples `samples_per_prompt` completions of each problem ({"question", "answer"}; rows
    are prompt-major) and grades them: reward 1 if the extracted answer is correct, else 0.
    `rows_per_call` > 0 samples that many rows at a time, so the KV cache does not grow with
    the rollout (it must divide the rows). `grader` is `grading.grade_batch`'s rule; the study's
    ("paper") grades the prompt + completion (`grade_with_prompt`, as its RL reward does; its
    evaluation grades completions alone) against GSM8K's full solution where a problem has one."""
    start = time.perf_counter()
    repeat = lambda xs: [x for x in xs for _ in range(samples_per_prompt)]
    questions = repeat([p["question"] for p in problems])
    prompts = encode_prompts([p["question"] for p in problems], vocabulary, max_prompt_len)
    prompts_BxP, prompt_lengths_B = pad_prompts(repeat(prompts), length_multiple=max_prompt_len)
    rows = len(prompts_BxP)
    chunk = rows_per_call or rows
    if rows % chunk:
        raise ValueError(f"rows_per_call {chunk} does not divide the {rows} rows of a rollout")
    outs = [
        sampler(
            params,
            prompts_BxP[i : i + chunk],
            prompt_lengths_B[i : i + chunk],
            rng if chunk == rows else jax.random.fold_in(rng, i),
            sampling,
        )
        for i in range(0, rows, chunk)
    ]
    out = jax.tree.map(lambda *xs: jnp.concatenate(xs) if len(xs) > 1 else xs[0], *outs)
    tokens_BxN, lengths_B, stopped_B = jax.device_get(
        (out.tokens_BxN, out.lengths_B, out.stopped_B)
    )
    sampled = time.perf_counter()
    texts = decode_completions(tokens_BxN, lengths_B, vocabulary)
    if grader == "paper":
        refs = repeat([str(p.get("solution", p["answer"])) for p in problems])
    else:
        refs = repeat([str(p["answer"]) for p in problems])
    graded = grading.grade_batch(
        texts,
        refs,
        dataset=dataset,
        timeout_s=grade_timeout_s,
        rule=grader,
        prompts=[q + "\n\n" for q in questions] if grade_with_prompt else None,
    )
    info = RolloutInfo(
        questions=tuple(questions),
        texts=tuple(texts),
        styles=tuple(g.style for g in graded),
        rewards=np.array([g.reward for g in graded], np.float32),
        correct=np.array([g.correct for g in graded]),
        lengths=np.asarray(lengths_B),
        stopped=np.asarray(stopped_B, bool),
    )
    return Sample(
        prompts_BxP,
        prompt_lengths_B,
        out.tokens_BxN,
        out.lengths_B,
        info,
        sampled - start,
        time.perf_counter() - sampled,
    )


def _columns(info: RolloutInfo) -> list:
    return [getattr(info, f.name) for f in dataclasses.fields(info)]


def truncate_info(info: RolloutInfo, rows: int) -> RolloutInfo:
    return RolloutInfo(*(column[:rows] for column in _columns(info)))


def concat_infos(infos: Sequence[RolloutInfo]) -> RolloutInfo:
    columns = zip(*(_columns(i) for i in infos))
    return RolloutInfo(
        *(np.concatenate(c) if isinstance(c[0], np.ndarray) else sum(c, ()) for c in columns)
    )


def rollout_metrics(info: RolloutInfo) -> dict[str, float]:
    """Reward, accuracy, response length and, per style label, its share and accuracy."""
    styles = np.asarray(info.styles)
    out = {
        "reward_mean": float(info.rewards.mean()),
        "accuracy": float(info.correct.mean()),
        "response_length": float(info.lengths.mean()),
        "truncated": float(1.0 - info.stopped.mean()),
    }
    for style in grading.STYLE_LABELS:
        rows = styles == style
        out[f"style_share/{style}"] = float(rows.mean())
        if rows.any():
            out[f"style_accuracy/{style}"] = float(info.correct[rows].mean())
    return out


def flat_groups(info: RolloutInfo, samples_per_prompt: int) -> np.ndarray:
    """[Q] whether each prompt's G rewards are all equal (a group no baseline learns from)."""
    r_QxG = np.asarray(info.rewards).reshape(-1, samples_per_prompt)
    return np.all(r_QxG == r_QxG[:, :1], axis=1)


def select_groups(
    samples: Sequence[Sample], picks: Sequence[tuple[int, int]], samples_per_prompt: int
) -> Sample:
    """A rollout of the groups `picks` = [(sample index, group index)] of `samples`, in order
    (all of one compiled shape); its times are the samples' sums."""
    G = samples_per_prompt
    rows = [(s, g * G + j) for s, g in picks for j in range(G)]
    take = lambda get: np.stack([np.asarray(get(samples[s]))[r] for s, r in rows])
    columns = {
        f.name: [getattr(samples[s].info, f.name)[r] for s, r in rows]
        for f in dataclasses.fields(RolloutInfo)
    }
    as_before = lambda name, values: (  # tuples of strings stay tuples, arrays arrays
        tuple(values) if isinstance(getattr(samples[0].info, name), tuple) else np.asarray(values)
    )
    info = RolloutInfo(**{name: as_before(name, values) for name, values in columns.items()})
    return Sample(
        take(lambda s: s.prompts_BxP),
        take(lambda s: s.prompt_lengths_B),
        take(lambda s: s.completions_BxN),
        take(lambda s: s.completion_lengths_B),
        info,
        sum(s.seconds_sampling for s in samples),
        sum(s.seconds_grading for s in samples),
    )
