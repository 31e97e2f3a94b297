"""Strategies composed from the comm steps of others, with no communication code of their own."""

from __future__ import annotations

from pysim.strategies.base import Strategy
from pysim.strategies.diloco import OuterStep
from pysim.strategies.sparta import AverageRandomSubset


class SPARTADiLoCo(Strategy):
    """SPARTA every step, DiLoCo's outer step every ``H`` steps. Deploys DiLoCo's global model."""

    def __init__(self, p: float = 0.005, H: int = 100, outer_lr: float = 0.7, outer_momentum: float = 0.9,
                 codec: str | None = None, seed: int | None = None) -> None:
        self.comm_steps = (AverageRandomSubset(p, seed), OuterStep(H, outer_lr, outer_momentum, codec))
