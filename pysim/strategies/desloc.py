"""DES-LOC (Iacob et al. 2025, "DES-LOC: Desynced Low Communication Adaptive Optimizers").

Local Adam on every node, each of its three states averaged over the nodes on its
own period: the parameters every ``Kx`` steps, Adam's first moment every ``Ku``
and its second moment every ``Kv`` (the paper recommends Ku = 3 Kx, Kv = 6 Kx:
the moments change more slowly than the parameters, the second slowest). At step t
(1-based), before the optimizer step, each state whose period divides t is
replaced by its mean over the nodes,

    m_{t-1} <- mean(m_{t-1})  if t % Ku == 0,   v_{t-1} <- mean(v_{t-1})  if t % Kv == 0,
    theta_t <- mean(theta_t)  if t % Kx == 0,

then Adam steps as usual (the states due at the same step travel in one
all-reduce). After the last step the parameters are averaged once more, so the
run deploys the nodes' mean. The inner optimizer must be Adam or AdamW (the
workload's); ``clip``: the gradient-norm clipping radius rho applied before each
step (None: none, as the built-in workloads train).

One labelled deviation (" v-first" in the label), ``v_first=True`` (default): until the second moment has
been averaged once, a first-moment average takes the second moment along. A
coordinate whose gradient a node has always seen as zero (a ReLU unit dead on that
node, an embedding row of a token it never saw) has v = 0 there; the paper's rule
(Ku = 3 Kx < Kv = 6 Kx) then hands it the other nodes' nonzero first moment, and
Adam moves it by lr * m / eps. Measured on the MNIST CNN: averaging m alone over
2 nodes after 10 AdamW steps takes the largest m/sqrt(v) from about 1 to 3.5e5;
with Kx = 10, Ku = 30, Kv = 60 on 4 nodes the accuracy is 8.5% at step 300, and
96.6% with ``v_first``. After the first joint
average every v holds the nodes' mean and decays by beta2 per step, so later
first-moment averages are safe. ``v_first=False``: the paper's rule as written.
"""

from __future__ import annotations

import torch

from pysim.strategies.base import FLOAT32_MAX, CommStep, Strategy, real_in, split_like


class DesyncedAverage(CommStep):
    """The state averaging of the module docstring."""

    def __init__(self, Kx: int, Ku: int | None, Kv: int | None, clip: float | None, v_first: bool = True) -> None:
        Ku = 3 * Kx if Ku is None and isinstance(Kx, int) else Ku
        Kv = 6 * Kx if Kv is None and isinstance(Kx, int) else Kv
        for name, v in (("Kx (steps between parameter averages)", Kx), ("Ku", Ku), ("Kv", Kv)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if clip is not None:
            real_in(clip, "clip (gradient-norm radius)", 0, FLOAT32_MAX, high_closed=True)
        if not isinstance(v_first, bool):
            raise ValueError(f"v_first must be True or False, got {v_first!r:.40}")
        self.Kx, self.Ku, self.Kv, self.clip, self.v_first = Kx, Ku, Kv, clip, v_first
        self.label = f"Kx={Kx} Ku={Ku} Kv={Kv}" + (f" clip {clip:g}" if clip is not None else "") + \
            (" v-first" if v_first else "")   # the deviation is what a label names; without it, the paper's rule
        self.v_averaged = False

    def check(self, nodes: int, model, optimizer) -> None:
        if optimizer is not None and not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
            raise ValueError(f"DESLOC averages Adam's moments: the inner optimizer must be Adam or AdamW, got "
                             f"{type(optimizer).__name__}")

    def before_local_step(self, step: int, last: bool) -> None:
        s = self.strategy
        if self.clip is not None and s._training:
            with s.compute(reuse=f"desloc clip {s.param_shapes}, grads {[p.grad is not None for p in s.params]}"):
                torch.nn.utils.clip_grad_norm_(s.params, self.clip)
        t = step + 1
        due = self._due_states(t)
        if due:
            self._average(due)

    def after_local_step(self, step: int, last: bool) -> None:
        if last:
            self._average([self.strategy.params])

    def _due_states(self, t: int) -> list[list[torch.Tensor]]:
        """The tensors averaged before step t: parameters, then first, then second moments."""
        s = self.strategy
        state = [s.optimizer.state.get(p, {}) for p in s.params]
        due = []
        if t % self.Kx == 0:
            due.append(s.params)
        if not all("exp_avg" in st for st in state):   # Adam creates its state at its first step
            return due
        m_due = t % self.Ku == 0
        v_due = t % self.Kv == 0 or (m_due and self.v_first and not self.v_averaged)
        if m_due:
            due.append([st["exp_avg"] for st in state])
        if v_due:
            due.append([st["exp_avg_sq"] for st in state])
            self.v_averaged = True
        return due

    def _average(self, groups: list[list[torch.Tensor]]) -> None:
        tensors = [x for group in groups for x in group]
        # parameters, moments or both: Adam's moments have the parameters' shapes
        work = f"{len(groups)} x {self.strategy.param_shapes}"
        with self.strategy.compute(reuse=f"desloc gather {work}"):
            flat = torch.cat([x.detach().reshape(-1) for x in tensors])
        mean = self.strategy.comm.allreduce_mean(flat)
        with self.strategy.compute(reuse=f"desloc scatter {work}"), torch.no_grad():
            for x, v in zip(tensors, split_like(mean, tensors), strict=True):
                x.copy_(v)


class DESLOC(Strategy):
    """DES-LOC: local Adam with parameters and both moments averaged on their own periods (see the
    module docstring). Default Kx = 16, Ku = 48, Kv = 96."""

    def __init__(self, Kx: int = 16, Ku: int | None = None, Kv: int | None = None, clip: float | None = None,
                 v_first: bool = True) -> None:
        self.comm_steps = (DesyncedAverage(Kx, Ku, Kv, clip, v_first),)
