"""Evaluation during RL: greedy pass@1, pass@k and style shares of the policy on held-out
synthetic test problems, per difficulty level."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np

from echo_jax.core import rng as rng_streams
from echo_jax.lm import eval as eval_lib
from echo_jax.lm import grading
from echo_jax.lm.data import generators
from echo_jax.lm.rl import common, rollout
from echo_jax.lm.sampler import SamplingParams, prompt_width


class PolicyEval:
    """On `eval.per_level` held-out test problems per level: greedy pass@1 and the greedy style
    shares; with `eval.num_samples` = n > 0 also unbiased pass@k (k = 1, 2, 4, ..., n) and the
    style shares of the samples. `eval/<metric>` averages the levels the policy is trained on.
    Shapes are fixed (two compiles in all) and every evaluation draws with the same key."""

    def __init__(self, config: ml_collections.ConfigDict, sampler: Any, vocabulary: Any):
        e = config.eval
        self.sampler, self.vocabulary, self.num_samples = sampler, vocabulary, e.num_samples
        self.timeout_s, self.grader = config.rl.grade_timeout_s, config.rl.grader
        self.problems = {
            level: [
                generators.ProblemSource("test", config.seed, (level,), e.per_level)[i]
                for i in range(e.per_level)
            ]
            for level in e.levels
        }
        self.train_levels = [lv for lv in e.levels if lv in config.data.levels]
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
                dataset="synthetic",
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
        per_level: dict[int, dict[str, float]] = {}
        for level, problems in self.problems.items():
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
            per_level[level] = out
        row = {f"eval/L{lv}/{k}": v for lv, out in per_level.items() for k, v in out.items()}
        if self.train_levels:
            for key in per_level[self.train_levels[0]]:
                row[f"eval/{key}"] = float(
                    np.mean([per_level[lv][key] for lv in self.train_levels])
                )
        return row
