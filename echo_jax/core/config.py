"""Loading experiment configs (`configs/<family>.py:<variant>`) with one-line errors.

Configs are `get_config(variant) -> ConfigDict` files, overridden on the command line with
`--config.a.b=value` through `ml_collections.config_flags`. ml_collections reports a mistyped key
as a traceback; researchers get a single line naming the key and the closest valid one instead.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import ml_collections
from absl import flags
from etils import epath


class ConfigError(ValueError):
    """A config problem the user can fix: the message is one line and names the culprit."""


def check_variant(variant: str | None, valid: Sequence[str], family: str) -> str:
    """Used by every `get_config`: an unknown variant names the valid ones."""
    if variant not in valid:
        raise ConfigError(
            f"unknown variant {variant!r} for configs/{family}.py; valid: {', '.join(valid)}"
        )
    return variant


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
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ConfigError(f"config key {key!r}: cannot parse {text!r}") from None
    if isinstance(current, bool) != isinstance(value, bool) or not isinstance(
        value, (type(current), int) if isinstance(current, float) else type(current)
    ):
        raise ConfigError(f"config key {key!r} expects {type(current).__name__}, got {text!r}")
    return float(value) if isinstance(current, float) else value


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


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes the resolved config to `workdir/config.json`."""
    path = epath.Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(to_json(config) + "\n")
