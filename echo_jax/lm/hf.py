"""Hugging Face causal LMs in and out of echo_jax workdirs.

    python -m echo_jax.lm.hf import HF_DIR WORKDIR   # config.json, *.safetensors, tokenizer.json
    python -m echo_jax.lm.hf export WORKDIR HF_DIR   # what AutoModelForCausalLM/AutoTokenizer load

`import` writes an echo_jax language-model workdir: `config.json` (kind "hf_import", the model and
`data.vocab = "hf:WORKDIR/tokenizer"`), an Orbax checkpoint of the parameters at step 0 and
`tokenizer/` (`tokenizer.json`, the special-token ids from the model's config). `lm_rl
--config.init_from`, `lm_eval --config.checkpoint` and `restore.load_params` read it like a
pretraining workdir. `export` writes float32 `model.safetensors`, `config.json` and the tokenizer
of any language-model workdir whose model one of the architectures expresses.

Architectures (`transformers` names): `OlmoForCausalLM` (OLMo-1: non-parametric LayerNorm with eps
1e-5, optional `clip_qkv`) and `LlamaForCausalLM` (RMSNorm with the config's eps, grouped-query
attention); both SwiGLU, rotate-half RoPE with the config's theta, no biases, tied or untied
embeddings. Weights are read in any float dtype and kept in float32.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from safetensors import safe_open
from safetensors.numpy import save_file

from echo_jax.core.checkpoint import Checkpointer
from echo_jax.core.config import ConfigError, MissingFileError
from echo_jax.lm import restore
from echo_jax.lm.data import hf_vocab
from echo_jax.lm.model import ModelConfig, Transformer, config_meta

IMPORT_KIND = "hf_import"
OLMO, LLAMA = "OlmoForCausalLM", "LlamaForCausalLM"
OLMO_NORM_EPS = 1e-5  # transformers' OlmoLayerNorm fixes it
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, list) and value else value


def model_config(hf: dict) -> ModelConfig:
    """The `ModelConfig` of a Hugging Face `config.json`; `ConfigError` naming what it cannot
    express."""
    arch = _first(hf.get("architectures")) or ""
    if arch not in (OLMO, LLAMA):
        raise ConfigError(f"architecture {arch!r} is not supported; supported: {OLMO}, {LLAMA}")
    heads, width = hf["num_attention_heads"], hf["hidden_size"]
    # transformers 5 writes `rope_parameters`, earlier versions `rope_theta` and `rope_scaling`
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    unsupported = {
        "hidden_act": (hf.get("hidden_act", "silu"), "silu"),
        "attention_bias": (bool(hf.get("attention_bias", False)), False),
        "mlp_bias": (bool(hf.get("mlp_bias", False)), False),
        "rope_type": (rope.get("rope_type", rope.get("type", "default")), "default"),
        "head_dim": (hf.get("head_dim") or width // heads, width // heads),
        "pretraining_tp": (hf.get("pretraining_tp", 1), 1),
    }
    for key, (value, wanted) in unsupported.items():
        if value != wanted:
            raise ConfigError(f"{arch} with {key}={value!r} is not supported (only {wanted!r})")
    kv_heads = hf.get("num_key_value_heads") or heads
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        d_model=width,
        n_layers=hf["num_hidden_layers"],
        n_heads=heads,
        mlp_dim=hf["intermediate_size"],
        max_len=hf["max_position_embeddings"],
        norm="layernorm" if arch == OLMO else "rms",
        norm_eps=OLMO_NORM_EPS if arch == OLMO else float(hf.get("rms_norm_eps", 1e-6)),
        n_kv_heads=0 if kv_heads == heads else kv_heads,
        clip_qkv=float(hf.get("clip_qkv") or 0.0),
        tied_embeddings=bool(hf.get("tie_word_embeddings", False)),  # transformers' default
        rope_theta=float(rope.get("rope_theta") or hf.get("rope_theta") or 10_000.0),
    )


def _layer_names(cfg: ModelConfig, i: int) -> dict[tuple[str, ...], str]:
    """Our parameter path -> its `transformers` tensor name, for layer i."""
    hf = f"model.layers.{i}."
    ours = (f"block_{i}",)
    names = {
        (*ours, "attn", "q"): hf + "self_attn.q_proj.weight",
        (*ours, "attn", "k"): hf + "self_attn.k_proj.weight",
        (*ours, "attn", "v"): hf + "self_attn.v_proj.weight",
        (*ours, "attn", "out"): hf + "self_attn.o_proj.weight",
        (*ours, "mlp", "w_gate"): hf + "mlp.gate_proj.weight",
        (*ours, "mlp", "w_up"): hf + "mlp.up_proj.weight",
        (*ours, "mlp", "wo"): hf + "mlp.down_proj.weight",
    }
    if cfg.norm == "rms":
        names[(*ours, "attn_norm", "scale")] = hf + "input_layernorm.weight"
        names[(*ours, "mlp_norm", "scale")] = hf + "post_attention_layernorm.weight"
    return names


def tensor_names(cfg: ModelConfig) -> dict[tuple[str, ...], str]:
    names = {("embedding",): "model.embed_tokens.weight"}
    for i in range(cfg.n_layers):
        names.update(_layer_names(cfg, i))
    if cfg.norm == "rms":
        names[("final_norm", "scale")] = "model.norm.weight"
    if not cfg.tied_embeddings:
        names[("unembed",)] = "lm_head.weight"
    return names


def _from_torch(path: tuple[str, ...], w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """A `transformers` tensor ([out, in] linear weights) in our layout."""
    D, K = cfg.d_model, cfg.head_dim
    leaf = path[-1]
    if leaf in ("q", "k", "v"):
        return w.T.reshape(D, -1, K)
    if leaf == "out":
        return w.T.reshape(-1, K, D)
    if leaf in ("w_gate", "w_up", "wo", "unembed"):
        return w.T
    return w


def _to_torch(path: tuple[str, ...], w: np.ndarray) -> np.ndarray:
    leaf = path[-1]
    if leaf in ("q", "k", "v"):
        return w.reshape(w.shape[0], -1).T
    if leaf == "out":
        return w.reshape(-1, w.shape[-1]).T
    if leaf in ("w_gate", "w_up", "wo", "unembed"):
        return w.T
    return w


def _read_tensors(hf_dir: pathlib.Path) -> dict[str, np.ndarray]:
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise MissingFileError(f"no *.safetensors in {hf_dir}")
    tensors = {}
    for path in files:
        with safe_open(str(path), framework="flax") as f:
            for name in f.keys():
                tensors[name] = np.asarray(f.get_tensor(name).astype(jnp.float32))
    return tensors


def _abstract_params(cfg: ModelConfig) -> dict:
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    shapes = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), tokens, tokens, tokens)
    return nn.meta.unbox(shapes["params"])


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def params_from_hf(cfg: ModelConfig, tensors: dict[str, np.ndarray]) -> dict:
    """Our parameter tree from `transformers` tensors; `ConfigError` on a missing, left-over or
    misshapen tensor."""
    names = tensor_names(cfg)
    tied_copy = {"lm_head.weight"} if cfg.tied_embeddings else set()  # some tied models save it
    leftover = sorted(set(tensors) - set(names.values()) - tied_copy)
    leftover = [n for n in leftover if not n.endswith("rotary_emb.inv_freq")]
    if leftover:
        raise ConfigError(f"tensors the architecture does not use: {', '.join(leftover[:5])}")
    shapes = dict(jax.tree_util.tree_flatten_with_path(_abstract_params(cfg))[0])
    params: dict = {}
    for path, name in names.items():
        if name not in tensors:
            raise ConfigError(f"the checkpoint has no tensor {name}")
        value = _from_torch(path, tensors[name], cfg)
        key = tuple(jax.tree_util.DictKey(k) for k in path)
        if value.shape != shapes[key].shape:
            raise ConfigError(f"{name} has shape {tensors[name].shape}, not the config's")
        _set(params, path, value)
    return params


def hf_config(cfg: ModelConfig, special: dict) -> dict:
    """The `transformers` `config.json` of `cfg`; `ConfigError` if no architecture expresses it."""
    if cfg.smear_keys:
        raise ConfigError("the model smears keys (model.smear_keys), which no HF architecture has")
    olmo = cfg.norm == "layernorm"
    if olmo and cfg.norm_eps != OLMO_NORM_EPS:
        raise ConfigError(f"OLMo's LayerNorm eps is {OLMO_NORM_EPS}; the model's {cfg.norm_eps}")
    config = {
        "architectures": [OLMO if olmo else LLAMA],
        "model_type": "olmo" if olmo else "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "max_position_embeddings": cfg.max_len,
        "hidden_act": "silu",
        "rope_theta": cfg.rope_theta,  # transformers < 5
        "rope_scaling": None,
        "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tied_embeddings,
        "torch_dtype": "float32",
        "bos_token_id": special.get("bos_id"),
        "eos_token_id": special.get("eos_id"),
        "pad_token_id": special.get("pad_id"),
    }
    if olmo:
        config["clip_qkv"] = cfg.clip_qkv or None
    else:
        config.update(rms_norm_eps=cfg.norm_eps, mlp_bias=False, pretraining_tp=1)
    return config


def _fresh_target(path: pathlib.Path) -> pathlib.Path:
    """`path` resolved, refused (before anything is written) when it already holds files."""
    path = path.resolve()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConfigError(f"{path} already exists and is not empty; choose a new folder")
    return path


def _publish(tmp: pathlib.Path, target: pathlib.Path) -> None:
    if target.exists():
        target.rmdir()
    os.replace(tmp, target)


def import_hf(hf_dir: str, workdir: str) -> ModelConfig:
    """Converts the Hugging Face model in `hf_dir` into a new echo_jax workdir (see module doc)."""
    source, target = pathlib.Path(hf_dir).resolve(), _fresh_target(pathlib.Path(workdir))
    for name in ("config.json", "tokenizer.json"):
        if not (source / name).is_file():
            raise MissingFileError(f"no {name} in {source}: not a Hugging Face model folder")
    try:
        hf = json.loads((source / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{source / 'config.json'} is not valid JSON ({e})") from None
    try:
        cfg = model_config(hf)
    except KeyError as e:
        raise ConfigError(f"{source / 'config.json'} has no {e.args[0]!r}") from None
    params = params_from_hf(cfg, _read_tensors(source))
    special = {
        "bos_id": _first(hf.get("bos_token_id")),
        "eos_id": _first(hf.get("eos_token_id")),
        "pad_id": _first(hf.get("pad_token_id")),
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        (tmp / "tokenizer").mkdir()
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, tmp / "tokenizer" / name)
        (tmp / "tokenizer" / hf_vocab.SPECIAL_TOKENS_FILE).write_text(json.dumps(special))
        hf_vocab.HFVocabulary(str(tmp / "tokenizer"))  # readable, before it is published
        config = {
            "kind": IMPORT_KIND,
            "source": str(source),
            "architecture": hf["architectures"][0],
            "model": config_meta(cfg)["model"],
            "data": {"vocab": f"{hf_vocab.PREFIX}{target / 'tokenizer'}"},
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        ckpt = Checkpointer(str(tmp / "checkpoints"), async_save=False)
        try:
            ckpt.save(0, {"params": params}, None, {**config_meta(cfg), "step": 0})
            ckpt.wait()
        finally:
            ckpt.close()
        _publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cfg


def export_hf(workdir: str, hf_dir: str) -> ModelConfig:
    """Writes the latest checkpoint of a language-model workdir as a Hugging Face model folder."""
    target = _fresh_target(pathlib.Path(hf_dir))
    vocab = restore.vocab_name(workdir)
    if not vocab.startswith(hf_vocab.PREFIX):
        raise ConfigError(
            f"{workdir} uses the {vocab!r} vocabulary; export needs a Hugging Face tokenizer "
            "(a model imported with `echo_jax.lm.hf import`, or one post-trained from it)"
        )
    tokenizer = hf_vocab.load(vocab.removeprefix(hf_vocab.PREFIX))
    cfg, params = restore.load_params(workdir)
    config = hf_config(cfg, tokenizer.special_ids)
    flat = dict(jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0])
    tensors = {}
    for path, name in tensor_names(cfg).items():
        value = flat[tuple(jax.tree_util.DictKey(k) for k in path)]
        tensors[name] = np.ascontiguousarray(_to_torch(path, np.asarray(value, np.float32)))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name in TOKENIZER_FILES:
            source = pathlib.Path(tokenizer.folder) / name
            if source.is_file():
                shutil.copy2(source, tmp / name)
        _publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m echo_jax.lm.hf", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="a Hugging Face model folder -> a new echo_jax workdir")
    imp.add_argument("hf_dir")
    imp.add_argument("workdir")
    exp = sub.add_parser("export", help="an echo_jax workdir -> a new Hugging Face model folder")
    exp.add_argument("workdir")
    exp.add_argument("hf_dir")
    args = parser.parse_args(argv)
    try:
        if args.command == "import":
            cfg = import_hf(args.hf_dir, args.workdir)
            where = args.workdir
        else:
            cfg = export_hf(args.workdir, args.hf_dir)
            where = args.hf_dir
    except ConfigError as e:  # MissingFileError included
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.command}: {cfg.n_layers} layers x {cfg.d_model} ({cfg.norm}) -> {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
