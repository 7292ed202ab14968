"""A Hugging Face tokenizer (`tokenizer.json`, through the `tokenizers` library) as a seqio
vocabulary, so imported models (`echo_jax.lm.hf`) read and write text like our own.

Its folder holds `tokenizer.json` and `special_tokens.json` (`bos_id`, `eos_id`, `pad_id`, from the
model's Hugging Face `config.json`, as `echo_jax.lm.hf import` writes it) or, in a folder as the Hub
has it, `tokenizer_config.json` (its `bos_token`, `eos_token`, `pad_token`); a run names it
`data.vocab = "hf:<folder>"`. `encode` adds no
special tokens (seqio's convention: the pipelines append EOS themselves).
"""

from __future__ import annotations

import functools
import json
import pathlib

import seqio
import tokenizers

from echo_jax.core.config import ConfigError, MissingFileError

PREFIX = "hf:"
SPECIAL_TOKENS_FILE = "special_tokens.json"


class HFVocabulary(seqio.Vocabulary):
    def __init__(self, folder: str):
        root = pathlib.Path(folder)
        specials = [root / n for n in (SPECIAL_TOKENS_FILE, "tokenizer_config.json")]
        if not (root / "tokenizer.json").is_file() or not any(p.is_file() for p in specials):
            raise MissingFileError(
                f"{root} is not a Hugging Face vocabulary folder: it needs tokenizer.json and "
                f"{SPECIAL_TOKENS_FILE} or tokenizer_config.json"
            )
        try:
            self._tokenizer = tokenizers.Tokenizer.from_file(str(root / "tokenizer.json"))
            if specials[0].is_file():
                special = json.loads(specials[0].read_text())
            else:
                special = self._from_tokenizer_config(json.loads(specials[1].read_text()))
        except Exception as e:  # noqa: BLE001 - tokenizers raises its own exception types
            raise ConfigError(f"cannot read the tokenizer in {root}: {e}") from None
        if special.get("eos_id") is None:
            raise ConfigError(f"the tokenizer in {root} has no EOS token id")
        self.folder = str(root)
        self._special = special
        super().__init__(extra_ids=0)

    def _from_tokenizer_config(self, config: dict) -> dict:
        def token_id(key: str) -> int | None:
            token = config.get(key)
            token = token.get("content") if isinstance(token, dict) else token
            return None if token is None else self._tokenizer.token_to_id(token)

        return {f"{name}_id": token_id(f"{name}_token") for name in ("bos", "eos", "pad")}

    @property
    def special_ids(self) -> dict:
        """`bos_id`, `eos_id`, `pad_id` as the model's Hugging Face config gives them (or None)."""
        return dict(self._special)

    @property
    def eos_id(self) -> int:
        return int(self._special["eos_id"])

    @property
    def bos_id(self) -> int | None:
        return self._special.get("bos_id")

    @property
    def pad_id(self) -> int:
        pad = self._special.get("pad_id")
        return self.eos_id if pad is None else int(pad)

    @property
    def unk_id(self) -> int | None:
        return None

    @property
    def _base_vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def _encode(self, s: str) -> list[int]:
        return self._tokenizer.encode(s, add_special_tokens=False).ids

    def _decode(self, ids) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def _encode_tf(self, s):
        import tensorflow as tf

        def encode(text):
            return tf.constant(self._encode(text.numpy().decode("utf-8")), tf.int32)

        ids = tf.py_function(encode, [s], Tout=tf.int32)
        ids.set_shape([None])  # seqio checks the feature's rank
        return ids

    def _decode_tf(self, ids):
        import tensorflow as tf

        def decode(rows):
            rows = rows.numpy()
            if rows.ndim == 1:
                return tf.constant(self._decode(rows.tolist()))
            return tf.constant([self._decode(row.tolist()) for row in rows])

        text = tf.py_function(decode, [ids], Tout=tf.string)
        text.set_shape(ids.shape[:-1])
        return text

    def __eq__(self, other) -> bool:
        return isinstance(other, HFVocabulary) and other.folder == self.folder

    def __hash__(self) -> int:
        return hash(self.folder)


@functools.lru_cache(maxsize=8)
def load(folder: str) -> HFVocabulary:
    return HFVocabulary(folder)
