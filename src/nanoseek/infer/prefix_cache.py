"""Automatic prefix caching: what finished requests left in the cache, reused by the next prompt
that starts the same way (a multi-turn chat, a shared system prompt; DeepSeek's API calls it
context caching and reports its hits in `usage.prompt_cache_hit_tokens`).

vLLM's automatic prefix caching keeps the KV blocks of past requests in its paged cache, each
named by a hash of the token prefix it ends, and a new request whose prompt starts with cached
blocks skips their prefill. The engine's cache is not paged (a completion owns a row of
positions 0..max_seq_len), so here the cached blocks live in a pool of their own, beside it:
- a block is BLOCK_SIZE consecutive positions (0-15, 16-31, ...) of every layer's cache: MLA's
  c_KV and k_pe (and the MTP module's), or a dense model's keys and values. Its key is a hash of
  its parent's key and its own tokens, so one key names the whole prefix up to the block's end,
  and the cache of position i depends on tokens 0..i only: equal keys hold equal values.
- storing (`save`): after a prefill, the prompt's full blocks; when a completion leaves its row,
  those of its prompt and generated tokens (all but the last, never fed to the model). Blocks
  already in the pool are only marked used; the others are copied from the row.
- reusing (`match`, `load`): a new prompt's blocks are looked up in order up to the first miss,
  copied into its row, and its prefill starts there: its queries, at their own positions, attend
  over the copied keys as over keys it had computed. The last prompt token is always recomputed
  (its logits choose the first token), so a prompt that is all cached still gets one.
- evicting: least recently used first, never a block before the blocks that extend it (`_touch`
  marks a chain from its last block to its first), so every cached block's prefix is cached too.
The pool is made once, `tokens // BLOCK_SIZE` blocks; copying a block in or out is one indexed
copy per cache tensor, where recomputing it is a forward pass. The engine empties the pool when
the model's weights change (an RL step between rollouts): its values came from the old ones.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

import torch

BLOCK_SIZE = 16


def block_keys(ids: list[int], n_blocks: int, block_size: int = BLOCK_SIZE) -> list[bytes]:
    """The keys of the first `n_blocks` full blocks of `ids`: block i's key hashes block i - 1's
    key and block i's tokens, so it stands for tokens 0 .. (i + 1) * block_size - 1."""
    keys, key = [], b""
    for i in range(n_blocks):
        tokens = array("q", ids[i * block_size : (i + 1) * block_size]).tobytes()
        key = hashlib.blake2b(key + tokens, digest_size=16).digest()
        keys.append(key)
    return keys


def weights_signature(model: torch.nn.Module) -> tuple:
    """Changes when a parameter is replaced or changed in place (an optimizer step)."""
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


class PrefixCache:
    def __init__(self, stores: list[torch.Tensor], tokens: int, block_size: int = BLOCK_SIZE):
        """`stores`: the engine's cache tensors, each [layers, rows, positions, ...]; the pool
        holds `tokens // block_size` blocks of each."""
        self.stores, self.block_size = stores, block_size
        self.capacity = tokens // block_size
        self.pools = [s.new_zeros(s.shape[0], self.capacity, block_size, *s.shape[3:]) for s in stores]
        self.blocks: OrderedDict[bytes, int] = OrderedDict()  # key -> block of the pools, least recent first
        self.free = list(range(self.capacity - 1, -1, -1))
        self.signature: tuple | None = None

    @property
    def tokens(self) -> int:
        """Tokens held."""
        return len(self.blocks) * self.block_size

    def sync(self, model: torch.nn.Module) -> None:
        """Empty the pool if the model's weights changed since the last call."""
        signature = weights_signature(model)
        if signature != self.signature:
            self.clear()
            self.signature = signature

    def clear(self) -> None:
        self.blocks.clear()
        self.free = list(range(self.capacity - 1, -1, -1))

    def match(self, ids: list[int], limit: int) -> list[int]:
        """The pool blocks of the longest cached prefix of ids[:limit], in order (whole blocks)."""
        found, keys = [], []
        for key in block_keys(ids, limit // self.block_size, self.block_size):
            block = self.blocks.get(key)
            if block is None:
                break
            found.append(block)
            keys.append(key)
        self._touch(keys)
        return found

    def load(self, row: int, blocks: list[int]) -> None:
        """Positions 0 .. len(blocks) * block_size - 1 of cache row `row` get the pool's `blocks`."""
        if not blocks:
            return
        n = len(blocks) * self.block_size
        index = torch.tensor(blocks, device=self.pools[0].device)
        for store, pool in zip(self.stores, self.pools):
            store[:, row, :n] = pool[:, index].flatten(1, 2)

    def save(self, row: int, ids: list[int], n: int) -> None:
        """Keep the full blocks of ids[:n], whose cache is in row `row` (at most the pool's size)."""
        keys = block_keys(ids, min(n // self.block_size, self.capacity), self.block_size)
        new = [i for i, key in enumerate(keys) if key not in self.blocks]  # a suffix of keys: see _touch
        self._touch(keys)  # most recent: the evictions below take none of them
        if new:
            blocks = [self._allocate() for _ in new]
            self.blocks.update((keys[i], b) for i, b in zip(new, blocks))
            device = self.pools[0].device
            index = torch.tensor(blocks, device=device)
            positions = (
                torch.tensor(new, device=device)[:, None] * self.block_size
                + torch.arange(self.block_size, device=device)
            ).flatten()
            for store, pool in zip(self.stores, self.pools):
                pool[:, index] = store[:, row, positions].unflatten(1, (len(new), self.block_size))
            self._touch(keys)

    def _allocate(self) -> int:
        if self.free:
            return self.free.pop()
        return self.blocks.popitem(last=False)[1]  # the least recently used, a block nothing extends

    def _touch(self, keys: list[bytes]) -> None:
        # The last block first, so that each block is more recent than every block that extends
        # it and eviction (least recent first) takes a chain from its end.
        for key in reversed(keys):
            if key in self.blocks:
                self.blocks.move_to_end(key)
