"""Exact accounting of saved-for-backward activations, and BPipe's eviction of them.

`ActivationTracker.capture(mb)` wraps a micro-batch's forward in
`torch.autograd.graph.saved_tensors_hooks`: every tensor autograd saves is attributed to that
micro-batch by its storage (parameter and buffer storages excluded, storages de-duplicated), so
the live byte count per stage is exact to the byte on any device. Evicting a micro-batch packs
its storages into one contiguous buffer and frees them (`UntypedStorage.resize_(0)`, so every
tensor and graph node that refers to them stays valid); loading restores them in place.
"""

from __future__ import annotations

import contextlib
from collections.abc import Hashable, Iterator

import torch


class SimulatedOOM(RuntimeError):
    """Raised when live memory on this rank would exceed the trial's `--memory-limit`."""


def _byte_view(storage: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(
        storage, 0, (storage.nbytes(),), (1,)
    )


class ActivationTracker:
    """Per-micro-batch saved-tensor storages and the live byte count of one rank.

    `static_bytes` (parameters, gradients, optimizer state) is added to the live count when
    checking `limit`, so the limit is a whole-device cap.
    """

    def __init__(self, excluded: set[int], *, static_bytes: int = 0, limit: int | None = None) -> None:
        self.excluded = excluded
        self.static_bytes = static_bytes
        self.limit = limit
        # micro-batch (any key: the executor's is (micro-batch, chunk)) -> {data_ptr at capture
        # time: (storage, its size in bytes)}
        self.storages: dict[Hashable, dict[int, tuple[torch.UntypedStorage, int]]] = {}
        self.sizes: dict[Hashable, int] = {}
        self.extra: dict[object, int] = {}  # buffers not owned by a micro-batch (stashes, loads)
        self.live = 0
        self.peak = 0

    @classmethod
    def for_module(cls, module: torch.nn.Module, **kwargs: int | None) -> ActivationTracker:
        """A tracker that ignores `module`'s parameters and buffers."""
        excluded = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
        return cls(excluded, **kwargs)  # type: ignore[arg-type]

    # -- counting -------------------------------------------------------------------------
    def _add(self, nbytes: int) -> None:
        self.live += nbytes
        if self.live > self.peak:
            self.peak = self.live
        if self.limit is not None and nbytes > 0 and self.live + self.static_bytes > self.limit:
            raise SimulatedOOM(
                f"needs {self.live + self.static_bytes} bytes ({self.live} activations + "
                f"{self.static_bytes} parameters, gradients and optimizer state) > memory limit {self.limit}"
            )

    @contextlib.contextmanager
    def capture(self, mb: Hashable) -> Iterator[None]:
        """Attribute every tensor saved for backward inside the block to micro-batch `mb`."""
        owned = self.storages.setdefault(mb, {})

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr and ptr not in self.excluded and ptr not in owned:
                owned[ptr] = (storage, storage.nbytes())
                self.sizes[mb] = self.sizes.get(mb, 0) + storage.nbytes()
                self._add(storage.nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield

    def release(self, mb: Hashable) -> None:
        """The micro-batch's backward is done: its saved tensors are gone."""
        self.storages.pop(mb, None)
        self._add(-self.sizes.pop(mb, 0))

    def hold(self, key: object, nbytes: int) -> None:
        """Count a buffer that is not a micro-batch's saved tensors (a stash, a load target)."""
        self.extra[key] = nbytes
        self._add(nbytes)

    def drop(self, key: object) -> None:
        self._add(-self.extra.pop(key))

    # -- eviction ---------------------------------------------------------------------------
    def pack(self, mb: Hashable) -> torch.Tensor:
        """Copy micro-batch `mb`'s saved storages into one contiguous byte buffer."""
        entries = list(self.storages[mb].values())
        device = entries[0][0].device if entries else torch.device("cpu")
        flat = torch.empty(self.sizes.get(mb, 0), dtype=torch.uint8, device=device)
        offset = 0
        for storage, n in entries:
            flat[offset : offset + n].copy_(_byte_view(storage))
            offset += n
        return flat

    def free_storages(self, mb: Hashable) -> None:
        """Free the evicted micro-batch's storages in place and stop counting them."""
        for storage, _ in self.storages[mb].values():
            storage.resize_(0)
        self._add(-self.sizes.get(mb, 0))

    def unpack(self, mb: Hashable, flat: torch.Tensor) -> None:
        """Restore micro-batch `mb`'s storages from a buffer made by `pack`."""
        offset = 0
        for storage, n in self.storages[mb].values():
            storage.resize_(n)
            _byte_view(storage).copy_(flat[offset : offset + n])
            offset += n
        self._add(self.sizes.get(mb, 0))
