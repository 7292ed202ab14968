"""Evaluation during RL: greedy pass@1, pass@k and style shares of the policy on held-out
problems of the dataset RL trains on: synthetic test problems per difficulty level, or GSM8K test
questions when the prompts are GSM8K's."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np

from echo_jax.core import rng as rng_streams
from echo_jax.core.config import ConfigError
from echo_jax.lm import eval as eval_lib
from echo_jax.lm import grading
from echo_jax.lm.data import generators, real
from echo_jax.lm.rl import common, rollout
from echo_jax.lm.sampler import SamplingParams, prompt_width


def eval_groups(
    config: ml_collections.ConfigDict, vocabulary: Any
) -> tuple[str, dict[str, list[dict]], list[str]]:
    """(dataset, group name -> problems, the groups the policy trains on): `eval.per_level`
    synthetic test problems per level ("L1", ...; trained: `data.levels`), or the first
    `eval.per_level` GSM8K test questions that fit `rl.max_prompt_len` ("gsm8k")."""
    e = config.eval
    if config.data.prompts == "gsm8k":
        fits = [
            q
            for q in real.load_gsm8k("test")
            if len(vocabulary.encode(q["question"] + "\n\n")) <= config.rl.max_prompt_len
        ]
        if not fits:
            raise ConfigError(
                f"no GSM8K test question fits rl.max_prompt_len={config.rl.max_prompt_len}"
            )
        return "gsm8k", {"gsm8k": fits[: e.per_level]}, ["gsm8k"]
    groups = {
        f"L{level}": [
            generators.ProblemSource("test", config.seed, (level,), e.per_level)[i]
            for i in range(e.per_level)
        ]
        for level in e.levels
    }
    return "synthetic", groups, [f"L{lv}" for lv in e.levels if lv in config.data.levels]


class PolicyEval:
    """On the `eval_groups` problems: greedy pass@1 and the greedy style shares; with
    `eval.num_samples` = n > 0 also unbiased pass@k (k = 1, 2, 4, ..., n) and the style shares of
    the samples, as `eval/<group>/<metric>`; `eval/<metric>` averages the groups the policy is
    trained on. Shapes are fixed (two compiles in all) and every evaluation draws with the same
    key."""

    def __init__(self, config: ml_collections.ConfigDict, sampler: Any, vocabulary: Any):
        e = config.eval
        self.sampler, self.vocabulary, self.num_samples = sampler, vocabulary, e.num_samples
        self.timeout_s, self.grader = config.rl.grade_timeout_s, config.rl.grader
        self.dataset, self.problems, self.train_groups = eval_groups(config, vocabulary)
        longest = max(
            len(vocabulary.encode(p["question"] + "\n\n"))
            for ps in self.problems.values()
            for p in ps
        )
        self.width = prompt_width(longest)
        self.greedy = SamplingParams(e.max_new_tokens)
        self.sampled = SamplingParams(e.max_new_tokens, e.temperature, top_p=e.top_p)
        self.greedy_rows = min(e.batch_size, e.per_level)
        self.sampled_prompts = max(e.batch_size // max(e.num_samples, 1), 1)
        self.rng = jax.random.key(config.seed + rng_streams.RL_EVAL)

    def _run(
        self,
        params,
        problems: list[dict],
        sampling: SamplingParams,
        samples: int,
        prompts_per_call: int,
    ) -> common.RolloutInfo:
        infos = []
        for start in range(0, len(problems), prompts_per_call):
            chunk = problems[start : start + prompts_per_call]
            real_rows = len(chunk) * samples
            chunk = chunk + [chunk[-1]] * (prompts_per_call - len(chunk))
            sample = rollout.sample_and_grade(
                self.sampler,
                params,
                chunk,
                self.vocabulary,
                sampling,
                samples,
                self.width,
                jax.random.fold_in(self.rng, start),
                dataset=self.dataset,
                grade_timeout_s=self.timeout_s,
                grader=self.grader,
                grade_with_prompt=False,  # as the study's evaluation script grades
            )
            infos.append(rollout.truncate_info(sample.info, real_rows))
        return rollout.concat_infos(infos)

    @staticmethod
    def _shares(info: common.RolloutInfo, prefix: str) -> dict[str, float]:
        styles = np.asarray(info.styles)
        return {f"{prefix}/{s}": float((styles == s).mean()) for s in grading.STYLE_LABELS}

    def __call__(self, params: Any) -> dict[str, float]:
        per_group: dict[str, dict[str, float]] = {}
        for group, problems in self.problems.items():
            greedy = self._run(params, problems, self.greedy, 1, self.greedy_rows)
            out = {
                "greedy_pass@1": float(greedy.correct.mean()),
                **self._shares(greedy, "greedy_share"),
            }
            if self.num_samples:
                n = self.num_samples
                sampled = self._run(params, problems, self.sampled, n, self.sampled_prompts)
                correct = sampled.correct.reshape(len(problems), n).sum(-1)
                out.update(
                    {
                        f"pass@{k}": float(
                            np.mean([eval_lib.pass_at_k(n, int(c), k) for c in correct])
                        )
                        for k in eval_lib.k_ladder(n)
                    }
                )
                out.update(self._shares(sampled, "sampled_share"))
            per_group[group] = out
        row = {f"eval/{g}/{k}": v for g, out in per_group.items() for k, v in out.items()}
        if self.train_groups:
            for key in per_group[self.train_groups[0]]:
                row[f"eval/{key}"] = float(np.mean([per_group[g][key] for g in self.train_groups]))
        return row
