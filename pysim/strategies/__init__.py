"""Communication strategies: a local optimizer step plus an ordered list of comm steps.

Build one by name or spec with :func:`make_strategy`; every strategy class in
:data:`STRATEGIES` registered itself by subclassing :class:`Strategy`. One
module per concept:

- ``base``: Strategy, CommStep, the registry;  ``spec``: make_strategy;
- ``reducers``: averaging tensors over nodes, the collective chosen from the codec;
- ``chunks``: cutting a tensor into tiles or runs, each keeping its own top-k (DeMo, SparseLoCo);
- ``gradients``: SimpleReduce (optionally bucketed overlap), TopK, PowerSGD;  ``diloco``: DiLoCo;
  ``streaming``: StreamingDiLoCo, EagerDiLoCo;  ``sparta``: SPARTA;
  ``fedavg``: FedAvg;  ``composed``: SPARTADiLoCo;  ``demo``: DeMo;  ``dgc``: DGC;
  ``async_diloco``: AsyncDiLoCo (a parameter server, point-to-point on the clock);
  ``noloco``: NoLoCo (gossip);  ``sparseloco``: SparseLoCo;  ``muloco``: MuLoCo;  ``desloc``: DESLOC.
"""

from pysim.strategies.async_diloco import AsyncDiLoCo
from pysim.strategies.base import STRATEGIES, CommStep, Strategy, split_like
from pysim.strategies.composed import SPARTADiLoCo
from pysim.strategies.demo import DeMo
from pysim.strategies.desloc import DESLOC
from pysim.strategies.dgc import DGC
from pysim.strategies.diloco import DiLoCo, OuterStep
from pysim.strategies.fedavg import AverageModels, FedAvg
from pysim.strategies.gradients import AverageGradients, BucketedAverageGradients, PowerSGD, SimpleReduce, TopK
from pysim.strategies.muloco import MuLoCo
from pysim.strategies.noloco import NoLoCo
from pysim.strategies.reducers import Reducer, make_reducer
from pysim.strategies.sparseloco import SparseLoCo
from pysim.strategies.sparta import SPARTA, AverageRandomSubset
from pysim.strategies.spec import make_strategy, parse_spec
from pysim.strategies.streaming import EagerDiLoCo, StreamingDiLoCo, StreamingOuterStep

__all__ = ["DESLOC", "DGC", "STRATEGIES", "AsyncDiLoCo", "AverageGradients", "AverageModels", "AverageRandomSubset",
           "BucketedAverageGradients", "CommStep", "DeMo", "DiLoCo", "EagerDiLoCo", "FedAvg", "MuLoCo", "NoLoCo",
           "OuterStep", "PowerSGD", "Reducer", "SPARTA", "SPARTADiLoCo", "SimpleReduce", "SparseLoCo", "Strategy",
           "StreamingDiLoCo", "StreamingOuterStep", "TopK", "make_reducer", "make_strategy", "parse_spec",
           "split_like"]
