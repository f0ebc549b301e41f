"""Tokenizer and chat template, from GGUF metadata or a Hugging Face model directory.

Both paths end in a `tokenizers.Tokenizer` (byte-level BPE), so encoding and decoding behave the
same whichever file the model came from. Chat templates are Jinja2, rendered in a sandbox.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from shared.model_files import cached_path, resolve_model, write_atomically
from shared.tokenizer.fast_bpe import FastBPE

# Special tokens that end an assistant turn in common chat formats.
_END_OF_TURN = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "</s>", "<|end|>")

# GGUF token types (llama.cpp): 3 = control, 4 = user-defined.
_GGUF_SPECIAL_TYPES = (3, 4)


class Tokenizer:
    """Text <-> token ids, plus the model's chat template and end-of-sequence ids."""

    def __init__(self, backend: HFTokenizer, chat_template: str | None, eos_token_ids: set[int],
                 bos_token: str = "", eos_token: str = "") -> None:
        self.backend = backend
        self.chat_template = chat_template
        self.eos_token_ids = frozenset(eos_token_ids)
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._template = _compile_template(chat_template) if chat_template else None
        self._fast = FastBPE.build(backend)  # None where it could differ from `backend`

    @property
    def vocab_size(self) -> int:
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        ids = self._fast.encode(text) if self._fast is not None else None
        return ids if ids is not None else list(self.backend.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            raise ValueError("this model has no chat template; use a plain completion")
        for i, message in enumerate(messages):
            if not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
                raise ValueError(f"messages[{i}] needs string 'role' and 'content'")
        return self._template.render(
            messages=list(messages), add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token, eos_token=self.eos_token,
        )

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        meta = {"chat_template": self.chat_template, "eos_token_ids": sorted(self.eos_token_ids),
                "bos_token": self.bos_token, "eos_token": self.eos_token}
        (directory / "meta.json").write_text(json.dumps(meta))

    @classmethod
    def from_saved(cls, directory: Path) -> Tokenizer:
        meta = json.loads((directory / "meta.json").read_text())
        return cls(HFTokenizer.from_file(str(directory / "tokenizer.json")), meta["chat_template"],
                   set(meta["eos_token_ids"]), meta["bos_token"], meta["eos_token"])

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        import gguf

        reader = gguf.GGUFReader(str(path))

        def field(name: str, default: Any = None) -> Any:
            f = reader.fields.get(name)
            return default if f is None else f.contents()

        kind = field("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (byte-level BPE 'gpt2' only); "
                             "point --model at the Hugging Face directory instead")
        tokens: list[str] = field("tokenizer.ggml.tokens")
        types: list[int] = field("tokenizer.ggml.token_type", [1] * len(tokens))
        merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges")]
        backend = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                         fuse_unk=False, byte_fallback=False))
        backend.pre_tokenizer = _gguf_pre_tokenizer(field("tokenizer.ggml.pre", "default"))
        backend.decoder = decoders.ByteLevel()
        specials = [t for t, kind in zip(tokens, types, strict=True) if kind in _GGUF_SPECIAL_TYPES]
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])

        eos = {int(field("tokenizer.ggml.eos_token_id"))} if field("tokenizer.ggml.eos_token_id") is not None else set()
        eos |= {tokens.index(t) for t in _END_OF_TURN if t in specials}
        bos_id = field("tokenizer.ggml.bos_token_id")
        eos_id = field("tokenizer.ggml.eos_token_id")
        return cls(backend, field("tokenizer.chat_template"), eos,
                   bos_token=tokens[bos_id] if bos_id is not None else "",
                   eos_token=tokens[eos_id] if eos_id is not None else "")

    @classmethod
    def from_directory(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        backend = HFTokenizer.from_file(str(path / "tokenizer.json"))
        config: dict[str, Any] = {}
        if (path / "tokenizer_config.json").exists():
            config = json.loads((path / "tokenizer_config.json").read_text())
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        bos, eos = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
        ids = (backend.token_to_id(t) for t in (eos, *_END_OF_TURN) if t)
        eos_ids = {i for i in ids if i is not None}
        gen_config = path / "generation_config.json"
        if gen_config.exists():
            value = json.loads(gen_config.read_text()).get("eos_token_id")
            eos_ids |= set(value if isinstance(value, list) else [value] if value is not None else [])
        return cls(backend, template, eos_ids, bos_token=bos, eos_token=eos)


@lru_cache(maxsize=4)
def load_tokenizer(model: str = "default") -> Tokenizer:
    """The tokenizer of a model argument ('default', a .gguf file or a model directory)."""
    path = resolve_model(model)
    if path.suffix != ".gguf":
        return Tokenizer.from_directory(path)
    # Building from GGUF metadata takes seconds; a cached tokenizer.json takes milliseconds.
    cached = cached_path(path, ".tokenizer")
    if not (cached / "tokenizer.json").exists():
        tokenizer = Tokenizer.from_gguf(path)
        write_atomically(cached, tokenizer.save)
    return Tokenizer.from_saved(cached)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without splitting multi-byte characters.

    Decodes only a short window (from `prefix_offset`) each step: a byte-level token can end in the
    middle of a UTF-8 character, which decodes to U+FFFD until the next token completes it.
    """

    def __init__(self, tokenizer: Tokenizer, token_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.token_ids: list[int] = list(token_ids)
        self.prefix_offset = max(len(self.token_ids) - 6, 0)
        self.read_offset = len(self.token_ids)
        self.text = ""

    def push(self, token_id: int) -> str:
        self.token_ids.append(token_id)
        prefix = self.tokenizer.decode(self.token_ids[self.prefix_offset:self.read_offset])
        full = self.tokenizer.decode(self.token_ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        delta = full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        self.text += delta
        return delta


def _gguf_pre_tokenizer(name: str) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if name in ("smollm", "starcoder", "refact"):
        # These models split every digit on its own before the GPT-2 regex.
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level


def _token_text(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return value or ""


def _compile_template(source: str) -> jinja2.Template:
    def raise_exception(message: str) -> None:
        raise ValueError(f"chat template: {message}")

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)
