"""Text <-> token ids for the gateway and the engine: no torch here, so the gateway stays light."""

from shared.tokenizer.tokenizer import IncrementalDetokenizer, Tokenizer, load_tokenizer

__all__ = ["IncrementalDetokenizer", "Tokenizer", "load_tokenizer"]
