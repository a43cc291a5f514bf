"""KV-cache page bookkeeping with prefix caching. No torch: page ids only, the tensors live in
`fastllava.kv_cache.KVCache`.

Every full page gets a content hash chained over the whole prefix:
    h_i = blake2b(h_{i-1} || token ids of page i || (image hash, offset) of image tokens in page i)
An image's placeholder tokens all carry the same id, so the image's content hash (and the offset of
the page's first placeholder within the image) stands in for them. A page is registered under its
hash once its KV has been written (`commit`). A new sequence whose leading pages hash the same
reuses them (reference counted) and starts computing after them; at least one token is always left
to compute, because its logits are needed.

Freed pages that carry a hash stay findable until their page is handed out again: fresh pages come
from the never-hashed pool first, then from the least recently freed hashed page (LRU eviction).
"""

from __future__ import annotations

import collections
import hashlib
from array import array

from fastllava.runtime.sequence import Sequence


def page_hash(prev: bytes, seq: Sequence, page: int, page_size: int) -> bytes:
    start, end = page * page_size, (page + 1) * page_size
    h = hashlib.blake2b(prev, digest_size=16)
    h.update(array("q", seq.token_ids[start:end]).tobytes())
    for img in seq.images:
        lo, hi = max(start, img.start), min(end, img.end)
        if lo < hi:
            h.update(img.content_hash)
            h.update(array("q", (lo - img.start, hi - lo)).tobytes())
    return h.digest()


class BlockManager:
    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"need num_pages >= 1 and page_size >= 1, got {num_pages}, {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_pages
        self.hash_of: list[bytes | None] = [None] * num_pages
        self.page_of: dict[bytes, int] = {}
        self.free_plain = collections.deque(range(num_pages))       # ref 0, no hash
        self.free_cached: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU
        self._hashes: dict[int, list[bytes]] = {}                   # seq_id → its page hashes
        self._committed: dict[int, int] = {}     # seq_id → leading pages already looked at by commit

    # ---- queries ----------------------------------------------------------------------------
    @property
    def num_free_pages(self) -> int:
        """Pages a new allocation can take (cached-but-unused pages count: they can be evicted)."""
        return len(self.free_plain) + len(self.free_cached)

    @property
    def num_used_pages(self) -> int:
        return self.num_pages - self.num_free_pages

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def _seq_hashes(self, seq: Sequence, num_pages: int) -> list[bytes]:
        """Hashes of seq's first num_pages full pages (tokens never change, so they are kept)."""
        hashes = self._hashes.setdefault(seq.seq_id, [])
        while len(hashes) < num_pages:
            prev = hashes[-1] if hashes else b""
            hashes.append(page_hash(prev, seq, len(hashes), self.page_size))
        return hashes[:num_pages]

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached pages holding seq's leading full pages (leaving >= 1 token to compute)."""
        if not self.enable_prefix_caching:
            return []
        hits = []
        for h in self._seq_hashes(seq, seq.max_cached_tokens // self.page_size):
            page = self.page_of.get(h)
            if page is None:
                break
            hits.append(page)
        return hits

    def can_allocate(self, hits: list[int], num_tokens: int) -> bool:
        """Could a sequence with no pages take `hits` and grow to num_tokens tokens?"""
        revived = sum(1 for p in hits if self.ref_counts[p] == 0)   # leave the free pool
        fresh = self.pages_for(num_tokens) - len(hits)
        return revived + fresh <= self.num_free_pages

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.pages_for(num_tokens) - len(seq.block_table) <= self.num_free_pages

    # ---- changes ----------------------------------------------------------------------------
    def allocate(self, seq: Sequence, hits: list[int], num_tokens: int) -> None:
        """Give a page-less sequence its cached prefix pages, then fresh ones up to num_tokens."""
        assert not seq.block_table and seq.num_computed == 0, seq
        assert self.can_allocate(hits, num_tokens), (hits, num_tokens, self.num_free_pages)
        for page in hits:
            if self.ref_counts[page] == 0:
                del self.free_cached[page]
            self.ref_counts[page] += 1
            seq.block_table.append(page)
        seq.num_computed = len(hits) * self.page_size
        self._committed[seq.seq_id] = len(hits)
        self.grow(seq, num_tokens)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Append fresh pages so that seq.block_table covers num_tokens tokens."""
        need = self.pages_for(num_tokens) - len(seq.block_table)
        if need > self.num_free_pages:
            raise RuntimeError(f"out of KV pages: need {need}, {self.num_free_pages} free")
        for _ in range(need):
            seq.block_table.append(self._take_fresh())

    def _take_fresh(self) -> int:
        if self.free_plain:
            page = self.free_plain.popleft()
        else:                                   # evict the least recently freed cached page
            page, _ = self.free_cached.popitem(last=False)
            del self.page_of[self.hash_of[page]]
            self.hash_of[page] = None
        self.ref_counts[page] = 1
        return page

    def commit(self, seq: Sequence, num_computed: int | None = None) -> None:
        """Register seq's full, computed pages under their hashes (call after their KV is written
        and their tokens are known). num_computed (default seq.num_computed): the overlapped loop
        commits a step's tokens while the next step already counts its own."""
        if not self.enable_prefix_caching:
            return
        full = (seq.num_computed if num_computed is None else num_computed) // self.page_size
        done = self._committed.get(seq.seq_id, 0)
        if full <= done:
            return
        hashes = self._seq_hashes(seq, full)
        for i in range(done, full):
            page, h = seq.block_table[i], hashes[i]
            if self.hash_of[page] is None and h not in self.page_of:
                self.hash_of[page] = h
                self.page_of[h] = page
        self._committed[seq.seq_id] = full

    def free(self, seq: Sequence) -> None:
        """Drop seq's references; tail pages are freed first, so they are evicted first."""
        for page in reversed(seq.block_table):
            self.ref_counts[page] -= 1
            assert self.ref_counts[page] >= 0, (page, seq)
            if self.ref_counts[page] == 0:
                if self.hash_of[page] is None:
                    self.free_plain.append(page)
                else:
                    self.free_cached[page] = None
        seq.block_table.clear()
        seq.num_page_resets += 1
        seq.num_computed = 0
        self._committed.pop(seq.seq_id, None)

    def reset_prefix_cache(self) -> None:
        """Forget every page hash: no later request hits KV computed before this call. Pages in
        use stay with their sequences; free cached pages become plain free pages."""
        for page in self.free_cached:
            self.free_plain.append(page)
        self.free_cached.clear()
        self.page_of.clear()
        self.hash_of = [None] * self.num_pages

    def forget(self, seq: Sequence) -> None:
        """seq is finished for good: free its pages and drop its hash memo."""
        self.free(seq)
        self._hashes.pop(seq.seq_id, None)
