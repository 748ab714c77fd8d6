"""The reference cache: what a request computes from the source image alone, kept for the
next request with the same source.

The reference latent ``r = VAE.encode(source)`` depends only on the source pixels (after
resizing), and the reference bank ``AppearanceEncoder(r, t, e)`` only on ``r`` and the
timestep ``t`` (``e`` is a constant of the model set). A second request that animates the
same photo (another driving video, another seed, the same or a different number of steps)
can therefore skip the VAE encode, and the appearance encoder at every timestep it has seen
before. Reusing stored tensors is exactly the same function: nothing is recomputed
differently, the same values are read back.

One cache belongs to one :class:`~.pipeline.AnimationPipeline`, so to one model set,
device and dtype; the key still names the device and dtype so that a cache handed to
another pipeline never returns a tensor of the wrong kind. The cache is an LRU bounded by
entry count and by bytes; when one source's banks alone would overflow the byte bound,
the entry keeps its latent and the banks that fit (later steps recompute theirs).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from torch import Tensor


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class ReferenceEntry:
    """What one source image yields: its latent (1, 4, h, w) and the banks computed so far,
    keyed by integer timestep (each a list of (1, L_j, C_j) tensors)."""

    latent: Tensor
    banks: dict[int, list[Tensor]] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return _nbytes([self.latent]) + sum(_nbytes(b) for b in self.banks.values())


class ReferenceCache:
    """LRU of :class:`ReferenceEntry` by source key.

    Args:
        max_entries: sources kept (0 disables the cache: ``lookup`` always misses and
            nothing is stored).
        max_bytes: bound on the bytes of all stored tensors together.
    """

    def __init__(self, max_entries: int = 4, max_bytes: int = 512 * 2**20):
        self.max_entries = int(max_entries)
        self.max_bytes = int(max_bytes)
        self._entries: "OrderedDict[str, ReferenceEntry]" = OrderedDict()
        #: counters for tests and reports
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0 and self.max_bytes > 0

    @staticmethod
    def key(pixels: np.ndarray, device: torch.device, dtype: torch.dtype) -> str:
        """Key of a source: a hash of its resized (H, W, 3) uint8 pixels and of their shape
        (so the output width and height are part of it: a 192 x 128 and a 128 x 192 request
        with the same bytes differ), and the device and dtype of the stored tensors."""
        arr = np.ascontiguousarray(pixels)
        h = hashlib.sha256(arr.tobytes())
        h.update(repr((arr.shape, str(arr.dtype), str(torch.device(device)), str(dtype))).encode())
        return h.hexdigest()

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def lookup(self, key: str) -> Optional[ReferenceEntry]:
        """The entry of ``key`` (now the most recently used), or None."""
        entry = self._entries.get(key) if self.enabled else None
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def insert(self, key: str, latent: Tensor) -> ReferenceEntry:
        """Store a new source's latent; returns its entry (a detached entry that is not
        stored when the cache is disabled or the latent alone exceeds the bound)."""
        entry = ReferenceEntry(latent)
        if not self.enabled or entry.nbytes > self.max_bytes:
            return entry
        self._entries[key] = entry
        self._entries.move_to_end(key)
        self._evict(keep=key)
        return entry

    def add_bank(self, key: str, entry: ReferenceEntry, t: int, bank: list[Tensor]) -> None:
        """Remember the bank of timestep ``t`` for ``entry`` if it fits (evicting older
        sources first)."""
        if self._entries.get(key) is not entry or t in entry.banks:
            return
        size = _nbytes(bank)
        if entry.nbytes + size > self.max_bytes:
            return  # this source's banks alone would overflow: keep what is there
        # a view of a larger batch (the original's batch-2 encoder) would pin it all
        entry.banks[t] = [b if b.untyped_storage().nbytes() == _nbytes([b]) else b.clone() for b in bank]
        self._evict(keep=key)

    def _evict(self, keep: str) -> None:
        while len(self._entries) > self.max_entries or (self.nbytes > self.max_bytes and len(self._entries) > 1):
            oldest = next(iter(self._entries))
            if oldest == keep:
                break
            del self._entries[oldest]
