"""Streaming DiLoCo: DiLoCo that syncs one fragment of the model at a time, overlapped.

Douillard et al., "Streaming DiLoCo with overlapping communication: Towards a Distributed
Free Lunch", arXiv 2501.18512. The parameters are split into ``P`` fragments (strided over
transformer blocks). A round is ``H/P`` inner steps; at the end of round ``r`` (step ``t``)
only fragment ``f = r % P`` is exchanged, so every fragment is synced once per ``H`` steps:

    delta_i[f] = theta_global[f] - theta_i[f]      (pseudo-gradient at step t)
    theta_global[f] = OuterOpt_f.step(mean_i delta_i[f])   (one optimizer per fragment)
    at step t + tau:                               (communication overlapped with tau steps)
        theta_i[f] = (1 - alpha) * theta_global[f] + alpha * theta_i[f]

where ``theta_i[f]`` in the merge is the worker's *current* value, trained ``tau`` steps past
the one the pseudo-gradient was taken from. Over ``H`` steps the bytes sent equal one DiLoCo
sync. ``P=1, tau=0, alpha=0`` is DiLoCo. Rule for ``tau``: ``0 <= tau < H``, so a fragment's
merge always lands before its own next sync (one exchange per fragment in flight; with
``tau >= H/P`` several fragments overlap, each still merged exactly ``tau`` steps late).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from diloco.algorithms.base import AlgorithmBase, Payload, StepContext
from diloco.algorithms.diloco import nesterov
from diloco.config import ConfigError, build_optimizer
from diloco.workers import WorkerGroup

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def fragment_indices(model: nn.Module, fragments: int) -> list[torch.Tensor]:
    """Positions in the flat parameter vector of each fragment (a partition of ``[0, P)``).

    A tensor of transformer block ``blocks.{i}.*`` goes to fragment ``i % fragments``; every
    other tensor (embeddings, final norm, head, or all tensors of a model without blocks) goes
    to fragment ``j % fragments``, ``j`` its index among the non-block tensors. The order is
    ``model.named_parameters()``, the worker matrix's order (a tied weight appears once).
    """
    parts: list[list[torch.Tensor]] = [[] for _ in range(fragments)]
    offset, other = 0, 0
    for name, p in model.named_parameters():
        match = _BLOCK.search(name)
        if match is not None:
            f = int(match.group(1)) % fragments
        else:
            f, other = other % fragments, other + 1
        parts[f].append(torch.arange(offset, offset + p.numel()))
        offset += p.numel()
    for f, part in enumerate(parts):
        if not part:
            raise ConfigError(
                f"algorithm.fragments={fragments}",
                f"fragment {f} would be empty: the model has too few blocks or tensors",
            )
    return [torch.cat(part) for part in parts]


class StreamingDiLoCo(AlgorithmBase):
    """Streaming DiLoCo over the worker matrix: one fragment per round, delayed merge."""

    @dataclass
    class Config:
        """``inner_steps`` is H (steps between two syncs of one fragment), ``fragments`` is P.

        ``tau`` is the number of inner steps the exchange overlaps (``0 <= tau < H``);
        ``alpha`` the weight of the worker's local value in the merge (0: take the global).
        """

        name: str = "streaming_diloco"
        inner_steps: int = field(default=50, metadata={"ge": 1})
        fragments: int = field(default=2, metadata={"ge": 1})
        tau: int = field(default=5, metadata={"ge": 0})
        alpha: float = field(default=0.5, metadata={"ge": 0.0, "le": 1.0})
        outer_optimizer: dict[str, Any] = field(default_factory=nesterov)

    payload_kind = "fragment"

    @staticmethod
    def schedule(cfg: Config) -> tuple[int, int, int]:
        """``(round length H/P, fragments P, overlap tau)``, after checking ``H % P`` and tau."""
        h, p = cfg.inner_steps, cfg.fragments
        if h % p:
            raise ConfigError(f"algorithm.fragments={p}", f"must divide algorithm.inner_steps={h}")
        if cfg.tau >= h:
            raise ConfigError(
                f"algorithm.tau={cfg.tau}",
                f"must be < algorithm.inner_steps={h} (merge before the fragment's next sync)",
            )
        return h // p, p, cfg.tau

    def __init__(self, cfg: Config, group: WorkerGroup) -> None:
        self.name = cfg.name
        self.inner_steps, self.fragments, self.tau = self.schedule(cfg)
        self.alpha = cfg.alpha
        self.indices = fragment_indices(group.global_model, self.fragments)
        factory = build_optimizer(cfg.outer_optimizer, "algorithm.outer_optimizer")
        self.outer_params: list[nn.Parameter] = []
        self.outers: list[torch.optim.Optimizer] = []
        for idx in self.indices:
            param = nn.Parameter(group.global_param.data[idx].clone())
            param.grad = torch.zeros_like(param)
            self.outer_params.append(param)
            self.outers.append(factory([param]))
        self.syncs = 0  # fragments synced so far; the next is ``syncs % P``
        self.steps_done = 0  # inner steps done, as last told by inner_step
        self.pending: list[tuple[int, int]] = []  # (due step, fragment) of delayed merges

    @property
    def current(self) -> int:
        """The fragment synced at the end of this round."""
        return self.syncs % self.fragments

    def inner_step(self, group: WorkerGroup, ctx: StepContext) -> None:
        """The workers' inner step, then the merges that are due at step ``ctx.step``."""
        super().inner_step(group, ctx)
        self.steps_done = ctx.step
        while self.pending and self.pending[0][0] <= ctx.step:
            _, f = self.pending.pop(0)
            self._merge(group, f)

    def payload(self, group: WorkerGroup) -> Payload:
        """Pseudo-gradients of this round's fragment, ``[K, P_f]``, on stream ``fragment{f}``.

        The exchange runs behind the next ``tau`` inner steps (hidden in modelled time).
        """
        f = self.current
        idx = self.indices[f]
        rows = group.global_param.data[idx][None] - group.params[:, idx]
        return Payload(rows, f"fragment{f}", overlap_steps=self.tau)

    def apply(
        self, group: WorkerGroup, update: torch.Tensor | None, pull: Sequence[int] | None = None
    ) -> None:
        """Outer step on this round's fragment only; merge now (tau=0) or tau steps later."""
        assert update is not None
        f = self.current
        idx, param = self.indices[f], self.outer_params[f]
        param.data.copy_(group.global_param.data[idx])
        assert param.grad is not None
        param.grad.copy_(update)
        self.outers[f].step()
        group.global_param.data[idx] = param.data
        self.syncs += 1
        if self.tau == 0:
            self._merge(group, f)
        else:
            self.pending.append((self.steps_done + self.tau, f))

    def _merge(self, group: WorkerGroup, f: int) -> None:
        """Workers' fragment ``f`` <- ``(1 - alpha) * global + alpha * current local``."""
        idx = self.indices[f]
        glob = group.global_param.data[idx][None]
        if self.alpha:
            glob = (1.0 - self.alpha) * glob + self.alpha * group.params[:, idx]
        group.params[:, idx] = glob.expand(group.size, -1)

    def state_dict(self) -> dict[str, Any]:
        """Per-fragment outer optimizer states, sync counter and pending merges."""
        return {
            "outers": [copy.deepcopy(opt.state_dict()) for opt in self.outers],
            "syncs": self.syncs,
            "steps_done": self.steps_done,
            "pending": [list(m) for m in self.pending],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        for opt, s in zip(self.outers, state["outers"], strict=True):
            opt.load_state_dict(copy.deepcopy(s))
        self.syncs = int(state["syncs"])
        self.steps_done = int(state["steps_done"])
        self.pending = [(int(due), int(f)) for due, f in state["pending"]]
