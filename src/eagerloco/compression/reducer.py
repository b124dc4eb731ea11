"""A :class:`~eagerloco.comm.reducer.Reducer` whose bytes on the wire are the encoded ones.

``CompressedReducer.launch(delta)``:

1. with error feedback, adds the carried residual ``r`` into ``delta`` in place (``delta`` is then exactly this
   worker's contribution before encoding, as the Reducer contract says; eager mode applies that tensor);
2. encodes ``delta`` into one uint8 payload of ``E = codec.encoded_nbytes(n)`` bytes; with error feedback keeps
   ``r ← delta - decode(payload)`` for the next launch;
3. starts ONE asynchronous ``comm.all_gather`` of the payloads into an ``(M, E)`` uint8 buffer, and returns.

``PendingMean.wait()`` then decodes the M payloads and sums them in fp32 in rank order, and divides by M:
``mean = (Σ_{r=0}^{M-1} decode(payload_r)) / M``. Every worker decodes the same bytes with the same operations in
the same order, so every worker gets a bit-identical average, and the same bits whatever the backend (gloo
processes or in-process threads) -- the all-gather moves bytes, it does no arithmetic.

Bytes: each worker hands ``E`` bytes to the collective (``PendingMean.payload_bytes``, ``comm.stats.payload_bytes``);
under a ring all-gather it sends ``(M-1)·E`` (``comm.stats.wire_bytes``). fp32 all-reduce sends
``2(M-1)/M · 4n``, so the all-gather of encoded payloads is the cheaper one while ``E < 8n/M``: up to M = 15 for
fp4 (B = 128), M = 7 for fp8 / int8, M = 3 for bf16 / fp16. See docs/compression.md for larger M.

Nothing of the caller's ``delta`` is read or written after ``launch`` returns: the collective works on the
payload, a fresh buffer.
"""

from __future__ import annotations

from typing import Any

import torch

from eagerloco.comm.base import Communicator, Work
from eagerloco.comm.reducer import MeanReducer, Reducer
from eagerloco.compression.codecs import DEFAULT_BLOCK_SIZE, Codec, get_codec


class _PendingCompressedMean:
    """The all-gather of M encoded payloads in flight; ``wait()`` decodes and averages them (once)."""

    def __init__(
        self, work: Work, gathered: torch.Tensor, codec: Codec, numel: int, world_size: int, payload_bytes: int
    ) -> None:
        self._work = work
        self._gathered: torch.Tensor | None = gathered
        self._codec = codec
        self._numel = numel
        self._world_size = world_size
        self._mean: torch.Tensor | None = None
        self.payload_bytes = payload_bytes

    def wait(self, timeout: float | None = None) -> torch.Tensor:
        if self._mean is None:
            self._work.wait(timeout)
            gathered = self._gathered
            assert gathered is not None
            total = self._codec.decode(gathered[0], self._numel)
            for rank in range(1, self._world_size):  # rank order: every worker gets the same bits
                total.add_(self._codec.decode(gathered[rank], self._numel))
            self._mean = total.div_(self._world_size)
            self._gathered = None  # the encoded payloads are no longer needed
        return self._mean

    def is_completed(self) -> bool:
        return self._mean is not None or self._work.is_completed()


class CompressedReducer:
    """Average one fragment's outer gradients with encoded payloads on the wire (see the module docstring).

    Args:
        comm: this worker's endpoint in the outer process group.
        codec: a :class:`~eagerloco.compression.codecs.Codec`, or a codec name (default block size).
        error_feedback: carry each launch's encoding residual ``delta - decode(encode(delta))`` into the next
            launch's ``delta`` (in place, before encoding). The residual is part of :meth:`state_dict`.
    """

    def __init__(self, comm: Communicator, codec: Codec | str, error_feedback: bool = False) -> None:
        self.comm = comm
        self.codec = get_codec(codec) if isinstance(codec, str) else codec
        if not isinstance(self.codec, Codec):
            raise TypeError(f"codec must be a Codec or a codec name, got {type(codec).__name__}")
        self.name = self.codec.name
        self.error_feedback = bool(error_feedback)
        self._residual: torch.Tensor | None = None

    @property
    def residual(self) -> torch.Tensor | None:
        """The error-feedback residual to be added at the next launch (``None`` before the first one, or without
        error feedback)."""
        return self._residual

    def launch(self, delta: torch.Tensor) -> _PendingCompressedMean:
        if not isinstance(delta, torch.Tensor) or delta.dtype != torch.float32 or delta.dim() != 1:
            got = f"{tuple(delta.shape)} {delta.dtype}" if isinstance(delta, torch.Tensor) else type(delta).__name__
            raise TypeError(f"{type(self).__name__} averages flat fp32 outer gradients, got {got}")
        numel = delta.numel()
        if self.error_feedback and self._residual is not None:
            if self._residual.numel() != numel:
                raise ValueError(
                    f"error-feedback residual has {self._residual.numel()} values, this outer gradient {numel}: "
                    "one CompressedReducer per fragment"
                )
            delta.add_(self._residual.to(delta.device))
        try:
            payload = self.codec.encode(delta).payload
        except ValueError:
            if bool(torch.isfinite(delta).all()):
                raise  # a finite value the codec cannot represent (fp16 range): a configuration error
            # The codec refuses NaN/Inf, but the collective must still happen (the others are waiting for it):
            # send a payload that decodes to NaN, so every worker's average is NaN and all of them take the same
            # decision (the engine's nonfinite policy). The residual stays as it was (nothing was sent).
            payload = self.codec.nonfinite_payload(numel, delta.device)
        else:
            if self.error_feedback:
                self._residual = torch.sub(delta, self.codec.decode(payload, numel))
        world_size = self.comm.world_size
        gathered = torch.empty((world_size, payload.numel()), dtype=torch.uint8, device=payload.device)
        work = self.comm.all_gather(gathered, payload)
        return _PendingCompressedMean(work, gathered, self.codec, numel, world_size, payload.numel())

    def state_dict(self) -> dict[str, Any]:
        return {
            "codec": self.codec.name,
            "block_size": self.codec.block_size,
            "error_feedback": self.error_feedback,
            "residual": None if self._residual is None else self._residual.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("codec") != self.codec.name or state.get("block_size") != self.codec.block_size:
            raise ValueError(
                f"reducer state is for codec {state.get('codec')!r} (block size {state.get('block_size')}), this "
                f"reducer uses {self.codec.name!r} (block size {self.codec.block_size})"
            )
        residual = state.get("residual")
        if residual is not None and not self.error_feedback:
            raise ValueError(
                "reducer state carries an error-feedback residual but this reducer has error_feedback=False; "
                "dropping it would silently change the next outer gradient"
            )
        if residual is not None and (not isinstance(residual, torch.Tensor) or residual.dtype != torch.float32):
            raise ValueError(f"error-feedback residual must be an fp32 tensor, got {type(residual).__name__}")
        self._residual = None if residual is None else residual.detach().reshape(-1).clone()


def make_reducer(
    codec: str,
    comm: Communicator,
    *,
    error_feedback: bool = False,
    block_size: int = DEFAULT_BLOCK_SIZE,
    device: torch.device | str | None = None,
) -> Reducer:
    """The reducer for ``codec``: :class:`~eagerloco.comm.reducer.MeanReducer` (fp32 all-reduce) for ``'none'``,
    a :class:`CompressedReducer` otherwise. With ``device``, check now that the codec runs there.

    Raises:
        ValueError: unknown codec (the message lists the valid ones), bad block size, or error feedback asked of
            ``'none'`` (fp32 has no residual).
        RuntimeError: the codec cannot run with this torch build or on ``device``.
    """
    built = get_codec(codec, block_size, device=device)  # validates the name first
    if built.name == "none":
        if error_feedback:
            raise ValueError("error_feedback=True needs a lossy codec: codec 'none' (fp32) has no residual")
        return MeanReducer(comm)
    return CompressedReducer(comm, built, error_feedback=error_feedback)
