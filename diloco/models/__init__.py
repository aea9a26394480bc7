"""Language models the trainers can train.

Model contract
--------------
Every model a trainer accepts (:class:`GPT`, :class:`TinyMLP`, or a new one) must:

* be constructed as ``Model(vocab_size, block_size, **kwargs)`` with all other
  arguments keyword-only, and raise ``ValueError`` whose one-line message names the
  offending argument when an argument is invalid;
* implement ``forward(idx, targets=None) -> (logits, loss)`` where ``idx`` and
  ``targets`` are LongTensors of shape [B, T] with ``T <= block_size`` (else
  ``ValueError``), ``logits`` has shape [B, T, vocab_size] and ``loss`` is the mean
  cross-entropy scalar, or ``None`` when ``targets`` is ``None``;
* implement ``num_params(non_embedding=False) -> int``;
* hold only fp32 parameters and no buffers that change during training (a constant
  buffer must be registered with ``persistent=False``);
* never cache parameter tensors outside their ``nn.Parameter`` objects: trainers
  rebind every ``param.data`` and ``param.grad`` to views into a flat [K, P] matrix
  (one row per simulated worker), so the model must read weights through its
  Parameters at every call;
* tie weights, if at all, by sharing one ``nn.Parameter`` object, so that
  ``parameters()`` lists it once.

:class:`LanguageModel` is a structural type for this contract.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor

from diloco.models.gpt import GPT
from diloco.models.mlp import TinyMLP

__all__ = ["GPT", "LanguageModel", "TinyMLP"]


@runtime_checkable
class LanguageModel(Protocol):
    """Structural type of the model contract described in the module docstring."""

    vocab_size: int
    block_size: int

    def __call__(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Return ``(logits [B, T, vocab_size], mean loss or None)``."""
        ...

    def num_params(self, non_embedding: bool = False) -> int:
        """Return the number of parameters, each shared Parameter counted once."""
        ...
