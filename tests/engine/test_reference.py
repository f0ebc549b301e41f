"""Logits match Hugging Face transformers' implementation with the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shared.engine.kv_cache import KVCache
from shared.engine.loader import load_model
from shared.engine.model import ForwardBatch, PrefillSpan, Transformer

transformers = pytest.importorskip("transformers")

BLOCK = 4


def single_sequence_batch(tokens: list[int], start: int, table: torch.Tensor) -> ForwardBatch:
    """Tokens at positions [start, start + len(tokens)) of one sequence whose blocks are `table`."""
    n = len(tokens)
    pos = torch.arange(start, start + n)
    span = [PrefillSpan(0, n, start, table)] if n > 1 else []
    return ForwardBatch(
        token_ids=torch.tensor(tokens), positions=pos, slot_blocks=table[pos // BLOCK], slot_offsets=pos % BLOCK,
        num_decode=1 if n == 1 else 0, decode_block_tables=table[None, :],
        decode_context_lens=torch.tensor([start + 1]), prefill_spans=span,
        logits_indices=torch.arange(n),
    )


def our_logits(model: Transformer, prompt: list[int], continuation: list[int],
               dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Logits of every prompt position (one prefill), then of each continuation token (decode steps)."""
    # Deliberately scattered, non-monotonic blocks: the block table must be honoured.
    table = torch.tensor([7, 2, 9, 0, 5, 3, 8, 1, 6, 4])
    cache = KVCache(model.config, 10, BLOCK, dtype)
    out = [model(single_sequence_batch(prompt, 0, table), cache)]
    for i, tok in enumerate(continuation):
        out.append(model(single_sequence_batch([tok], len(prompt) + i, table), cache))
    return out


def compare(model: Transformer, hf: torch.nn.Module, vocab: int) -> None:
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (13,), generator=gen).tolist()
    continuation = torch.randint(0, vocab, (5,), generator=gen).tolist()
    ours = our_logits(model, prompt, continuation)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt + continuation])).logits[0].float()
    torch.testing.assert_close(ours[0], ref[: len(prompt)], rtol=1e-4, atol=1e-4)
    for i, step in enumerate(ours[1:]):
        torch.testing.assert_close(step[0], ref[len(prompt) + i], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_hf_directory_matches_transformers(tmp_path: Path, arch: str) -> None:
    common = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rope_theta=500.0)
    if arch == "llama":
        config = transformers.LlamaConfig(**common, tie_word_embeddings=False)
        hf = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.Qwen2Config(**common, tie_word_embeddings=True)
        hf = transformers.Qwen2ForCausalLM(config)
    torch.manual_seed(0)
    with torch.no_grad():  # non-trivial norms and biases, so a missing one cannot pass
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    hf.eval().save_pretrained(tmp_path)
    compare(load_model(str(tmp_path)), hf, config.vocab_size)


def test_default_gguf_model_matches_transformers() -> None:
    """The full SmolLM2 model, as loaded from GGUF, against LlamaForCausalLM holding its weights."""
    model = load_model("default")
    c = model.config
    config = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        max_position_embeddings=c.max_position_embeddings, rope_theta=c.rope_theta, rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=True,
    )
    hf = transformers.LlamaForCausalLM(config).eval()
    state = {"model.embed_tokens.weight": model.embed_tokens.weight, "model.norm.weight": model.norm.weight}
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        q, k, v = layer.attn.qkv_proj.weight.split([c.q_size, c.kv_size, c.kv_size])
        gate, up = layer.mlp.gate_up_proj.weight.chunk(2)
        state |= {p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                  p + "self_attn.v_proj.weight": v, p + "self_attn.o_proj.weight": layer.attn.o_proj.weight,
                  p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                  p + "mlp.down_proj.weight": layer.mlp.down_proj.weight,
                  p + "input_layernorm.weight": layer.input_norm.weight,
                  p + "post_attention_layernorm.weight": layer.post_attn_norm.weight}
    hf.load_state_dict(state, strict=False)
    hf.tie_weights()
    compare(model, hf, c.vocab_size)
