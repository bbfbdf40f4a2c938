"""LLaMA-style causal LMs (transformers' Llama classes) in GaLore's sizes, plus small CPU presets."""

from __future__ import annotations

import torch

# hidden, intermediate, layers, heads: GaLore's configs for 60m…7b; 20m and 9m from the same
# family (its llama_20m/llama_9m json), tiny/test for CPU.
PRESETS: dict[str, tuple[int, int, int, int]] = {
    "test": (32, 88, 1, 2),
    "tiny": (128, 352, 4, 4),
    "9m": (128, 352, 4, 4),
    "20m": (256, 688, 4, 4),
    "60m": (512, 1376, 8, 8),
    "130m": (768, 2048, 12, 12),
    "350m": (1024, 2736, 24, 16),
    "1b": (2048, 5461, 24, 32),
    "7b": (4096, 11008, 32, 32),
}


def build_llama(
    preset: str, vocab_size: int, max_positions: int, dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """A freshly initialized ``LlamaForCausalLM`` of the preset's shape (untied head, as in GaLore),
    its weights created in ``dtype`` (so LLaMA-7B in bf16 never exists in float32; the rotary
    frequencies stay float32). Under a ``torch.device`` context it is built on that device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    hidden, intermediate, layers, heads = PRESETS[preset]
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
