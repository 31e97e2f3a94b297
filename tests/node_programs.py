"""Programs that test node processes run (module level, so spawned processes can import them)."""

from __future__ import annotations

import os
import time

import torch

from pysim.comm import Comm
from pysim.compress import get_codec
from pysim.network import Network


def exchange_all_codecs(rank: int, world: int, net: Network, algorithm: str = "ring") -> dict:
    """Runs a fixed sequence of collectives; returns what a test needs to check them."""
    comm = Comm(rank, world, net, algorithm=algorithm)
    g = torch.Generator().manual_seed(100 + rank)
    out: dict = {"received_packets": 0}
    x = torch.randn(1000, generator=g)
    with comm.meter.measure():
        sum(range(20000))
    out["mean"] = comm.allreduce_mean(x)
    out["mean16"] = comm.allreduce_mean(x, get_codec("dense:fp16"))
    comm.end_step()
    for spec in ("topk:0.05", "randomk:0.1", "lowrank:2"):
        m = torch.randn(40, 25, generator=g)
        codec = get_codec(spec)
        packet = codec.pack(m, key="m", step=3)
        packets = comm.allgather(packet)
        out[spec] = [p.clone() for p in packets]
        out["received_packets"] += sum(p.numel() for i, p in enumerate(packets) if i != rank)
        comm.end_step()
    out["sent"], out["received"] = comm.bytes_sent, comm.bytes_received
    out["segments"], out["step_ends"], out["clock_s"] = comm.segments, comm.step_ends, comm.clock_s
    out["x"] = x
    return out


def allreduce_with_codec(rank: int, world: int, net: Network, spec: str, n: int) -> dict:
    """One ring all-reduce of a seeded random vector through the codec ``spec``."""
    comm = Comm(rank, world, net)
    x = torch.randn(n, generator=torch.Generator().manual_seed(200 + rank))
    return {"x": x, "mean": comm.allreduce_mean(x, get_codec(spec)), "sent": comm.bytes_sent}


def async_patterns(rank: int, world: int, net: Network, algorithm: str, scaling) -> dict:
    """Bucketed all-reduces overlapping compute, a collective on stream 1 waited two steps
    later, blocking ones in between; returns what a test needs to compare with replay."""
    comm = Comm(rank, world, net, algorithm=algorithm, scaling=scaling)
    g = torch.Generator().manual_seed(7 + rank)
    xs = [torch.randn(300, generator=g) for _ in range(4)]
    out: dict = {"x": xs, "means": []}

    def work(n: int) -> None:
        with comm.meter.measure():
            sum(range(n))

    buckets = []
    for x in xs[:3]:  # step 1: three buckets issued during a "backward"
        work(20000)
        buckets.append(comm.allreduce_mean_async(x))
    out["means"] += [p.wait() for p in buckets]
    out["again"] = buckets[0].wait()  # waiting twice gives the same tensor and charges nothing more
    comm.end_step()
    streaming = comm.allreduce_mean_async(xs[3], stream=1)  # step 2: streamed, waited in step 3
    work(30000)
    comm.allreduce_mean(xs[0])
    comm.end_step()
    gathered = comm.allgather_mean_many_async({"m": xs[1]}, get_codec("topk:0.1"), step=4, stream=2)
    work(10000)
    out["means"].append(streaming.wait())
    comm.end_step()
    out["topk_mean"] = gathered.wait()["m"]
    comm.end_step()
    out["segments"], out["step_ends"], out["clock_s"], out["comm_s"] = (comm.segments, comm.step_ends,
                                                                        comm.clock_s, comm.comm_s)
    return out


def fail_on(rank: int, world: int, bad_rank: int) -> None:
    if rank == bad_rank:
        raise RuntimeError(f"boom on purpose in node {rank}")
    time.sleep(60)  # the others would wait forever for the failed node


def crash_hard(rank: int, world: int) -> None:
    if rank == 1:
        os._exit(7)
    time.sleep(60)


def report_pid(rank: int, world: int) -> int:
    return os.getpid()


def rank_and_world(rank: int, world: int) -> tuple[int, int]:
    import torch.distributed as dist

    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return rank, world, float(t)


if __name__ == "__main__":  # run under torchrun by tests/test_comm.py
    from pysim.launch import run_nodes

    print("RESULT", run_nodes(rank_and_world, 2), flush=True)
