"""Build a Transformer from a GGUF file, a Hugging Face directory, or a random initialisation.

GGUF weights are quantized (Q4_1/Q8_0 for the default model): they are dequantized to float32 once
and cached on disk as safetensors in this module's own parameter names, so later starts skip the
~7 s of dequantization and load in about a second.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from shared.engine.config import ModelConfig
from shared.engine.model import RotaryEmbedding, Transformer
from shared.model_files import TOKENIZER_KEY, cached_path, random_spec, resolve_model, write_atomically

log = logging.getLogger(__name__)

def load_model(model: str, dtype: torch.dtype = torch.float32, seed: int = 0,
               device: torch.device | None = None) -> Transformer:
    """The model named by an EngineConfig.model string, in eval mode, with weights loaded (random ones made
    on `device` itself: an 8B-parameter model in seconds on a GPU; every other model loads on the host)."""
    if model.startswith("random:"):
        config = random_config(model.removeprefix("random:"))
        if device is not None and device.type != "cpu":
            with torch.device("meta"):
                net = Transformer(config)
            net = net.to_empty(device=device)
            if config.tie_word_embeddings:  # to_empty gave each module a parameter of its own
                net.lm_head.weight = net.embed_tokens.weight
            net.rotary = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta).to(device)
            _init_random(net, torch.Generator(device).manual_seed(seed))
            return net.to(dtype).eval()
        torch.manual_seed(seed)
        net = Transformer(config)
        _init_random(net)
        return net.to(dtype).eval()
    path = resolve_model(model)
    if path.suffix == ".gguf":
        config, state = _load_gguf(path)
    else:
        config, state = _load_hf_directory(path)
    return _from_state(config, state).to(dtype).eval()


def _from_state(config: ModelConfig, state: dict[str, torch.Tensor]) -> Transformer:
    # Built on the meta device: random initialisation of every weight would cost more than loading.
    with torch.device("meta"):
        net = Transformer(config)
    missing, unexpected = net.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        net.lm_head.weight = net.embed_tokens.weight
    net.rotary = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta)
    return net


def random_config(spec: str) -> ModelConfig:
    fields = random_spec(spec)
    fields.pop(TOKENIZER_KEY, None)
    return ModelConfig(**fields)


def _init_random(net: Transformer, generator: torch.Generator | None = None) -> None:
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=generator)


# -- GGUF -----------------------------------------------------------------------------------------

def gguf_config(reader: Any) -> ModelConfig:
    def get(key: str, default: Any = None) -> Any:
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    arch = get("general.architecture")
    if arch not in ("llama", "mistral", "qwen2"):
        raise ValueError(f"GGUF architecture {arch!r} is not supported (llama, mistral, qwen2)")
    heads = int(get(f"{arch}.attention.head_count"))
    hidden = int(get(f"{arch}.embedding_length"))
    tensor_names = {t.name for t in reader.tensors}
    vocab = get(f"{arch}.vocab_size") or len(get("tokenizer.ggml.tokens"))
    return ModelConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get(f"{arch}.feed_forward_length")),
        num_layers=int(get(f"{arch}.block_count")),
        num_heads=heads,
        num_kv_heads=int(get(f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(get(f"{arch}.rope.dimension_count", hidden // heads)),
        rope_theta=float(get(f"{arch}.rope.freq_base", 10000.0)),
        rms_norm_eps=float(get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        max_position_embeddings=int(get(f"{arch}.context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
    )


def _load_gguf(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    # The cache also stores the config, so a warm start never parses the GGUF (3+ s of metadata).
    cached = cached_path(path, ".safetensors")
    if cached.exists():
        with safe_open(str(cached), framework="pt") as f:
            config = ModelConfig(**json.loads(f.metadata()["model_config"]))
        return config, load_file(str(cached))

    import gguf

    reader = gguf.GGUFReader(str(path))
    config = gguf_config(reader)
    log.info("dequantizing %s once (cached at %s)", path.name, cached)
    raw: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        array = gguf.quants.dequantize(t.data, t.tensor_type)
        raw[t.name] = torch.from_numpy(np.array(array, dtype=np.float32, copy=True))
    state = _gguf_to_state(raw, config)
    metadata = {"model_config": json.dumps(asdict(config))}
    write_atomically(cached, lambda tmp: save_file(state, str(tmp), metadata=metadata))
    return config, state


def _unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs -> rotate-half halves)."""
    out = w.shape[0]
    return w.reshape(heads, out // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


def _gguf_to_state(raw: dict[str, torch.Tensor], c: ModelConfig) -> dict[str, torch.Tensor]:
    state = {"embed_tokens.weight": raw["token_embd.weight"], "norm.weight": raw["output_norm.weight"]}
    if "output.weight" in raw:
        state["lm_head.weight"] = raw["output.weight"]
    for i in range(c.num_layers):
        b, p = f"blk.{i}.", f"layers.{i}."
        q = _unpermute(raw[b + "attn_q.weight"], c.num_heads)
        k = _unpermute(raw[b + "attn_k.weight"], c.num_kv_heads)
        state[p + "attn.qkv_proj.weight"] = torch.cat([q, k, raw[b + "attn_v.weight"]])
        if c.attention_bias:
            qb = _unpermute(raw[b + "attn_q.bias"], c.num_heads)
            kb = _unpermute(raw[b + "attn_k.bias"], c.num_kv_heads)
            state[p + "attn.qkv_proj.bias"] = torch.cat([qb, kb, raw[b + "attn_v.bias"]])
        state[p + "attn.o_proj.weight"] = raw[b + "attn_output.weight"]
        state[p + "input_norm.weight"] = raw[b + "attn_norm.weight"]
        state[p + "post_attn_norm.weight"] = raw[b + "ffn_norm.weight"]
        state[p + "mlp.gate_up_proj.weight"] = torch.cat([raw[b + "ffn_gate.weight"], raw[b + "ffn_up.weight"]])
        state[p + "mlp.down_proj.weight"] = raw[b + "ffn_down.weight"]
    return state


# -- Hugging Face directories ---------------------------------------------------------------------

def hf_config(raw: dict[str, Any]) -> ModelConfig:
    model_type = raw.get("model_type", "llama")
    if model_type not in ("llama", "mistral", "qwen2"):
        raise ValueError(f"model_type {model_type!r} is not supported (llama, mistral, qwen2)")
    heads = int(raw["num_attention_heads"])
    # transformers >= 5 writes `rope_parameters`; older versions `rope_theta` and `rope_scaling`.
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ValueError(f"RoPE scaling {rope!r} is not supported")
    return ModelConfig(
        vocab_size=int(raw["vocab_size"]),
        hidden_size=int(raw["hidden_size"]),
        intermediate_size=int(raw["intermediate_size"]),
        num_layers=int(raw["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(raw.get("head_dim") or raw["hidden_size"] // heads),
        rope_theta=float(rope.get("rope_theta") or raw.get("rope_theta", 10000.0)),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=bool(raw.get("attention_bias", model_type == "qwen2")),
    )


def _load_hf_directory(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json (expected a Hugging Face model directory)")
    config = hf_config(json.loads((path / "config.json").read_text()))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no *.safetensors weights")
    raw: dict[str, torch.Tensor] = {}
    for f in files:
        raw.update(load_file(str(f)))
    raw = {k.removeprefix("model."): v.float() for k, v in raw.items()}
    state = {"embed_tokens.weight": raw["embed_tokens.weight"], "norm.weight": raw["norm.weight"]}
    if not config.tie_word_embeddings:
        state["lm_head.weight"] = raw["lm_head.weight"]
    for i in range(config.num_layers):
        a, p = f"layers.{i}.self_attn.", f"layers.{i}."
        state[p + "attn.qkv_proj.weight"] = torch.cat([raw[a + f"{n}_proj.weight"] for n in "qkv"])
        if config.attention_bias:
            state[p + "attn.qkv_proj.bias"] = torch.cat([raw[a + f"{n}_proj.bias"] for n in "qkv"])
        state[p + "attn.o_proj.weight"] = raw[a + "o_proj.weight"]
        state[p + "input_norm.weight"] = raw[p + "input_layernorm.weight"]
        state[p + "post_attn_norm.weight"] = raw[p + "post_attention_layernorm.weight"]
        gate, up = raw[p + "mlp.gate_proj.weight"], raw[p + "mlp.up_proj.weight"]
        state[p + "mlp.gate_up_proj.weight"] = torch.cat([gate, up])
        state[p + "mlp.down_proj.weight"] = raw[p + "mlp.down_proj.weight"]
    return config, state
