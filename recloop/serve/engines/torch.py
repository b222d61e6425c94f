"""The ``torch`` engine: the torch module itself, eager, on CPU or CUDA."""

from __future__ import annotations

from collections.abc import Callable, Collection

import torch

from recloop.errors import ServingError
from recloop.models.base import SequentialEncoder
from recloop.serve.engines.base import Bucket, InferenceEngine, model_shape
from recloop.serve.engines.export import QueryModule


class TorchEngine(InferenceEngine):
    """The torch module itself (eager), on CPU or CUDA.

    On CPU the module reads the numpy input buffer through a tensor that shares its memory; on
    CUDA each bucket also has a device input tensor, and host buffers are pinned for the copies.
    """

    def __init__(
        self,
        model: SequentialEncoder,
        *,
        max_batch: int = 64,
        threads: int | None = None,
        device: str = "cpu",
        label: str = "model",
    ) -> None:
        self.name = "torch"
        dim, max_length, num_items = model_shape(model)
        super().__init__(
            dim=dim, max_length=max_length, num_items=num_items, max_batch=max_batch, label=label
        )
        self.device = _torch_device(device, label)
        if threads is not None:
            # Process-global: only when asked, since the same process may also train.
            torch.set_num_threads(threads)
        self.module: Callable[[torch.Tensor], torch.Tensor] = (
            QueryModule(model).to(self.device).eval()
        )

    def _new_bucket(self, batch: int, length: int) -> Bucket:
        on_cuda = self.device.type == "cuda"
        # Host buffers are torch tensors viewed as numpy (shared memory); pinned for fast
        # host <-> device copies on CUDA.
        ids_host = torch.zeros((batch, length), dtype=torch.int64, pin_memory=on_cuda)
        out_host = torch.zeros((batch, self.dim), dtype=torch.float32, pin_memory=on_cuda)
        ids_device = torch.zeros((batch, length), dtype=torch.int64, device=self.device)
        ids_input = ids_device if on_cuda else ids_host
        module = self.module

        def run() -> None:
            with torch.inference_mode():
                if on_cuda:
                    ids_device.copy_(ids_host, non_blocking=True)
                out_host.copy_(module(ids_input))  # synchronises with the device on CUDA

        return Bucket(batch, length, ids_host.numpy(), out_host.numpy(), run)

    def with_weights(
        self, model: SequentialEncoder, changed: Collection[str], *, label: str
    ) -> TorchEngine:
        """The new model in a new engine (the torch module is the model: nothing to reuse)."""
        return TorchEngine(
            model,
            max_batch=self.max_batch,
            device=str(self.device),
            label=label,
        )


def _torch_device(device: str, label: str) -> torch.device:
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ServingError(f"torch engine for {label}: bad device {device!r}: {error}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ServingError(f"torch engine for {label}: device {device!r} but CUDA is unavailable")
    if resolved.type not in ("cpu", "cuda"):
        raise ServingError(f"torch engine for {label}: device {device!r}; use cpu or cuda")
    return resolved
