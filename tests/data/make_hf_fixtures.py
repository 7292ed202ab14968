"""Builds the tiny Hugging Face models that tests/lm/test_hf.py imports (needs the `bench` extra:
torch and transformers; no network). For each architecture it writes `tests/data/hf/<name>/`:
the model (`config.json`, `model.safetensors`), a small byte-level BPE `tokenizer.json`, and
`reference.npz` with `transformers`' float32 logits of two token rows and its greedy `generate`
continuation of two prompts.

    python tests/data/make_hf_fixtures.py
"""

from __future__ import annotations

import pathlib
import shutil

import numpy as np
import tokenizers
import torch
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

ROOT = pathlib.Path(__file__).resolve().parent / "hf"
TEXTS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many in May.",
    "def simple_math_problem() -> int:\n    result = 48 + 48 / 2\n    return result",
    "<llm-code>\nprint(48 + 48 // 2)\n</llm-code>\n<llm-code-output>\n72\n</llm-code-output>",
    "The answer is \\boxed{72}. Weng earns $12 an hour for babysitting.",
]
SPECIAL = ["<|endoftext|>", "<s>", "<pad>"]
# (architecture config, extra settings): OLMo tied with clip_qkv; Llama untied with GQA
MODELS = {
    "olmo": (
        transformers.OlmoConfig,
        {"clip_qkv": 2.0, "tie_word_embeddings": True, "rope_theta": 10_000.0},
    ),
    "llama": (
        transformers.LlamaConfig,
        {
            "num_key_value_heads": 2,
            "tie_word_embeddings": False,
            "rms_norm_eps": 1e-5,
            "rope_theta": 500_000.0,
        },
    ),
}


def tokenizer() -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TEXTS, trainer)
    return tok


def build(name: str, tok: tokenizers.Tokenizer) -> None:
    config_class, extra = MODELS[name]
    eos, bos, pad = (tok.token_to_id(t) for t in SPECIAL)
    config = config_class(
        vocab_size=-(-tok.get_vocab_size() // 64) * 64,  # padded, as OLMo-1B's 50304
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=1024,  # GSM8K and MATH prompts in this small vocabulary
        initializer_range=0.3,  # peaked logits: greedy decoding has no near-ties
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        **extra,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", dtype=torch.float32
    )
    model.eval()
    out = ROOT / name
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out)
    tok.save(str(out / "tokenizer.json"))
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, tok.get_vocab_size(), (2, 12))
    prompts = [tok.encode(t).ids[:6] for t in TEXTS[:2]]
    with torch.no_grad():
        logits = model(torch.tensor(tokens)).logits.numpy().astype(np.float32)
        greedy = model.generate(
            torch.tensor(prompts),
            attention_mask=torch.ones(2, 6, dtype=torch.long),
            max_new_tokens=10,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=pad,
        ).numpy()
    np.savez(out / "reference.npz", tokens=tokens, logits=logits, prompts=prompts, greedy=greedy)
    print(f"{name}: {sum(p.numel() for p in model.parameters())} parameters -> {out}")


def main() -> None:
    tok = tokenizer()
    for name in MODELS:
        build(name, tok)


if __name__ == "__main__":
    main()
