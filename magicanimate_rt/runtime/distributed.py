"""One clip across processes: the window split on ``torch.distributed``.

Under ``torchrun`` (``WORLD_SIZE > 1`` in the environment) every process builds the same
pipeline and calls ``animate`` with the same request; :class:`Ranks` is what they share:

- the process group, initialised from the environment (``env://``: ``MASTER_ADDR``,
  ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``): NCCL for CUDA, gloo for the
  CPU, with a timeout (:data:`TIMEOUT_ENV`, default :data:`DEFAULT_TIMEOUT_S` s) that bounds
  every wait on another rank; each rank computes on ``cuda:LOCAL_RANK``;
- :meth:`Ranks.agree`: before any work, every rank's request digest (or the one-line error
  its inputs gave) is compared; a failed or different request stops every rank with one
  line naming the rank;
- :meth:`Ranks.share`: a balanced, contiguous share of the windows for each rank (the
  sampling loop runs only its share and computes ControlNet residuals only for the frames
  its windows need);
- :meth:`Ranks.gather_windows`: every rank's per-window predictions to every rank, in
  window order, so each rank adds the same predictions in the same order as one process
  would (the sums do not depend on the number of ranks beyond the predictions' own
  rounding); :meth:`Ranks.broadcast` then keeps rank 0's latents on every rank after
  each step (guards against any divergence between GPUs);
- :meth:`Ranks.gather_to_root`: decoded frame chunks (round-robin over the ranks) to rank 0,
  which writes them in order, one round at a time (bounded memory).

Every collective failure (a rank killed, out of memory, the timeout) becomes a
:class:`~magicanimate_rt.errors.DistributedError` with one line, so every rank exits with
code 2 and leaves no output file (the writers are atomic). The original's ``--dist`` mode
computes every frame's ControlNet residuals on every rank and gathers predictions to rank 0;
this does less of both.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from datetime import timedelta
from typing import Iterator, Optional

import numpy as np
import torch
from torch import Tensor

from ..errors import DistributedError, InputError

#: seconds any rank waits for the others before giving up (environment variable)
TIMEOUT_ENV = "MAGICANIMATE_RT_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0


def world_size_from_env() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise InputError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from None


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None:
        raise InputError(f"WORLD_SIZE > 1 but {name} is not set: launch with torchrun (or set RANK, LOCAL_RANK, "
                         "MASTER_ADDR and MASTER_PORT)")
    try:
        return int(value)
    except ValueError:
        raise InputError(f"{name}={value!r} is not a number") from None


def timeout_from_env() -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise InputError(f"{TIMEOUT_ENV}={raw!r}: expected a number of seconds > 0")
    return value


def request_digest(*parts) -> str:
    """sha256 over a request's arrays (their dtype, shape and bytes) and other values (their
    repr): equal digests on every rank mean the same request."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, np.ndarray):
            a = np.ascontiguousarray(p)
            h.update(f"{a.dtype}{a.shape}".encode())
            h.update(memoryview(a).cast("B"))
        else:
            h.update(repr(p).encode())
        h.update(b"\0")
    return h.hexdigest()


class Ranks:
    """This process's place in a multi-process run and the collectives the pipeline uses."""

    def __init__(self, rank: int, size: int, local_rank: int, device: torch.device, owns_group: bool,
                 timeout_s: float):
        self.rank, self.size, self.local_rank = rank, size, local_rank
        self.device = device
        self.timeout_s = timeout_s
        self._owns_group = owns_group

    # ------------------------------------------------------------------ set-up
    @classmethod
    def from_environment(cls, device) -> Optional["Ranks"]:
        """None without torchrun (``WORLD_SIZE`` unset or 1); else join (or initialise) the
        process group and pick this rank's device (``cuda`` -> ``cuda:LOCAL_RANK``)."""
        size = world_size_from_env()
        if size <= 1:
            return None
        rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
        return cls._init(rank, size, local_rank, device, "env://", timeout_from_env())

    @classmethod
    def join(cls, rank: int, size: int, device, master_addr: str, master_port: int,
             timeout_s: Optional[float] = None, local_rank: int = 0) -> "Ranks":
        """Join, as ``rank`` of ``size``, the group whose rank 0 listens on
        ``master_addr:master_port`` (a TCP rendezvous), without torchrun's environment: for
        launchers that start the ranks themselves (a Ray Serve replica and its rank actors,
        ``serve/ray_app.py``). ``local_rank``: the index of this rank's GPU among those it
        sees (0 where, as under Ray, each rank sees only its own)."""
        timeout = timeout_from_env() if timeout_s is None else float(timeout_s)
        return cls._init(rank, size, local_rank, device, f"tcp://{master_addr}:{int(master_port)}", timeout)

    @classmethod
    def _init(cls, rank: int, size: int, local_rank: int, device, init_method: str, timeout: float) -> "Ranks":
        import torch.distributed as dist

        device = cls.rank_device(device, local_rank)
        owns = False
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            if device.type == "cuda":
                torch.cuda.set_device(device)
            try:
                dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size,
                                        timeout=timedelta(seconds=timeout))
            except (RuntimeError, ValueError) as e:
                raise DistributedError(f"rank {rank}: cannot join the process group of {size} ranks "
                                       f"({_first_line(e)})") from None
            owns = True
        elif dist.get_world_size() != size or dist.get_rank() != rank:
            raise InputError(f"the initialised process group (rank {dist.get_rank()} of {dist.get_world_size()}) "
                             f"is not this one (rank {rank} of {size})")
        return cls(rank, size, local_rank, device, owns, timeout)

    @staticmethod
    def rank_device(device, local_rank: int) -> torch.device:
        """The device a rank computes on: ``cuda`` (or ``cuda:N``) -> ``cuda:LOCAL_RANK``,
        refused when the machine has fewer GPUs than local ranks; the CPU stays the CPU."""
        device = torch.device(device)
        if device.type != "cuda":
            return device
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if local_rank >= count:
            raise InputError(f"local rank {local_rank} needs GPU cuda:{local_rank}, but this machine has {count} "
                             f"GPU(s): start at most {count} processes per node (torchrun --nproc-per-node {count})")
        return torch.device("cuda", local_rank)

    def close(self) -> None:
        """Leave the process group if this object created it."""
        if self._owns_group:
            import torch.distributed as dist

            self._owns_group = False
            if dist.is_initialized():
                dist.destroy_process_group()

    # ------------------------------------------------------------------ collectives
    @contextlib.contextmanager
    def _collective(self, what: str) -> Iterator[None]:
        """Turn a collective's failure into one DistributedError line."""
        try:
            yield
        except DistributedError:
            raise
        except (RuntimeError, ValueError, ConnectionError) as e:  # gloo/NCCL errors, timeouts, closed peers
            raise DistributedError(f"rank {self.rank} of {self.size}: {what} failed: another rank stopped or did not "
                                   f"answer within {self.timeout_s:g} s ({_first_line(e)})") from None

    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def agree(self, digest: Optional[str], error: Optional[str]) -> None:
        """Every rank's request ``digest`` (or the one-line ``error`` its inputs gave) to
        every rank: raise on every rank when any failed (naming it) or when the requests
        differ. Returns only when all ranks hold the same request."""
        import torch.distributed as dist

        everyone: list = [None] * self.size
        with self._collective("comparing the request across ranks"):
            dist.all_gather_object(everyone, (digest, error))
        failed = [(r, err) for r, (_, err) in enumerate(everyone) if err is not None]
        if failed:
            r, err = failed[0]
            more = f" (and {len(failed) - 1} other rank(s))" if len(failed) > 1 else ""
            cls = InputError if r == self.rank else DistributedError
            raise cls(f"rank {r}: {err}{more}")
        digests = [d for d, _ in everyone]
        if len(set(digests)) > 1:
            groups = {}
            for r, d in enumerate(digests):
                groups.setdefault(d, []).append(r)
            parts = "; ".join(f"rank{'s' if len(rs) > 1 else ''} {','.join(map(str, rs))}: request {d[:12]}"
                              for d, rs in groups.items())
            raise InputError(f"the ranks were given different requests ({parts}); every rank must call animate "
                             "with the same arguments and inputs")

    def broadcast_object(self, obj):
        """Rank 0's picklable ``obj`` on every rank (e.g. seeds a front end drew)."""
        import torch.distributed as dist

        box = [obj]
        with self._collective("sharing rank 0's choices"):
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def share(self, n: int) -> range:
        """This rank's balanced, contiguous share of ``n`` items (windows): the first
        ``n % size`` ranks take one more."""
        base, extra = divmod(n, self.size)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (1 if self.rank < extra else 0))

    def owner_shares(self, n: int) -> list[range]:
        """Every rank's share of ``n`` items, in rank order."""
        base, extra = divmod(n, self.size)
        out, start = [], 0
        for r in range(self.size):
            stop = start + base + (1 if r < extra else 0)
            out.append(range(start, stop))
            start = stop
        return out

    def gather_windows(self, local: Tensor, n: int) -> Tensor:
        """``local`` (len(share(n)), ...) per-window tensors of this rank -> (n, ...) of all
        ranks in window order, on every rank."""
        import torch.distributed as dist

        shares = self.owner_shares(n)
        most = max(len(s) for s in shares)
        dev = self._comm_device()
        send = local.new_zeros((most, *local.shape[1:]), device=dev)
        send[: local.shape[0]].copy_(local)
        recv = [torch.empty_like(send) for _ in range(self.size)]
        with self._collective("gathering the windows' noise predictions"):
            dist.all_gather(recv, send)
        parts = [recv[r][: len(s)] for r, s in enumerate(shares)]
        return torch.cat(parts).to(local.device)

    def broadcast(self, t: Tensor) -> Tensor:
        """Rank 0's ``t`` on every rank (returned; on the CPU the tensor itself is overwritten)."""
        import torch.distributed as dist

        dev = self._comm_device()
        buf = t.contiguous().to(dev)
        with self._collective("sharing the latents"):
            dist.broadcast(buf, src=0)
        return buf.to(t.device)

    def gather_to_root(self, part: Tensor, count: int) -> Optional[list[Tensor]]:
        """Each rank's ``part`` (padded to one shape on every rank) and how many of its rows
        are real -> on rank 0, the real rows of every rank's part in rank order; None on the
        others."""
        import torch.distributed as dist

        dev = self._comm_device()
        send = part.contiguous().to(dev)
        n = torch.tensor([count], dtype=torch.int64, device=dev)
        counts = [torch.empty_like(n) for _ in range(self.size)] if self.rank == 0 else None
        parts = [torch.empty_like(send) for _ in range(self.size)] if self.rank == 0 else None
        with self._collective("gathering decoded frames on rank 0"):
            dist.gather(n, counts, dst=0)
            dist.gather(send, parts, dst=0)
        if self.rank != 0:
            return None
        return [p[: int(c)] for p, c in zip(parts, counts)]

    def describe(self) -> str:
        return f"rank {self.rank} of {self.size} on {self.device}"


def _first_line(e: BaseException) -> str:
    """The gist of a backend's error: its first line, without gloo's source location and
    the advice after the first sentence."""
    text = str(e).strip().splitlines()
    line = text[0] if text else type(e).__name__
    line = re.sub(r"^\[[^\]]*\]\s*", "", line)  # "[/path/to/pair.cc:553] Connection closed ..."
    line = line.split(". ")[0].rstrip(".")
    return line[:200]
