"""Muon for the hidden matrices, AdamW for the rest: MuLoCo's inner optimizer.

MuLoCo (Thérien et al., "MuLoCo: Muon is a practical inner optimizer for DiLoCo",
arXiv 2505.23725) runs Muon (Jordan et al., kellerjordan.github.io/posts/muon) as DiLoCo's
inner optimizer. :class:`MuonAdamW` gives each hidden matrix to ``torch.optim.Muon`` and every
other parameter (the embeddings, the output head, vectors) to ``torch.optim.AdamW``, each
with torch's own update, per step t (``lr`` the scheduled rate, ``wd`` the group's decay)::

    Muon, a hidden matrix W of shape A x B:
        m = mu * m + (1 - mu) * g                       (lerp)
        u = (1 - mu) * g + mu * m   (Nesterov)   or   u = m
        O = NS5(u / ||u||_F)        quintic Newton-Schulz in bf16, O ~ U V^T for u = U S V^T
        W *= 1 - lr * wd
        W -= lr * 0.2 * sqrt(max(A, B)) * O            (adjust_lr_fn=match_rms_adamw)
    AdamW, the rest (at adamw_lr): see diloco.inner.

``match_rms_adamw`` (Liu et al., "Muon is Scalable for LLM Training", arXiv 2502.16982) scales
the orthogonal update to the RMS of an AdamW step (about 0.2), so one rate and one weight decay
serve both parts; ``original`` scales by ``sqrt(max(1, A / B))`` (Keller Jordan's).

Which parameters are hidden matrices: a parameter group may say so per tensor under the key
``"hidden"`` (:func:`diloco.inner.param_groups` does: every 2-D tensor but the embedding
tables and the model's output head). In a group without the key every 2-D tensor is taken
for one, as ``torch.optim.Muon`` would; other shapes always go to AdamW. On a model without
hidden matrices it is AdamW alone. Groups are fixed at construction (no ``add_param_group``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

NS_STEPS_MAX = 99  # torch.optim.Muon refuses 100 or more (at its first step)


class MuonAdamW(torch.optim.Optimizer):
    """``torch.optim.Muon`` on the hidden matrices, ``torch.optim.AdamW`` on the rest.

    :attr:`param_groups` are the two optimizers' own group dicts (Muon's first), so a rate
    set on them reaches both; :attr:`state` is one dict that both optimizers use, so
    :meth:`state_dict`, :meth:`load_state_dict` and ``state.clear()`` cover both. Each given
    group becomes up to two groups (its hidden matrices, the rest), with the group's own
    keys (``weight_decay``, an ``lr``) in both.

    Args:
        params: tensors or parameter groups (see the module docstring for ``"hidden"``).
        lr: Muon's rate (and AdamW's, unless ``adamw_lr``).
        weight_decay: decoupled weight decay of both parts (groups may override it).
        momentum, nesterov, ns_steps, adjust_lr_fn: Muon's (``torch.optim.Muon``).
        adamw_lr: AdamW's rate; None: ``lr``.
        adamw_betas, adamw_eps: AdamW's.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 3e-3,
        *,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        adjust_lr_fn: str = "match_rms_adamw",
        adamw_lr: float | None = None,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
    ) -> None:
        _check(lr, weight_decay, momentum, ns_steps, adjust_lr_fn, adamw_lr)
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        hidden, rest = [], []
        for g in groups:
            tensors = [g["params"]] if isinstance(g["params"], torch.Tensor) else g["params"]
            tensors = list(tensors)
            marks = g.get("hidden", [p.dim() == 2 for p in tensors])
            keys = {k: v for k, v in g.items() if k not in ("params", "hidden")}
            mine = [p for p, h in zip(tensors, marks, strict=True) if h]
            others = [p for p, h in zip(tensors, marks, strict=True) if not h]
            if any(p.dim() != 2 for p in mine):
                raise ValueError("a parameter marked hidden is not a matrix (Muon takes 2-D)")
            hidden += [{**keys, "params": mine}] if mine else []
            rest += [{**keys, "params": others}] if others else []
        self.muon: torch.optim.Muon | None = None
        self.adamw: torch.optim.AdamW | None = None
        if hidden:
            self.muon = torch.optim.Muon(
                hidden, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn,
            )  # fmt: skip
        if rest:
            self.adamw = torch.optim.AdamW(
                rest, lr=lr if adamw_lr is None else adamw_lr, betas=adamw_betas, eps=adamw_eps,
                weight_decay=weight_decay,
            )  # fmt: skip
        # no defaults: each group already holds its optimizer's hyperparameters
        super().__init__(hidden + rest, {})
        self.defaults = {
            "lr": lr, "weight_decay": weight_decay, "momentum": momentum, "nesterov": nesterov,
            "ns_steps": ns_steps, "adjust_lr_fn": adjust_lr_fn, "adamw_lr": adamw_lr,
            "adamw_betas": adamw_betas, "adamw_eps": adamw_eps,
        }  # fmt: skip
        self._share()

    def _share(self) -> None:
        """Point both optimizers at this one's groups and state (after init and a load)."""
        n = len(self.muon.param_groups) if self.muon is not None else 0
        if self.muon is not None:
            self.muon.param_groups, self.muon.state = self.param_groups[:n], self.state
        if self.adamw is not None:
            self.adamw.param_groups, self.adamw.state = self.param_groups[n:], self.state

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One step of both parts (``closure`` re-evaluates the loss once, for both)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in (self.muon, self.adamw):
            if opt is not None:
                opt.step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (torch's; the parts then share the new groups)."""
        super().load_state_dict(state_dict)
        self._share()


def _check(
    lr: float, wd: float, momentum: float, ns_steps: int, adjust: str, adamw_lr: float | None
) -> None:
    """Every argument checked here: a probe with no matrix never builds the Muon part."""
    if not lr >= 0.0:
        raise ValueError(f"lr={lr}: must be >= 0")
    if not wd >= 0.0:
        raise ValueError(f"weight_decay={wd}: must be >= 0")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum={momentum}: must be in [0, 1)")
    if isinstance(ns_steps, bool) or not isinstance(ns_steps, int):
        raise ValueError(f"ns_steps={ns_steps!r}: must be an integer")
    if not 1 <= ns_steps <= NS_STEPS_MAX:
        raise ValueError(f"ns_steps={ns_steps}: must be in [1, {NS_STEPS_MAX}]")
    if adjust not in ("original", "match_rms_adamw"):
        raise ValueError(f"adjust_lr_fn={adjust!r}: must be original or match_rms_adamw")
    if adamw_lr is not None and not adamw_lr >= 0.0:
        raise ValueError(f"adamw_lr={adamw_lr}: must be >= 0")
