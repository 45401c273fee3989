"""Paged KV cache: fixed-size blocks from one pool, a block table per sequence, reference counts
so sequences can share prompt-prefix blocks (prefix caching, keyed by a hash chain over the
block's tokens, as in vLLM) or fork one another copy-on-write (beams, best-of-n), and rollback of a
sequence's tail (rejected speculative tokens)."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..config import ModelConfig
from ..memory import zeroed_tensors


class OutOfBlocks(Exception):
    """The pool cannot satisfy an allocation; the scheduler preempts or waits."""


@dataclass
class SeqBlocks:
    """One sequence's view of the cache."""
    block_table: list[int] = field(default_factory=list)  # logical block i -> physical block id
    num_tokens: int = 0            # positions whose K/V are written (or reserved for this step)
    num_hashed: int = 0            # leading full blocks already registered in the prefix index
    hashes: list[int] = field(default_factory=list)       # hash chain of those blocks


class BlockPool:
    """Physical blocks with reference counts. Freed blocks that hold a registered prefix stay
    findable (LRU) until their memory is needed again."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("need at least one block of at least one token")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.refs = [0] * num_blocks
        self.free_ids: list[int] = list(range(num_blocks - 1, -1, -1))   # never-cached free blocks
        self.evictable: OrderedDict[int, None] = OrderedDict()           # free but holding a prefix
        self.by_hash: dict[int, int] = {}        # prefix hash -> block id
        self.hash_of: dict[int, int] = {}        # block id -> prefix hash

    @property
    def num_free(self) -> int:
        return len(self.free_ids) + len(self.evictable)

    def allocate(self) -> int:
        if self.free_ids:
            block = self.free_ids.pop()
        elif self.evictable:
            block, _ = self.evictable.popitem(last=False)   # least recently used prefix
            del self.by_hash[self.hash_of.pop(block)]
        else:
            raise OutOfBlocks
        self.refs[block] = 1
        return block

    def acquire(self, block: int) -> None:
        if self.refs[block] == 0:
            self.evictable.pop(block, None)
        self.refs[block] += 1

    def release(self, block: int) -> None:
        self.refs[block] -= 1
        assert self.refs[block] >= 0, "block released twice"
        if self.refs[block] == 0:
            if block in self.hash_of:
                self.evictable[block] = None
            else:
                self.free_ids.append(block)

    def register(self, block: int, prefix_hash: int) -> None:
        if prefix_hash not in self.by_hash and block not in self.hash_of:
            self.by_hash[prefix_hash] = block
            self.hash_of[block] = prefix_hash

    def unregister(self, block: int) -> None:
        h = self.hash_of.pop(block, None)
        if h is not None:
            del self.by_hash[h]
            if self.refs[block] == 0:
                self.evictable.pop(block, None)
                self.free_ids.append(block)


def chain_hash(parent: int, tokens: Sequence[int]) -> int:
    return hash((parent, tuple(tokens)))


class PagedKVCache:
    """K/V storage [num_blocks, Hkv, block_size, D] per layer (Hkv: the layer's own) plus the block
    bookkeeping; the runners attend over it. The storage is fp32 or fp16 (half the bytes for attention to read;
    values are rounded once when written, the same way by the native step and the reference path).
    resident=True zero-fills it at once (a server's pool: its steps then never wait on a first-touch
    page fault, ~3 % of 16 streams' first pass over a fresh pool); False maps it lazily
    (zeroed_tensors: resident only where written, for a pool sized to one request)."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int = 16, dtype=torch.float32,
                 resident: bool = True):
        self.cfg = cfg
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, block_size)
        L = cfg.num_layers
        shapes = [(num_blocks, cfg.heads(i % L)[1], block_size, cfg.head_dim) for i in range(2 * L)]
        if resident:
            kv = [torch.zeros(s, dtype=dtype) for s in shapes]
        else:  # one lazy mapping per distinct shape, handed out in layer order
            pools = {s: iter(zeroed_tensors(shapes.count(s), s, dtype)) for s in set(shapes)}
            kv = [next(pools[s]) for s in shapes]
        self.k, self.v = kv[:L], kv[L:]
        self._arrays: list | None = None

    @classmethod
    def for_memory(cls, cfg: ModelConfig, max_bytes: int, block_size: int = 16, **kw) -> "PagedKVCache":
        itemsize = kw.get("dtype", torch.float32).itemsize
        per_block = 2 * sum(cfg.heads(i)[1] for i in range(cfg.num_layers)) * block_size * cfg.head_dim * itemsize
        return cls(cfg, max(1, max_bytes // per_block), block_size, **kw)

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    def blocks_needed(self, seq: SeqBlocks, num_new: int) -> int:
        total = -(-(seq.num_tokens + num_new) // self.block_size)
        # writing into a partly filled block that a fork shares takes a private copy of it first
        return max(0, total - len(seq.block_table)) + (num_new > 0 and self._shared_tail(seq))

    def room(self, seq: SeqBlocks) -> int:
        """How many more positions the free blocks (and the sequence's own last block) can take."""
        bs, free = self.block_size, self.pool.num_free
        if self._shared_tail(seq):  # its last block must be copied first
            free -= 1
            if free < 0:
                return 0
        return len(seq.block_table) * bs - seq.num_tokens + free * bs

    def _shared_tail(self, seq: SeqBlocks) -> bool:
        return bool(seq.num_tokens % self.block_size) and self.pool.refs[seq.block_table[-1]] > 1

    def fork(self, seq: SeqBlocks) -> SeqBlocks:
        """A new sequence holding the same positions as `seq` in the same blocks (one more reference
        each). A shared block is copied only when one of them writes into it (`reserve`): full
        blocks stay shared for good, the partly filled last one is copied once, as they diverge."""
        for block in seq.block_table:
            self.pool.acquire(block)
        return SeqBlocks(list(seq.block_table), seq.num_tokens, seq.num_hashed, list(seq.hashes))

    def match_prefix(self, seq: SeqBlocks, tokens: Sequence[int]) -> int:
        """Attach cached blocks for the longest full-block prefix of `tokens` (at most all but
        the last token, so the model still computes logits for it). Returns tokens reused."""
        assert not seq.block_table, "prefix matching starts an empty sequence"
        bs, parent = self.block_size, 0
        for i in range((len(tokens) - 1) // bs):
            h = chain_hash(parent, tokens[i * bs:(i + 1) * bs])
            block = self.pool.by_hash.get(h)
            if block is None:
                break
            self.pool.acquire(block)
            seq.block_table.append(block)
            seq.hashes.append(h)
            parent = h
        seq.num_hashed = len(seq.block_table)
        seq.num_tokens = seq.num_hashed * bs
        return seq.num_tokens

    def reserve(self, seq: SeqBlocks, num_new: int) -> None:
        """Make room for `num_new` more positions (all or nothing)."""
        need = self.blocks_needed(seq, num_new)
        if need > self.pool.num_free:
            raise OutOfBlocks
        if num_new and self._shared_tail(seq):
            self._copy_on_write(seq, len(seq.block_table) - 1)
            need -= 1
        for _ in range(need):
            seq.block_table.append(self.pool.allocate())
        seq.num_tokens += num_new

    def commit_prefix(self, seq: SeqBlocks, tokens: Sequence[int]) -> None:
        """Register the sequence's full blocks (whose K/V are now written) for reuse.
        tokens: the sequence's tokens whose K/V are in the cache."""
        bs = self.block_size
        parent = seq.hashes[-1] if seq.hashes else 0
        while (seq.num_hashed + 1) * bs <= min(len(tokens), seq.num_tokens):
            i = seq.num_hashed
            parent = chain_hash(parent, tokens[i * bs:(i + 1) * bs])
            self.pool.register(seq.block_table[i], parent)
            seq.hashes.append(parent)
            seq.num_hashed += 1

    def truncate(self, seq: SeqBlocks, num_tokens: int) -> None:
        """Roll back to `num_tokens` positions, releasing blocks no longer used."""
        if num_tokens >= seq.num_tokens:
            return
        keep = -(-num_tokens // self.block_size)
        for block in seq.block_table[keep:]:
            self.pool.release(block)
        del seq.block_table[keep:]
        full = num_tokens // self.block_size
        if seq.num_hashed > full:
            # a rewritten block must not stay findable under its old contents' hash
            for block in seq.block_table[full:seq.num_hashed]:
                if self.pool.refs[block] == 1:
                    self.pool.unregister(block)
            seq.num_hashed = full
            del seq.hashes[full:]
        if num_tokens % self.block_size and self.pool.refs[seq.block_table[-1]] > 1:
            self._copy_on_write(seq, len(seq.block_table) - 1)
        seq.num_tokens = num_tokens

    def _copy_on_write(self, seq: SeqBlocks, index: int) -> None:
        """Give the sequence a private copy of a shared block it is about to overwrite."""
        old, new = seq.block_table[index], self.pool.allocate()
        if self._arrays is None:  # numpy views of the storage: a block's copy is 2 x layers small memcpys
            self._arrays = [t.numpy() for t in (*self.k, *self.v)]
        for a in self._arrays:
            a[new] = a[old]
        self.pool.release(old)
        seq.block_table[index] = new

    def free(self, seq: SeqBlocks) -> None:
        for block in seq.block_table:
            self.pool.release(block)
        seq.block_table.clear()
        seq.hashes.clear()
        seq.num_tokens = seq.num_hashed = 0

    def write(self, layer: int, blocks: torch.Tensor, offsets: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> None:
        """Store k, v [T, Hkv, D] at the positions (blocks[i], offsets[i]), rounded to the cache dtype."""
        dst_k, dst_v = self.k[layer], self.v[layer]
        dst_k[blocks, :, offsets] = k.to(dst_k.dtype)
        dst_v[blocks, :, offsets] = v.to(dst_v.dtype)
