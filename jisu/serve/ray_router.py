"""Cache-aware routing for the Ray Serve deployment: the prefix block hashes of a request, and a Ray
Serve RequestRouter that sends a request to the replica holding its prefix (remembered prefixes,
else consistent hashing), bounded by load, with power-of-two-choices for prompts without a prefix."""
from __future__ import annotations

import hashlib
import math
import random
import threading
import weakref
from collections import OrderedDict
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

BLOCK_TOKENS = 16          # the engine's KV block size (EngineConfig.block_size): the unit of prefix caching
CHARS_PER_TOKEN = 4        # a block of prompt text ~ one KV block of tokens
BLOCK_CHARS = BLOCK_TOKENS * CHARS_PER_TOKEN
MAX_BLOCKS = 64            # prefix blocks hashed per request (~1k tokens): deeper prefixes match there too
RING_BLOCKS = 4            # the consistent-hashing key: the hash of the first (up to) 4 blocks

_ROUTERS: "weakref.WeakSet[PrefixHashRouter]" = weakref.WeakSet()   # this process's routers (for /metrics)


def prompt_text(path: str, body: Any) -> str | None:
    """The text whose prefix decides the replica: the messages (role and text of each, in order) of
    a chat request, the prompt of a completion; None when the body has neither."""
    if not isinstance(body, dict):
        return None
    if path.endswith("/chat/completions") and isinstance(body.get("messages"), list):
        parts = []
        for m in body["messages"]:
            if isinstance(m, dict):
                parts.append(f"{m.get('role', '')}\x00{_content_text(m.get('content'))}\x01")
        return "".join(parts)
    if path.endswith("/completions"):
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1:          # one prompt given as a list
            p = p[0]
        if isinstance(p, str):
            return p
        if isinstance(p, list) and all(isinstance(t, int) for t in p):   # token ids: ~one token a char
            return "".join(chr(0x100 + (t % 0xFE00)) * CHARS_PER_TOKEN for t in p)
    return None


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(c.get("text", "") for c in content if isinstance(c, dict) and isinstance(c.get("text"), str))
    return ""


def block_hashes(text: str | None, block_chars: int = BLOCK_CHARS, max_blocks: int = MAX_BLOCKS) -> list[int]:
    """The chain hashes of the text's full blocks (as the KV cache's chain_hash over token blocks):
    hash i covers blocks 0..i. Stable across processes (blake2b, not Python's salted hash)."""
    if not text:
        return []
    out, parent = [], b""
    for i in range(min(len(text) // block_chars, max_blocks)):
        d = hashlib.blake2b(parent + text[i * block_chars:(i + 1) * block_chars].encode("utf-8", "replace"),
                            digest_size=8).digest()
        out.append(int.from_bytes(d, "little"))
        parent = d
    return out


def ring_order(key: int, replica_ids: list[str]) -> list[str]:
    """The replicas in the key's consistent-hashing order (rendezvous hashing: each replica scores
    hash(key, replica); a replica that goes away only moves the keys it held)."""
    def score(rid: str) -> bytes:
        return hashlib.blake2b(key.to_bytes(8, "little") + rid.encode(), digest_size=8).digest()
    return sorted(replica_ids, key=score, reverse=True)


def choose(hashes: list[int], loads: dict[str, int], affinity: dict[int, str], *, balance: float = 1.25,
           rng: random.Random | None = None) -> tuple[str | None, str]:
    """The replica for a request with prefix `hashes` given each replica's ongoing requests, and why:
    'affinity' (it served the longest known prefix), 'ring' (consistent hashing of the first
    blocks), 'overflow' (the preferred one was over the load bound ceil(balance x mean load)) or
    'balance' (no prefix: the less loaded of two random replicas)."""
    if not loads:
        return None, "none"
    ids = list(loads)
    bound = math.ceil(balance * (sum(loads.values()) + 1) / len(ids))
    if hashes:
        for h in reversed(hashes):
            rid = affinity.get(h)
            if rid in loads:
                if loads[rid] < bound:
                    return rid, "affinity"
                break
        order = ring_order(hashes[min(len(hashes), RING_BLOCKS) - 1], ids)
        for i, rid in enumerate(order):
            if loads[rid] < bound:
                return rid, "ring" if i == 0 else "overflow"
        return min(order, key=lambda r: loads[r]), "overflow"
    pick = (rng or random).sample(ids, min(2, len(ids)))
    return min(pick, key=lambda r: loads[r]), "balance"


class PrefixHashRouter(RequestRouter):
    """Routes the engine deployment's requests: payload['prefix'] (block hashes) picks the replica as
    `choose` does; payload['pin'] (a replica id) goes to that replica only (per-replica /metrics);
    payload['prefer'] (a replica id `decide` picked) goes there while it is a candidate."""

    def initialize_state(self, balance: float = 1.25, max_entries: int = 200_000, **kwargs):
        self._balance = balance
        self._max_entries = max_entries
        self._affinity: OrderedDict[int, str] = OrderedDict()   # prefix block hash -> replica id (LRU)
        self._lock = threading.Lock()
        self.decisions: dict[str, int] = {}                     # reason -> count
        _registry().add(self)

    def replica_ids(self) -> list[str]:
        return [r.unique_id for r in self._replica_keys()]

    def _replica_keys(self) -> list[ReplicaID]:
        for _ in range(5):                                      # read from another thread: retry a resize
            try:
                return list(self._replicas)
            except RuntimeError:
                continue
        return []

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        payload = _payload(pending_request)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        pin = payload.get("pin")
        if pin is not None:
            return [[by_id[pin]]] if pin in by_id else []
        cache = self._replica_queue_len_cache
        loads = {rid: cache.get(r.replica_id) or 0 for rid, r in by_id.items()}
        hashes = payload.get("prefix") or []
        prefer = payload.get("prefer")
        if prefer in by_id:
            rest = sorted((r for i, r in by_id.items() if i != prefer), key=lambda r: loads[r.replica_id.unique_id])
            return [[by_id[prefer]], rest] if rest else [[by_id[prefer]]]
        with self._lock:
            rid, reason = choose(hashes, loads, self._affinity, balance=self._balance)
            self.decisions[reason] = self.decisions.get(reason, 0) + 1
        if rid is None:
            return []
        self._remember(hashes, rid)    # on_request_routed corrects it where Ray reports the final replica
        rest = sorted((r for i, r in by_id.items() if i != rid), key=lambda r: loads[r.replica_id.unique_id])
        return [[by_id[rid]], rest] if rest else [[by_id[rid]]]

    def decide(self, hashes: list[int], self_id: str, self_load: int) -> str | None:
        """The replica for a request that arrived at replica `self_id` (whose own load is known
        exactly), chosen as `choose` does over the replicas this router knows; the prefix is
        remembered for the choice. None when no replica is known."""
        by_id = {r.unique_id: r for r in self._replica_keys()}
        ids = list(by_id) + ([] if self_id in by_id else [self_id])
        cache = self._replica_queue_len_cache
        loads = {rid: (self_load if rid == self_id else (cache.get(by_id[rid]) or 0) if rid in by_id else 0)
                 for rid in ids}
        with self._lock:
            rid, reason = choose(hashes, loads, self._affinity, balance=self._balance)
            if not hashes and self_id in loads and loads[self_id] <= loads.get(rid, 0):
                rid, reason = self_id, "local"       # no prefix: stay here unless another is idler
            self.decisions[reason] = self.decisions.get(reason, 0) + 1
        if rid is not None:
            self._remember(hashes, rid)
        return rid

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        self._remember(_payload(pending_request).get("prefix") or [], replica_id.unique_id)

    def _remember(self, hashes: list[int], rid: str) -> None:
        if not hashes:
            return
        with self._lock:
            for h in hashes:
                self._affinity[h] = rid
                self._affinity.move_to_end(h)
            while len(self._affinity) > self._max_entries:
                self._affinity.popitem(last=False)


def _registry() -> "weakref.WeakSet[PrefixHashRouter]":
    """This process's routers. Ray ships the router class by value (its own copy of this module's
    globals), so the set is looked up in the imported module."""
    import importlib

    return importlib.import_module("jisu.serve.ray_router")._ROUTERS


def _payload(pending_request: PendingRequest | None) -> dict:
    if pending_request is not None and pending_request.args and isinstance(pending_request.args[0], dict):
        return pending_request.args[0]
    return {}


def local_router() -> "PrefixHashRouter | None":
    """This process's router for the engine deployment (made with its first handle call)."""
    for r in list(_ROUTERS):
        return r
    return None


def live_replica_ids() -> list[str]:
    """The engine replicas this process's routers know of (empty before the first request)."""
    ids: list[str] = []
    for r in list(_ROUTERS):
        ids += [i for i in r.replica_ids() if i not in ids]
    return ids


def routing_decisions() -> dict[str, int]:
    out: dict[str, int] = {}
    for r in list(_ROUTERS):
        for k, v in dict(r.decisions).items():
            out[k] = out.get(k, 0) + v
    return out
