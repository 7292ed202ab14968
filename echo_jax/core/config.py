"""Loading experiment configs (`configs/<family>.py:<variant>`) with one-line errors.

Configs are `get_config(variant) -> ConfigDict` files, overridden on the command line with
`--config.a.b=value` through `ml_collections.config_flags`. ml_collections reports a mistyped key
as a traceback; researchers get a single line naming the key and the closest valid one instead.
"""

from __future__ import annotations

import ast
import difflib
import fnmatch
import importlib.util
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import ml_collections
from absl import flags


class ConfigError(ValueError):
    """A mistake the user can fix (a config value, a data file, a workdir, a checkpoint): the
    message is one line naming the culprit; `main` prints it and exits 2."""


class MissingFileError(ConfigError):
    """A data file, checkpoint or run folder the config points at does not exist."""


def check_variant(variant: str | None, valid: Sequence[str], family: str) -> str:
    """Used by every `get_config`: an unknown variant names the valid ones."""
    if variant not in valid:
        raise ConfigError(
            f"unknown variant {variant!r} for configs/{family}.py; valid: {', '.join(valid)}"
        )
    return variant


def resume_options() -> ml_collections.ConfigDict:
    """Every config's `resume` block: `allow_changes` lets a resume change settings outside the
    allow-list, recorded in the workdir's `config_history.jsonl` (`core.workdir.record_run`)."""
    return ml_collections.ConfigDict({"allow_changes": False})


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Loads `path/to/file.py[:variant]` by calling its `get_config(variant)`."""
    path, _, variant = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    module_spec = importlib.util.spec_from_file_location(
        f"_echo_jax_config_{abs(hash(path))}", path
    )
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config(variant)")
    return module.get_config(variant) if variant else module.get_config()


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """All dotted leaf keys, e.g. ['seed', 'train.num_steps', ...]."""
    keys = []
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            keys.extend(flat_keys(value, path + "."))
        else:
            keys.append(path)
    return keys


def check_keys(config: ml_collections.ConfigDict, keys: Sequence[str]) -> None:
    """Raises ConfigError for the first key that the config does not have."""
    valid = flat_keys(config)
    prefixes = {k.rsplit(".", i)[0] for k in valid for i in range(k.count(".") + 1)}
    for key in keys:
        if key not in valid and key not in prefixes:
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown config key {key!r}{hint}")


def _parse_value(key: str, text: str, current: Any) -> Any:
    if isinstance(current, str) or current is None:
        return text
    if isinstance(current, float):  # as the command line reads it: "nan" and "inf" parse too
        try:
            return float(text)
        except ValueError:
            pass
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ConfigError(f"config key {key!r}: cannot parse {text!r}") from None
    if isinstance(current, bool) != isinstance(value, bool) or not isinstance(
        value, (type(current), int) if isinstance(current, float) else type(current)
    ):
        raise ConfigError(f"config key {key!r} expects {type(current).__name__}, got {text!r}")
    return float(value) if isinstance(current, float) else value


# Value rules by leaf name (`fnmatch`, first match wins); every float must also be finite.
_AT_LEAST_ONE = "an integer >= 1"
_NON_NEGATIVE = "an integer >= 0"
_VALUE_RULES = (
    (("log_every", "checkpoint_every"), _AT_LEAST_ONE),  # before "*_every" (0 = off elsewhere)
    (("sampler_batch_size", "max_new_tokens", "top_k", "num_samples", "per_level"), _NON_NEGATIVE),
    (("*_step", "*_every", "warmup_steps", "attention_block", "text_layers"), _NON_NEGATIVE),
    (
        ("num_examples", "epochs", "log_checkpoints", "dynamic_sampling", "sft_tokens"),
        _NON_NEGATIVE,
    ),
    (("seed", "seeds", "*_seed"), _NON_NEGATIVE),
    (
        ("*batch_size", "num_steps", "train_steps", "iterations", "*_len"),
        _AT_LEAST_ONE,
    ),
    (
        ("keep_checkpoints", "prompts_per_step", "samples_per_prompt", "rounds"),
        _AT_LEAST_ONE,
    ),
    (
        ("d_model", "mlp_dim", "n_heads", "n_layers", "num_heads", "num_layers", "dim"),
        _AT_LEAST_ONE,
    ),
    (("vocab_size", "num_users", "num_items", "num_topics", "chunk_prompts"), _AT_LEAST_ONE),
    (("eval_examples", "examples_per_style"), _AT_LEAST_ONE),
    (("*lr", "weight_decay", "*kl_coef", "grad_clip", "*timeout_s", "click_eta"), ">= 0"),
    (("temperature",), "> 0"),
    (("top_p",), "in (0, 1]"),
    (
        ("*_ratio", "*_share", "*_prob", "dropout", "rewrite_strength", "denoise", "praise"),
        "in [0, 1]",
    ),
)
_CHECKS = {
    _AT_LEAST_ONE: lambda v: isinstance(v, int) and v >= 1,
    _NON_NEGATIVE: lambda v: isinstance(v, int) and v >= 0,
    ">= 0": lambda v: v >= 0,
    "> 0": lambda v: v > 0,
    "in (0, 1]": lambda v: 0 < v <= 1,
    "in [0, 1]": lambda v: 0 <= v <= 1,
}


def _leaves(config: ml_collections.ConfigDict, prefix: str = ""):
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", key, value


def validate(config: ml_collections.ConfigDict) -> None:
    """Refuses values no run can use, before anything is written: a NaN or infinite float
    anywhere; sizes, step counts and cadences that must be >= 1; seeds and counts that must be
    >= 0; rates and probabilities out of range (`_VALUE_RULES`, by leaf name, also applied to
    each element of a tuple). `ConfigError` naming the key, its value and the rule."""
    for path, name, value in _leaves(config):
        values = value if isinstance(value, (tuple, list)) else (value,)
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        for v in numbers:
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"config key {path!r} is {v}; it must be a finite number")
        rule = next(
            (
                r
                for patterns, r in _VALUE_RULES
                if any(fnmatch.fnmatchcase(name, p) for p in patterns)
            ),
            None,
        )
        if rule is None or not numbers:
            continue
        for v in numbers:
            if not _CHECKS[rule](v):
                raise ConfigError(f"config key {path!r} is {value!r}; it must be {rule}")


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Loads a config and applies `a.b=value` overrides, as the command line does (for tests and
    notebooks that do not go through absl flags)."""
    config = load_config_file(spec)
    pairs = [o.split("=", 1) for o in overrides]
    check_keys(config, [k for k, _ in pairs])
    for key, text in pairs:
        node = config
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = _parse_value(key, text, node[leaf])
    config.lock()
    return config


def parse_flags_with_clear_errors(argv: list[str]) -> list[str]:
    """An absl `flags_parser` that validates `--config` and its overrides up front so that every
    mistake exits with status 2 and one line on stderr."""
    spec = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")), None)
    try:
        if spec is not None:
            overrides = [
                a[len("--config.") :].split("=", 1)[0]
                for a in argv[1:]
                if a.startswith("--config.")
            ]
            check_keys(load_config_file(spec), overrides)
        return flags.FLAGS(argv)
    except (ConfigError, flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"echo_jax: error: {message}", file=sys.stderr)
        sys.exit(2)
