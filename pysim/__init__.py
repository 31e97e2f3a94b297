"""pysim: simulate communication-efficient distributed training on one machine.

The public API, in the order a training step flows through it::

    Workload, Target, image_workload, shakespeare_workload, get_workload   what is trained (pysim.workload)
    register_workload                                                      naming a workload of your own
    Sharding                                                               how data is split (pysim.sharding)
    TrainConfig                                                            one run's configuration (pysim.config)
    run, RunOptions                                                        one run (pysim.trainer)
    make_strategy, Strategy                                                how nodes communicate (pysim.strategies)
    get_codec                                                              what crosses the wire (pysim.compress)
    Network, parse_network                                                 the simulated links (pysim.network)
    replay                                                                 re-timing a run (pysim.clock)
    Result, load_result                                                    what a run reports, read back
"""

from pysim.clock import replay
from pysim.compress import get_codec
from pysim.config import TrainConfig
from pysim.network import Network, parse_network
from pysim.result import Result
from pysim.rundir import load_result
from pysim.sharding import Sharding
from pysim.strategies import Strategy, make_strategy
from pysim.trainer import RunOptions, run
from pysim.workload import Target, Workload, get_workload, image_workload, register_workload, shakespeare_workload

__all__ = [
    "Network", "Result", "RunOptions", "Sharding", "Strategy", "Target", "TrainConfig", "Workload", "get_codec",
    "get_workload", "image_workload", "load_result", "make_strategy", "parse_network", "register_workload",
    "replay", "run", "shakespeare_workload",
]
