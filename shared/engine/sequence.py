"""A request as the engine sees it: its tokens, sampling parameters, KV blocks and output text."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from shared.sampling_params import SamplingParams
from shared.tokenizer import IncrementalDetokenizer, Tokenizer

if TYPE_CHECKING:
    import torch


class Status(enum.Enum):
    """Where a sequence is; only the scheduler changes it (shared/engine/scheduler.py)."""

    WAITING = "waiting"  # needs (re)prefill
    RUNNING = "running"  # in the decode batch
    HELD = "held"  # prefill role: first token out, KV kept until the decode side pulls it
    IMPORTING = "importing"  # decode role: blocks reserved, KV bytes arriving
    FINISHED = "finished"


class Sequence:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 tokenizer: Tokenizer, output_token_ids: list[int] | None = None) -> None:
        self.request_id = request_id
        self.params = params
        self.num_prompt_tokens = len(prompt_token_ids)
        self.token_ids: list[int] = list(prompt_token_ids) + list(output_token_ids or [])
        self.status = Status.WAITING
        self.block_table: list[int] = []
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache
        # Imported KV in another dtype than the engine's: received here, converted into the blocks at commit
        self.kv_staging: torch.Tensor | None = None
        self.finish_reason: str | None = None
        self.detokenizer = IncrementalDetokenizer(tokenizer, self.output_token_ids)
        self.text = tokenizer.decode(self.output_token_ids)
        self.num_emitted_chars = len(self.text)
        self.stop_holdback = max((len(s) for s in params.stop), default=1) - 1

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    def append_token(self, token_id: int, eos_token_ids: frozenset[int], max_model_len: int) -> str:
        """Add a sampled token; update finish state; return the text that may now be streamed."""
        self.token_ids.append(token_id)
        p = self.params
        if (token_id in eos_token_ids and not p.ignore_eos) or token_id in p.stop_token_ids:
            self.finish_reason = "stop"
        else:
            self.text += self.detokenizer.push(token_id)
            if p.stop:
                self._check_stop_strings()
        if self.finish_reason is None and (self.num_output_tokens >= p.max_tokens or self.num_tokens >= max_model_len):
            self.finish_reason = "length"
        return self._take_text()

    def _check_stop_strings(self) -> None:
        # Only the tail can contain a new match: the part not yet emitted plus a stop string's length.
        window_start = max(self.num_emitted_chars - self.stop_holdback, 0)
        hits = [i for s in self.params.stop if (i := self.text.find(s, window_start)) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.finish_reason = "stop"

    def _take_text(self) -> str:
        # Hold back a possible stop-string prefix until it is confirmed or ruled out.
        end = len(self.text) if self.finish_reason else len(self.text) - self.stop_holdback
        if end <= self.num_emitted_chars:
            return ""
        delta = self.text[self.num_emitted_chars:end]
        self.num_emitted_chars = end
        return delta
