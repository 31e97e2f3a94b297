"""Programs that test node processes run (module level, so spawned processes can import them)."""

from __future__ import annotations

import os
import time

import torch

from pysim.comm import Comm
from pysim.compress import DenseCodec, get_codec
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


def mixed_bundle(rank: int, world: int) -> dict:
    """One all-gather of a bundle of two packets, each tensor with its own codec (top-k and
    dense fp32); then the same with a codec missing, which must be refused."""
    comm = Comm(rank, world, Network.uniform(world, "1Gbps", "1ms"))
    g = torch.Generator().manual_seed(400 + rank)
    tensors = {"sparse": torch.randn(300, generator=g), "dense": torch.randn(7, generator=g)}
    codecs = {"sparse": get_codec("topk:0.1"), "dense": DenseCodec()}
    out = {"tensors": tensors, "mean": comm.allgather_mean_many(tensors, codecs, step=2),
           "reconstructed": codecs["sparse"].unpack(codecs["sparse"].pack(tensors["sparse"], key="sparse", step=2))}
    out["async_mean"] = comm.allgather_mean_many_async(tensors, codecs, step=2, stream=1).wait()
    out["sent"] = comm.bytes_sent
    out["errors"] = []
    for call, wrong in ((comm.allgather_mean_many, {"sparse": codecs["sparse"]}),
                        (comm.allgather_mean_many, {**codecs, "extra": DenseCodec()}),
                        (comm.allgather_mean_many_async, {"sparse": codecs["sparse"]})):
        try:
            call(tensors, wrong)
        except ValueError as e:
            out["errors"].append(str(e))
    return out


def allreduce_with_codec(rank: int, world: int, net: Network, spec: str, n: int) -> dict:
    """One ring all-reduce of a seeded random vector through the codec ``spec``."""
    comm = Comm(rank, world, net)
    x = torch.randn(n, generator=torch.Generator().manual_seed(200 + rank))
    return {"x": x, "mean": comm.allreduce_mean(x, get_codec(spec)), "sent": comm.bytes_sent}


def ring_dense(rank: int, world: int, n: int, piece_bytes: int, groups=None) -> dict:
    """Dense ring all-reduces of the same seeded vector, per wire dtype: the means, the bytes the
    transport counted leaving and reaching this node, and what carries messages between processes."""
    comm = Comm(rank, world, Network.uniform(world, "1Gbps", "1ms"))
    comm.piece_bytes = piece_bytes
    x = torch.randn(n, generator=torch.Generator().manual_seed(300 + rank)) * 3
    out: dict = {"x": x}
    for dtype in ("fp32", "fp16", "bf16"):
        sent, received = comm.transport.sent[rank], comm.transport.received[rank]
        out[dtype] = comm.allreduce_mean(x, get_codec(f"dense:{dtype}"), groups=groups)
        out[f"{dtype}_sent"] = comm.transport.sent[rank] - sent
        out[f"{dtype}_received"] = comm.transport.received[rank] - received
    out["x_after"] = x
    out["between processes"] = "shared memory" if comm.transport.links is not None else "gloo"
    return out


def corrupt_a_piece(rank: int, world: int, what: str) -> None:
    """Rank 0 sends a dense all-reduce whose second piece it changes after the CRC was chained
    over it (``what`` = "piece": a reduce-scatter packet; "gathered": the reduced chunk it sends
    into the all-gather), or a valid packet of another tensor ("header": source dtype fp16,
    resealed); the receiver must refuse the packet."""
    import pysim.comm
    import pysim.pieces

    comm = Comm(rank, world, Network.uniform(world, "1Gbps", "1ms"))
    comm.piece_bytes = 400
    if rank == 0 and what == "piece":
        real = pysim.comm.encode_piece
        calls = []

        def flip(x, out, dtype, crc):
            crc = real(x, out, dtype, crc)
            calls.append(1)
            if len(calls) == 2:
                out[5] ^= 0x10   # after the CRC was chained over it: corrupted in transit
            return crc

        pysim.comm.encode_piece = flip
    if rank == 0 and what == "gathered":
        real_add = pysim.comm.add_encode_piece
        added = []

        def flip_sum(got, x, out, dtype, crc_in, crc_out):
            crcs = real_add(got, x, out, dtype, crc_in, crc_out)
            added.append(1)
            if len(added) == 2:
                out[5] ^= 0x10   # the reduced chunk, after its CRC was chained over it
            return crcs

        pysim.comm.add_encode_piece = flip_sum
    if rank == 0 and what == "header":
        real_seal = pysim.pieces.DenseLayout.seal

        def seal_foreign(self, packet, crc):
            from pysim import _C

            packet[7] = 1                      # source dtype fp16: a valid packet, not the one expected
            real_seal(self, packet, 0)
            real_seal(self, packet, _C.crc32c(packet.numpy()))

        pysim.pieces.DenseLayout.seal = seal_foreign
    comm.allreduce_mean(torch.ones(1000))


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


def grouped_allreduces(rank: int, world: int, net: Network, algorithm: str, groups, scaling=None) -> dict:
    """All-reduces within ``groups`` (blocking fp32, blocking fp16, one on stream 1 overlapping
    compute and an ungrouped one); returns what a test needs to check means, bytes and clocks."""
    comm = Comm(rank, world, net, algorithm=algorithm, scaling=scaling)
    g = torch.Generator().manual_seed(50 + rank)
    xs = [torch.randn(1000, generator=g) for _ in range(3)]

    def work(n: int) -> None:
        with comm.meter.measure():
            sum(range(n))

    work(10000 * (rank + 1))   # nodes arrive at different times
    out: dict = {"x": xs, "mean": comm.allreduce_mean(xs[0], groups=groups),
                 "mean16": comm.allreduce_mean(xs[1], get_codec("dense:fp16"), groups=groups)}
    comm.end_step()
    pending = comm.allreduce_mean_async(xs[2], stream=1, groups=groups)
    work(20000)
    out["all"] = comm.allreduce_mean(xs[0])
    out["async"] = pending.wait()
    comm.end_step()
    out["sent"], out["received"] = comm.bytes_sent, comm.bytes_received
    out["segments"], out["step_ends"], out["clock_s"] = comm.segments, comm.step_ends, comm.clock_s
    return out


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def tiny_batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


def train_strategy(rank: int, world: int, net: Network, spec: str, steps: int, lr: float = 0.1,
                   mark_last: bool = True) -> dict:
    """``steps`` of plain SGD (lr ``lr``) on :func:`tiny_batch` under the strategy ``spec``
    (the last one flagged ``last`` if ``mark_last``, as a run's end is); returns the local
    and deployed parameters, bytes and the node's trace record."""
    from pysim.strategies import make_strategy

    model = tiny_model()
    comm = Comm(rank, world, net)
    strategy = make_strategy(spec)
    strategy.setup(model, torch.optim.SGD(model.parameters(), lr=lr), comm)
    for step in range(steps):
        x, y = tiny_batch(rank, step)
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        strategy.step(step, last=mark_last and step == steps - 1)
        comm.end_step()
    flat = torch.nn.utils.parameters_to_vector
    return {"local": flat(model.parameters()).detach().clone(),
            "deployed": flat(strategy.eval_model().parameters()).detach().clone(),
            "sent": comm.bytes_sent, "received": comm.bytes_received,
            "segments": comm.segments, "step_ends": comm.step_ends, "clock_s": comm.clock_s}


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


def gloo_interface(rank: int, world: int) -> str | None:
    """The interface gloo's sockets bind to in this node's process (``GLOO_SOCKET_IFNAME``)."""
    return os.environ.get("GLOO_SOCKET_IFNAME")


def cpus_of_node(rank: int, world: int) -> list[int]:
    """The CPUs the node's thread may run on."""
    return sorted(os.sched_getaffinity(0))


def rank_and_world(rank: int, world: int) -> tuple[int, int]:
    import torch.distributed as dist

    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return rank, world, float(t)


def collective_loop(rank: int, world: int, pid_dir: str) -> None:
    """Announces its pid in pid_dir/RANK.pid, then all-reduces every 20 ms for up to a minute."""
    import torch.distributed as dist

    tmp = os.path.join(pid_dir, f".{rank}.tmp")
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    os.replace(tmp, os.path.join(pid_dir, f"{rank}.pid"))
    t = torch.zeros(1)
    for _ in range(3000):
        dist.all_reduce(t)
        time.sleep(0.02)


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[len("socket:["):-1])
    return inodes


def _listening_addresses(inodes: set[str]) -> list[str]:
    """Local addresses of the LISTEN sockets among ``inodes``, from /proc/net/tcp and tcp6 (hex, as stored)."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:  # state 0A = LISTEN
                    out.append(f"{table[-4:]} {cols[1]}")
    return out


def listening_sockets(rank: int, world: int, parent_pid: int) -> list[str]:
    """On node 0, once every node is connected: what the parent (``parent_pid``: the process that
    started the run, not the fork server the nodes come from) and all nodes listen on."""
    import torch.distributed as dist

    pids = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(pids, torch.tensor([os.getpid()]))
    found = []
    if rank == 0:
        inodes = set()
        for pid in [parent_pid, *(int(p) for p in pids)]:
            inodes |= _socket_inodes(pid)
        found = _listening_addresses(inodes)
    dist.barrier()
    return found


def collective_loop_holding_a_lock(rank: int, world: int, pid_dir: str) -> None:
    """collective_loop with a multiprocessing lock held, as tqdm creates one in every process that shows a bar."""
    import multiprocessing

    lock = multiprocessing.RLock()
    with lock:
        collective_loop(rank, world, pid_dir)


if __name__ == "__main__":  # run under torchrun by tests/test_comm.py
    from pysim.launch import run_nodes

    result = run_nodes(rank_and_world, 2)
    if result is not None:  # rank 0 only
        print("RESULT", result, flush=True)


def unsplit_evaluation_by_holder(rank: int, world: int, holder: int) -> dict:
    """Node ``holder``'s model evaluated by its process alone (``split=False``) while every node
    holds a different model: what every node gets, and each node's own model's metrics."""
    from pysim.evaluation import Evaluator
    from pysim.host import current_host
    from pysim.workload import classification_metrics

    g = torch.Generator().manual_seed(5)
    data = _Rows(torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g))
    torch.manual_seed(rank)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    got = Evaluator(current_host(), classification_metrics, split=False)(model, data, holder)
    return {"got": got, "own": classification_metrics(model, data)}


def split_evaluation(rank: int, world: int, n_examples: int) -> dict:
    """Node 0's model evaluated split across the nodes, while every other node holds a different
    model; plus a bisection of kept copies by a split CrossingFinder. Returns what rank 0 saw."""
    from pysim.evaluation import CrossingFinder, Evaluator
    from pysim.host import current_host
    from pysim.workload import Target, classification_metrics

    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(n_examples, 6, generator=g), torch.randint(0, 3, (n_examples,), generator=g)
    data = _Rows(x, y)
    torch.manual_seed(rank)                      # each node's own model differs: only node 0's may count
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    evaluate = Evaluator(current_host(), classification_metrics)
    split = evaluate(model, data)

    # bisection: the deployed "model" after step k scores accuracy k / 100 (its bias encodes k)
    class Scored(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.k = torch.nn.Parameter(torch.zeros(()))

        def forward(self, inp):
            return torch.zeros(len(inp), 2)

    def score(m, d):
        return {"accuracy": float(m.k.detach()) / 100, "examples": float(len(d))}

    scored = Scored()
    finder_eval = Evaluator(current_host(), score)
    finder = CrossingFinder(Target("accuracy", ">=", 0.37), lambda m, holder: finder_eval(m, data, holder))
    found = []
    for step in range(1, 51):
        with torch.no_grad():
            scored.k.fill_(step if rank == 0 else -1)   # only node 0's copies are the deployed model
        if step % 25:
            finder.keep(step, scored if rank == 0 else None, 0)   # node 0 holds the deployed model
        else:
            found += finder.evaluated(step, finder_eval(scored, data))
    return {"split": split, "alone": classification_metrics(model, data), "found": [s for s, _ in found],
            "reached": finder.reached}


class _Rows:
    """A minimal ``Batches``: rows of (x, y) tensors."""

    def __init__(self, x, y) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def batch(self, idx):
        return self.x[idx], self.y[idx]


def mismatched_metrics(rank: int, world: int) -> dict:
    """A split evaluation whose metrics name other values on node 1's share."""
    from pysim.evaluation import Evaluator
    from pysim.host import current_host

    def metrics(model, data):
        return {"accuracy": 1.0} if rank == 0 else {"accuracy": 1.0, "f1": 0.5}

    g = torch.Generator().manual_seed(5)
    data = _Rows(torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g))  # two shares of 32
    return Evaluator(current_host(), metrics)(torch.nn.Linear(6, 3), data)


def train_tiny_cohorts(rank: int, world: int, spec: str, steps: int, examples: list, seed: int,
                       batch_size: int | None = None) -> dict:
    """``spec`` on the tiny model with plain SGD (lr 0.1), the strategy told every node's number of
    examples, the run's seed and batch size; a node computes a gradient only on steps it trains.
    Returns the deployed model, the deployer, the trace's segments and the steps this node trained."""
    from tiny import batch, tiny_model

    from pysim.strategies import make_strategy

    model = tiny_model()
    comm = Comm(rank, world, Network.uniform(world, "100Mbit", "1ms"))
    strategy = make_strategy(spec)
    strategy.setup(model, torch.optim.SGD(model.parameters(), lr=0.1), comm, seed=seed, examples=examples,
                   steps=steps, batch_size=batch_size)
    trained, deployers = [], []
    for step in range(steps):
        if strategy.trains(step):
            x, y = batch(rank, step)
            model.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            trained.append(step)
        strategy.step(step, last=step == steps - 1)
        comm.end_step()
        deployers.append(strategy.deployer(step))
    return {"deployed": [p.detach().clone() for p in strategy.eval_model().parameters()],
            "deployer": strategy.deployer(steps - 1), "deployers": deployers, "trained": trained,
            "sent": comm.bytes_sent,
            "events": [e for _, _, e in comm.segments], "compute": [c for c, _, _ in comm.segments]}


def fixed_compute_timeline(rank: int, world: int, net: Network, scaling, scenario: str) -> dict:
    """Collectives after blocks of exactly 10 ms of compute (a profile's step time; packing is
    charged at a rate of 1e18 bytes/s, so it adds nothing a test can see): ``scenario``
    "blocking" (3 steps of compute then a ring all-reduce of 300 floats), "streams" (two
    all-reduces of 10000 floats started together on streams 0 and 1, 1 ms of compute, then
    both waited) or "grouped" (a ring all-reduce of 1000 floats within ((0, 2), (1, 3))).
    Returns the node's clock at the end of every step."""
    from pysim.compute import ComputeMeter, ComputeProfile, Work

    profile = ComputeProfile("fixed", 1e18, 1e18, 0.0, steps={"block": 0.010, "short": 0.001})
    comm = Comm(rank, world, net, ComputeMeter(profile), scaling=scaling)

    def compute(key: str = "block") -> None:
        with comm.meter.measure(work=Work(), key=key):
            pass

    clocks = []
    if scenario == "blocking":
        for _ in range(3):
            compute()
            comm.allreduce_mean(torch.ones(300))
            clocks.append(comm.end_step())
    elif scenario == "streams":
        compute()
        a = comm.allreduce_mean_async(torch.ones(10000), stream=0)
        b = comm.allreduce_mean_async(torch.ones(10000), stream=1)
        compute("short")
        a.wait()
        b.wait()
        clocks.append(comm.end_step())
    else:
        compute()
        comm.allreduce_mean(torch.ones(1000), groups=((0, 2), (1, 3)))
        clocks.append(comm.end_step())
    return {"clocks": clocks}


def codec_work_segments(rank: int, world: int) -> dict:
    """A blocking all-reduce, then an all-gather started and waited, with no compute of the node's own:
    the compute each segment was charged (bytes moved by the codecs at 1e6 bytes/s)."""
    from pysim.compute import ComputeMeter, ComputeProfile

    comm = Comm(rank, world, Network.uniform(world, "1Gbps", "1ms"), ComputeMeter(ComputeProfile("b", 1e18, 1e6, 0.0)))
    comm.allreduce_mean(torch.ones(300))
    comm.end_step()
    pending = comm.allgather_mean_many_async({"m": torch.ones(300)}, get_codec("topk:0.1"))
    pending.wait()
    comm.end_step()
    return {"segments": [(c, type(e).__name__) for c, _, e in comm.segments]}


def single_tensor_mean(rank: int, world: int, algorithm: str, spec: str) -> dict:
    """An all-reduce reducer's mean of one tensor (no concatenation: its own memory goes in)."""
    from pysim.strategies.reducers import make_reducer

    comm = Comm(rank, world, Network.uniform(world, "1Gbps", "1ms"), algorithm=algorithm)
    reducer = make_reducer(spec)
    reducer.setup(comm)
    x = torch.randn(30, 7, generator=torch.Generator().manual_seed(400 + rank))
    before = x.clone()
    mean = reducer.mean({"x": x}, 0)["x"]
    return {"unchanged": torch.equal(x, before), "mean": mean, "x": before}


def evaluation_modes(rank: int, world: int) -> dict:
    """A split evaluation of node 0's training model: the modes its metrics saw, and after."""
    from pysim.evaluation import Evaluator
    from pysim.host import current_host

    model = torch.nn.Sequential(torch.nn.Linear(6, 3), torch.nn.Dropout(0.5))
    seen = []

    def metrics(m, data):
        seen.append(m.training or any(sub.training for sub in m.modules()))
        return {"accuracy": 1.0}

    Evaluator(current_host(), metrics)(model, _Rows(torch.zeros(96, 6), torch.zeros(96, dtype=torch.long)))
    return {"seen training": any(seen), "shares": len(seen), "after": model.training}
