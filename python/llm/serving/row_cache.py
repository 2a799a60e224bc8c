"""A KV cache whose rows are independent sequences of different lengths, for batched decoding.

llm.model.KVCache keeps one length for the whole batch, which suits one prompt batch
decoded in lockstep. A server decodes many requests that arrived at different times, so
each row here has its own length: row b writes its new keys/values at [len_b, len_b + T),
its tokens take positions len_b.., and attention masks out the keys past each row's end.
The model reads the cache through KVCache's interface (update, advance, positions,
attention_mask), so GPT.forward runs unchanged on it.

Forward calls read and write the window of rows `rows` (a slice, so every tensor here is
a view, no copy): the serving engine keeps its active requests in rows [0, n) and decodes
them in one forward; a new request is prefilled alone in row n.
"""

from __future__ import annotations

import torch

from llm.config import GPTConfig


class RowKVCache:
    def __init__(self, config: GPTConfig, capacity: int, device, dtype):
        shape = (capacity, config.n_head, config.context_length, config.head_dim)  # (rows, H, ctx, D)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.capacity = capacity
        self.lengths = [0] * capacity  # cached positions per row (Python ints: no device syncs)
        self.rows = slice(0, 0)  # the rows the next forward call reads and writes
        self._state_key, self._state = None, None

    def select(self, start: int, stop: int) -> None:
        """The next forward call runs on rows [start, stop)."""
        if not 0 <= start < stop <= self.capacity:
            raise ValueError(f"rows [{start}, {stop}) outside the cache's {self.capacity} rows")
        self.rows = slice(start, stop)

    def clear_row(self, row: int) -> None:
        self.lengths[row] = 0

    def move_row(self, source: int, target: int) -> None:
        """Copy row `source` (its cached keys, values and length) into row `target`."""
        length = self.lengths[source]
        for keys, values in zip(self.keys, self.values):
            keys[target, :, :length] = keys[source, :, :length]
            values[target, :, :length] = values[source, :, :length]
        self.lengths[target] = length

    @property
    def length(self) -> int:
        """The longest row of the window: GPT.forward checks it against the context."""
        return max(self.lengths[self.rows])

    def _forward_state(self, num_tokens: int):
        """(row indices (B, 1), positions (B, T), mask (B, 1, T, S) or None) of this forward
        call: built once per call (the key changes only when advance() runs), shared by
        every layer."""
        lengths = self.lengths[self.rows]
        key = (self.rows.start, tuple(lengths), num_tokens)
        if key != self._state_key:
            device = self.keys[0].device
            rows = torch.arange(self.rows.start, self.rows.stop, device=device)[:, None]  # (B, 1)
            positions = torch.tensor(lengths, device=device)[:, None] + torch.arange(num_tokens, device=device)  # (B, T)
            mask = None
            if len(set(lengths)) > 1:  # query i of row b sees keys j <= len_b + i
                keys_seen = torch.arange(max(lengths) + num_tokens, device=device)  # (S,)
                mask = (keys_seen <= positions[:, :, None])[:, None]  # (S,) vs (B, T, 1) -> (B, 1, T, S)
            self._state_key, self._state = key, (rows, positions, mask)
        return self._state

    def positions(self, num_tokens: int) -> torch.Tensor:
        """(B, T): row b's new tokens sit at len_b, len_b + 1, ..."""
        return self._forward_state(num_tokens)[1]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H, T, D) at each row's own positions; return the window's keys and
        values (B, H, S, D), S = the longest row + T (shorter rows are masked past their end)."""
        rows, positions, _ = self._forward_state(k.shape[2])
        # Advanced indices (B, 1) and (B, T) around a slice: the indexed view is (B, T, H, D).
        self.keys[layer][rows, :, positions] = k.transpose(1, 2)  # (B, H, T, D) -> (B, T, H, D)
        self.values[layer][rows, :, positions] = v.transpose(1, 2)
        end = self.length + k.shape[2]  # S
        return self.keys[layer][self.rows, :, :end], self.values[layer][self.rows, :, :end]

    def attention_mask(self, num_tokens: int) -> torch.Tensor | None:
        """(B, 1, T, S), or None when all rows of the window have the same length (the
        model's own causal mask is then the same thing, and the fused kernels can run)."""
        return self._forward_state(num_tokens)[2]

    def advance(self, num_tokens: int) -> None:
        for row in range(self.rows.start, self.rows.stop):
            self.lengths[row] += num_tokens
