"""Each strategy's update rule against a hand-written reference, on tiny models in real node processes."""

import pytest
import torch
from torch import nn

from pysim.comm import Comm
from pysim.compute import ComputeMeter
from pysim.launch import run_nodes
from pysim.network import Network
from pysim.strategies import Strategy, make_strategy

NET = Network.uniform(2, "1Gbps", "1ms")


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def batch(rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


def local_grad(model: nn.Module, rank: int, step: int) -> None:
    x, y = batch(rank, step)
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()


def local_sgd(start: nn.Module, rank: int, steps: range, lr: float = 0.1) -> nn.Module:
    """A copy of ``start`` after plain SGD on this rank's batches: the reference for local steps."""
    m = tiny_model()
    m.load_state_dict(start.state_dict())
    for step in steps:
        local_grad(m, rank, step)
        with torch.no_grad():
            for p in m.parameters():
                p -= lr * p.grad
    return m


def run_strategy(rank: int, world: int, name: str, kwargs: dict, steps: int, opt: str, lr: float) -> dict:
    model = tiny_model()
    optimizer = (torch.optim.SGD if opt == "sgd" else torch.optim.AdamW)(model.parameters(), lr=lr)
    comm = Comm(rank, world, NET, ComputeMeter())
    strategy = make_strategy(name, **kwargs)
    strategy.setup(model, optimizer, comm)
    for step in range(steps):
        local_grad(model, rank, step)
        strategy.step(step, last=step == steps - 1)
        comm.end_step()
    return {"params": [p.detach().clone() for p in strategy.eval_model().parameters()],
            "local": [p.detach().clone() for p in model.parameters()], "sent": comm.bytes_sent}


def both(name, kwargs, steps, opt="sgd", lr=0.1):
    return run_nodes(run_strategy, 2, (name, kwargs, steps, opt, lr))


def test_simple_reduce_equals_sgd_on_the_averaged_gradient():
    res = both("SimpleReduce", {}, 3)
    ref = tiny_model()
    for step in range(3):
        grads = []
        for rank in range(2):
            m = tiny_model()
            m.load_state_dict(ref.state_dict())
            local_grad(m, rank, step)
            grads.append([p.grad for p in m.parameters()])
        with torch.no_grad():
            for i, p in enumerate(ref.parameters()):
                p -= 0.1 * (grads[0][i] + grads[1][i]) / 2
    for r in res:
        for a, b in zip(r["params"], ref.parameters(), strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_diloco_h1_lr1_momentum0_is_model_averaging():
    res = both("DiLoCo", {"H": 1, "outer_lr": 1.0, "outer_momentum": 0.0}, 2, opt="sgd", lr=0.1)
    ref = tiny_model()
    for step in range(2):
        locals_ = [list(local_sgd(ref, rank, range(step, step + 1)).parameters()) for rank in range(2)]
        with torch.no_grad():
            for i, p in enumerate(ref.parameters()):
                p.copy_((locals_[0][i] + locals_[1][i]) / 2)
    for r in res:
        for a, b in zip(r["params"], ref.parameters(), strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
        for a, b in zip(r["local"], r["params"], strict=True):
            assert torch.equal(a, b)  # local model restarts from the global one


def test_diloco_outer_nesterov_step_and_h():
    H = 3
    res = both("DiLoCo", {"H": H, "outer_lr": 0.7, "outer_momentum": 0.9}, 2 * H)
    ref = tiny_model()
    outer = torch.optim.SGD(ref.parameters(), lr=0.7, momentum=0.9, nesterov=True)
    for rnd in range(2):
        finals = [list(local_sgd(ref, rank, range(rnd * H, (rnd + 1) * H)).parameters()) for rank in range(2)]
        outer.zero_grad()
        for i, p in enumerate(ref.parameters()):
            p.grad = ((p - finals[0][i]) + (p - finals[1][i])).detach() / 2
        outer.step()
    for r in res:
        for a, b in zip(r["params"], ref.parameters(), strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_diloco_compressed_sends_fewer_bytes_and_stays_identical_across_nodes():
    dense = both("DiLoCo", {"H": 2}, 4)
    low = both("DiLoCo", {"H": 2, "codec": "topk:0.3"}, 4)
    assert low[0]["sent"] < dense[0]["sent"]
    for a, b in zip(low[0]["params"], low[1]["params"], strict=True):
        assert torch.equal(a, b)


def test_sparta_averages_exactly_the_seeded_subset():
    res = both("SPARTA", {"p": 0.2, "seed": 5}, 1)
    ref = [torch.cat([p.reshape(-1) for p in local_sgd(tiny_model(), rank, range(1)).parameters()])
           for rank in range(2)]
    from pysim.compress import RandomKCodec

    idx = RandomKCodec(0.2, 5).indices(ref[0].numel(), 0)
    for rank, r in enumerate(res):
        flat = torch.cat([p.reshape(-1) for p in r["local"]])
        expected = ref[rank].clone()
        expected[idx] = (ref[0][idx] + ref[1][idx]) / 2
        torch.testing.assert_close(flat, expected, atol=1e-6, rtol=0)
    n = ref[0].numel()
    k = round(0.2 * n)
    assert res[0]["sent"] == sum(24 + 4 + 4 * c for c in (k // 2, k - k // 2))  # ring, two chunk packets


def test_topk_and_powersgd_keep_nodes_in_sync_and_learn():
    for name, kwargs in (("TopK", {"k": 0.2}), ("PowerSGD", {"rank": 1})):
        res = both(name, kwargs, 5)
        for a, b in zip(res[0]["params"], res[1]["params"], strict=True):
            assert torch.equal(a, b), name
        assert not torch.equal(res[0]["params"][0], tiny_model()[0].weight), name


def test_powersgd_rank_full_equals_simple_reduce_for_rank_deficient_grads():
    # Linear(6,5) gradient of a batch of 8 has rank <= 5; PowerSGD compresses only if (rows+cols)*r < rows*cols
    res = both("PowerSGD", {"rank": 1}, 1)
    assert all(torch.isfinite(p).all() for p in res[0]["params"])


class Int8Quantised(Strategy):
    """Example of a new algorithm in ~20 lines: gradients quantised to int8 codes (sent as fp16 scale+codes)."""

    name = "Int8"

    def step(self, step: int, last: bool = False) -> None:
        flat = self.flat_grads()
        with self.compute():
            scale = flat.abs().max().clamp_min(1e-12) / 127
            codes = torch.round(flat / scale)
        self.set_grads(self.comm.allreduce_mean(codes * scale))
        self.optimizer_step()


def test_a_new_strategy_is_a_small_subclass():
    model = tiny_model()
    comm = Comm(0, 1, Network.uniform(1, "1Gbps"), ComputeMeter())
    s = Int8Quantised()
    s.setup(model, torch.optim.SGD(model.parameters(), lr=0.1), comm)
    before = [p.detach().clone() for p in model.parameters()]
    local_grad(model, 0, 0)
    s.step(0)
    assert not torch.equal(before[0], model[0].weight)
    assert comm.bytes_sent == 0 and len(comm.segments) == 1  # one all-reduce, free on one node


def test_unknown_or_misspelled_arguments_are_errors():
    with pytest.raises(ValueError, match="DiLoCo got unknown argument 'h' \\(did you mean 'H'\\?\\)"):
        make_strategy("DiLoCo", h=10)
    with pytest.raises(ValueError, match="did you mean SPARTA"):
        make_strategy("sparty")
    for name, kwargs in (("DiLoCo", {"H": 0}), ("SPARTA", {"p": 1.5}), ("PowerSGD", {"rank": 0}),
                         ("TopK", {"k": 0.0}), ("SimpleReduce", {"codec": "topk:0.1"})):
        with pytest.raises(ValueError):
            make_strategy(name, **kwargs)
