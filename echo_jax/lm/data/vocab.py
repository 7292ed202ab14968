"""The tokenizers: one definition (a seqio vocabulary) shared by the seqio tasks and the grain
pipeline.

"byte" is the default: UTF-8 bytes offset by 3 (pad 0, eos 1, unk 2; 259 ids), so a tiny model sees
the digits of every number. "spm" is a small SentencePiece BPE trained on generated text of all
three styles, with digits split (as Llama's tokenizer does) and byte fallback, and identity
normalisation so that newlines and code indentation survive a round trip. "hf:<folder>" is a
Hugging Face tokenizer (`hf_vocab`), as an imported model's run names it.
"""

import io
import os
import pathlib
import tempfile

import sentencepiece as spm
import seqio

from echo_jax.core.config import ConfigError
from echo_jax.lm.data import generators, hf_vocab

VOCABULARIES = ("byte", "spm", "hf:<folder>")
SPM_VOCAB_SIZE = 1024  # 512 leaves only ~250 merges once the 256 byte-fallback pieces are counted
SPM_EXAMPLES_PER_STYLE = 2000


def _train_spm(path: pathlib.Path, seed: int, vocab_size: int, examples_per_style: int) -> None:
    # OMI1 rendered with print(...) as before session 8, so the tokenizer (cached by name, and
    # named, not stored, in checkpoints' configs) stays the one every existing run was trained with
    texts = [
        ex["text"]
        for style in generators.STYLES
        for ex in generators.ProblemSource(
            "train", seed, generators.LEVELS, examples_per_style, style, omi1_print_share=1.0
        )
    ]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        split_digits=True,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=["\n"],
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        max_sentence_length=16384,
        minloglevel=2,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(model.getvalue())
    os.replace(tmp, path)  # atomic, so concurrent processes never read a half-written model


def get_vocabulary(
    name: str,
    cache_dir: str | None = None,
    seed: int = 0,
    vocab_size: int = SPM_VOCAB_SIZE,
    examples_per_style: int = SPM_EXAMPLES_PER_STYLE,
) -> seqio.Vocabulary:
    """The seqio vocabulary `name`; "spm" is trained once (deterministically) and cached.

    The pipelines use seed 0 whatever the data seed, so runs with different seeds share a tokenizer.
    """
    if name == "byte":
        return seqio.ByteVocabulary()
    if name.startswith(hf_vocab.PREFIX):
        return hf_vocab.load(name.removeprefix(hf_vocab.PREFIX))
    if name != "spm":
        raise ConfigError(f"unknown vocabulary {name!r}; valid vocabularies: {VOCABULARIES}")
    root = pathlib.Path(cache_dir or os.path.join(tempfile.gettempdir(), "echo_jax_vocab"))
    path = root / f"spm_bpe_v{vocab_size}_s{seed}_n{examples_per_style}.model"
    if not path.exists():
        _train_spm(path, seed, vocab_size, examples_per_style)
    return seqio.SentencePieceVocabulary(str(path))
