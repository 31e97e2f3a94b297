"""MuLoCo (Thérien et al. 2025, "MuLoCo: Muon is a practical inner optimizer for DiLoCo").

DiLoCo with Muon as the inner optimizer and the pseudo-gradient compressed with error
feedback. The inner step: the weight matrices of the hidden linear layers (every
``nn.Linear`` but the last, the output layer) step with Muon (``torch.optim.Muon``:
Nesterov momentum 0.95, orthogonalised by 5 Newton-Schulz iterations, its learning
rate scaled to match AdamW's update RMS, ``adjust_lr_fn="match_rms_adamw"``, so it
takes the inner optimizer's learning rate and schedule); embeddings, the output layer,
biases and gains keep the workload's optimizer (AdamW), as Muon's authors prescribe, and
so do convolution filters here (``torch.optim.Muon`` takes 2-D matrices only; Muon's
authors flatten a filter into one): on the MNIST CNN only the first linear layer steps
with Muon. The outer step is DiLoCo's
(:class:`pysim.strategies.diloco.OuterStep`) on a pseudo-gradient sent with
``codec`` (default ``int4``: 4-bit block quantisation, with local error feedback).
"""

from __future__ import annotations

import torch
from torch import nn

from pysim.strategies.base import FLOAT32_MAX, Strategy, real_in
from pysim.strategies.diloco import OuterStep


def hidden_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The weights of every ``nn.Linear`` of ``model`` but the last (the output layer), in module order."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return [m.weight for m in linears[:-1]]


class MuLoCo(Strategy):
    """DiLoCo with Muon on the hidden weight matrices and a compressed pseudo-gradient (see the
    module docstring). ``muon_momentum``: Muon's; ``lr_scale``: Muon's learning rate relative to
    the inner optimizer's (1: the same, which ``match_rms_adamw`` makes comparable)."""

    def __init__(self, H: int = 30, outer_lr: float = 0.7, outer_momentum: float = 0.9, codec: str | None = "int4",
                 muon_momentum: float = 0.95, lr_scale: float = 1.0) -> None:
        real_in(muon_momentum, "muon_momentum", 0, 1, low_closed=True)
        real_in(lr_scale, "lr_scale", 0, FLOAT32_MAX, high_closed=True)
        self.muon_momentum, self.lr_scale = muon_momentum, lr_scale
        self.comm_steps = (OuterStep(H, outer_lr, outer_momentum, codec),)

    @property
    def label(self) -> str:
        return f"{super().label} Muon {self.muon_momentum:g}" + (f" x{self.lr_scale:g}" if self.lr_scale != 1 else "")

    def check(self, nodes: int, model, optimizer) -> None:
        super().check(nodes, model, optimizer)
        if not hidden_matrices(model):
            raise ValueError("MuLoCo steps hidden linear layers with Muon, and this model has none (it needs two "
                             "nn.Linear layers or more)")

    def setup(self, model, optimizer, comm, scheduler=None, **kwargs) -> None:
        super().setup(model, optimizer, comm, scheduler, **kwargs)
        matrices = hidden_matrices(model)
        ids = {id(p) for p in matrices}
        for group in optimizer.param_groups:   # the workload's optimizer keeps the rest
            group["params"] = [p for p in group["params"] if id(p) not in ids]
        group = optimizer.param_groups[0]
        self.muon = torch.optim.Muon(matrices, lr=group["lr"] * self.lr_scale,
                                     weight_decay=group.get("weight_decay", 0.0), momentum=self.muon_momentum,
                                     nesterov=True, adjust_lr_fn="match_rms_adamw")

    def local_step(self) -> None:
        """Muon and the inner optimizer step (Muon at the inner optimizer's scheduled rate), then
        the schedule moves on."""
        with self.compute(reuse="local_step" if self._training else "idle_step"):
            if self._training:
                self.muon.param_groups[0]["lr"] = self.lr() * self.lr_scale
                self.muon.step()
                self.optimizer.step()
            self.step_schedule()
