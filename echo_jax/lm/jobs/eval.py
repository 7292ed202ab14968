"""The `lm_eval` job: a checkpoint evaluated on a math dataset the way study A does (STUDIES.md A,
"Evaluation"); the metrics are `echo_jax.lm.eval`'s.

Prompts are `question + "\\n\\n"` (the pretraining format, no chat template); generation stops at
EOS or after `sampling.max_new_tokens`. Each prompt gets one greedy completion and n sampled ones.

Files written to the workdir:
- `samples.jsonl`: one line per prompt: id, question, answer, level (synthetic), `greedy` and
  `samples` (each completion: text, pred, style, correct, length, stopped). Prompts are appended a
  chunk at a time; a rerun skips those already there (resume after a cut-off run).
- `eval_meta.json`: what the samples were drawn with; a rerun with another setup is refused.
- `eval.json`: the keys in `eval.METRIC_KEYS` (see `eval.summarize`), and for `synthetic` the
  same metrics per difficulty level under `by_level`.

`all_checkpoints=True` evaluates every checkpoint of the run instead (`eval_steps`).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import jax
import ml_collections
from tqdm import tqdm

from echo_jax.core import sharding, stages
from echo_jax.core import workdir as workdir_lib
from echo_jax.core.config import ConfigError
from echo_jax.core.files import read_jsonl
from echo_jax.lm import cpu, grading, restore
from echo_jax.lm import sampler as sampler_lib
from echo_jax.lm.data import generators, real, vocab
from echo_jax.lm.eval import summarize

META_FILE = "eval_meta.json"
RESULT_FILE = "eval.json"
# An evaluation may resume with other batching (the samples do not depend on it) or a later
# checkpoint step of the same run (`eval_meta.json` is the guard of what was evaluated).
EVAL_MAY_CHANGE = (
    *workdir_lib.RESUME_MAY_CHANGE,
    "batch_size",
    "chunk_prompts",
    "grading_timeout_s",
    "checkpoint",
    "checkpoint_step",
)


def load_examples(config: ml_collections.ConfigDict) -> list[dict]:
    """The prompts of `config.dataset`: dicts with id, question, answer (str) and maybe level."""
    name = config.dataset
    if name == "synthetic":
        examples = [
            {
                "id": f"L{level}-{item['uid']}",
                "question": item["question"],
                "answer": str(item["answer"]),
                "level": level,
            }
            for level in config.synthetic.levels
            for item in generators.ProblemSource(
                "test", config.seed, (level,), config.synthetic.per_level
            )
        ]
    elif name == "gsm8k":
        examples = real.load_gsm8k("test")
    elif name == "math500":
        examples = real.load_math500()
    elif name in real.AIME_SETS:
        examples = real.load_aime(name)
    else:
        raise ConfigError(f"unknown dataset {name!r}; valid: {', '.join(grading.DATASETS)}")
    keys = ("id", "question", "answer", "level")
    if name == "gsm8k":  # its full solution is the study's label (the paper grader's gold)
        keys += ("solution",)
    examples = [{k: e[k] for k in keys if k in e} for e in examples]
    return examples[: config.num_examples] if config.num_examples else examples


def eval_meta(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """What an eval's results depend on (`eval_meta.json`): `run_eval` refuses to resume a
    workdir written with other values."""
    meta = {
        "dataset": config.dataset,
        "checkpoint": str(restore.checkpoint_dir(config.checkpoint)),
        "step": config.checkpoint_step or restore.latest_step(config.checkpoint),
        "vocab": restore.vocab_name(config.checkpoint),
        "seed": config.seed,
        "sampling": config.sampling.to_dict(),
        "chunk_prompts": config.chunk_prompts,
        "grader": config.grader,
        "synthetic": config.synthetic.to_dict() if config.dataset == "synthetic" else None,
    }
    return json.loads(json.dumps(meta))  # tuples as lists, as they come back from the file


def reuse_or_move_aside(config: ml_collections.ConfigDict, workdir: str) -> bool:
    """True if `workdir` holds a finished eval that `config` would produce now.

    Otherwise an eval there (finished or not) of other settings or of an older checkpoint step,
    as after RL was extended, is renamed to `<workdir>.old<N>`, so the next `run_eval` starts
    afresh and nothing is lost. Single-host, like the echo_chamber pipeline that calls it.
    """
    return stages.reuse_or_move_aside(
        workdir,
        eval_meta(config),
        filename=META_FILE,
        done_file=RESULT_FILE,
        label="eval",
        why="an eval of other settings or another checkpoint step",
    )


def _generate(
    sampler,
    params,
    prompts: list[list[int]],
    width: int,
    batch_size: int,
    sampling: sampler_lib.SamplingParams,
    rng: jax.Array,
) -> list[tuple[list[int], bool]]:
    """(tokens without the EOS, stopped) per prompt, in fixed-shape batches (one compile)."""
    out = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        prompts_BxP, lengths_B = sampler_lib.pad_prompts(batch, width, batch_size)
        res = jax.device_get(
            sampler(params, prompts_BxP, lengths_B, jax.random.fold_in(rng, start), sampling)
        )
        for i in range(len(batch)):
            stopped = bool(res.stopped_B[i])
            out.append((res.tokens_BxN[i, : res.lengths_B[i] - stopped].tolist(), stopped))
    return out


def run_eval(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    if config.all_checkpoints:
        from echo_jax.lm.jobs.eval_steps import run_eval_steps  # it builds on this module

        return run_eval_steps(config, workdir)
    if not config.checkpoint:
        raise ConfigError("config.checkpoint is required: a pretraining workdir")
    if config.grader not in grading.GRADERS:
        raise ConfigError(f"grader must be one of {grading.GRADERS}, got {config.grader!r}")
    examples = load_examples(config)  # before the model: a missing data file fails fast
    mesh = sharding.make_mesh(config.mesh.to_dict())
    if config.batch_size % sharding.batch_divisor(mesh):
        raise ConfigError(
            f"batch_size {config.batch_size} is not divisible by the "
            f"{sharding.batch_divisor(mesh)} data x fsdp shards of the mesh"
        )
    meta = eval_meta(config)
    step, vocab_name, sp = meta["step"], meta["vocab"], config.sampling
    os.makedirs(workdir, exist_ok=True)
    stages.check_workdir(workdir, meta, filename=META_FILE, what="an eval")
    started = os.path.exists(os.path.join(workdir, "samples.jsonl"))
    workdir_lib.record_run(
        workdir, config, may_change=EVAL_MAY_CHANGE, label="eval", started=started
    )

    cpu.prepare(restore.model_config(config.checkpoint, step), mesh)
    cfg, params = restore.load_params(config.checkpoint, step, mesh)
    vocabulary = vocab.get_vocabulary(vocab_name)
    sampler = sampler_lib.Sampler(
        cfg,
        eos_id=vocabulary.eos_id,
        pad_id=vocabulary.pad_id,
        mesh=mesh,
        rules=config.sharding.rules,
    )
    max_new = sp.max_new_tokens or cfg.max_len
    greedy = sampler_lib.SamplingParams(max_new)
    sampled = sampler_lib.SamplingParams(max_new, sp.temperature, sp.top_k, sp.top_p)
    prompts = {e["id"]: list(vocabulary.encode(e["question"] + "\n\n")) for e in examples}
    width = sampler_lib.prompt_width(max(len(p) for p in prompts.values()))
    key = jax.random.key(config.seed)

    path = os.path.join(workdir, "samples.jsonl")
    done = {r["id"] for r in read_jsonl(path, repair=True)}
    todo = [(i, e) for i, e in enumerate(examples) if e["id"] not in done]
    bar = tqdm(
        total=len(examples),
        initial=len(examples) - len(todo),
        unit="prompt",
        desc=f"eval {config.dataset}",
        file=sys.stderr,
    )
    for start in range(0, len(todo), config.chunk_prompts):
        chunk = todo[start : start + config.chunk_prompts]
        rng = jax.random.fold_in(key, chunk[0][0])
        ids = [prompts[e["id"]] for _, e in chunk]
        outputs = _generate(sampler, params, ids, width, config.batch_size, greedy, rng)
        if sp.num_samples:
            repeated = [p for p in ids for _ in range(sp.num_samples)]
            outputs += _generate(sampler, params, repeated, width, config.batch_size, sampled, rng)
        texts = [vocabulary.decode(tokens) for tokens, _ in outputs]
        answer = "solution" if config.grader == "paper" else "answer"  # the study's label
        refs = [e.get(answer, e["answer"]) for _, e in chunk]
        refs += [r for r in refs for _ in range(sp.num_samples)]
        graded = grading.grade_batch(
            texts,
            refs,
            dataset=config.dataset,
            timeout_s=config.grading_timeout_s,
            rule=config.grader,  # the study's evaluation grades completions alone
        )
        completions = [
            {
                "text": t,
                "pred": g.answer,
                "style": g.style,
                "correct": g.correct,
                "status": g.status,
                **({"error": g.error} if g.error else {}),
                "length": len(tokens),
                "stopped": stopped,
            }
            for t, g, (tokens, stopped) in zip(texts, graded, outputs)
        ]
        with open(path, "a") as f:
            for j, (_, e) in enumerate(chunk):
                first = len(chunk) + j * sp.num_samples
                record = {
                    **e,
                    "greedy": completions[j],
                    "samples": completions[first : first + sp.num_samples],
                }
                f.write(json.dumps(record) + "\n")
        bar.update(len(chunk))
    bar.close()

    wanted = {e["id"] for e in examples}
    records = [r for r in read_jsonl(path, repair=True) if r["id"] in wanted]
    metrics = {
        "dataset": config.dataset,
        "checkpoint": meta["checkpoint"],
        "step": step,
        "sampling": {**sp.to_dict(), "max_new_tokens": max_new},
        **summarize(records),
    }
    if config.dataset == "synthetic":
        metrics["by_level"] = {
            str(level): summarize([r for r in records if r["level"] == level])
            for level in config.synthetic.levels
        }
    with open(os.path.join(workdir, RESULT_FILE), "w") as f:
        json.dump(metrics, f, indent=2)
    print(
        f"[eval] {config.dataset} step {step}: greedy pass@1 {metrics['greedy_pass@1']:.3f}, "
        + ", ".join(f"pass@{k} {v:.3f}" for k, v in metrics["pass@k"].items()),
        file=sys.stderr,
    )
    return metrics
