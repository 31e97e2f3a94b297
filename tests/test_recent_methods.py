"""The 2025 methods' update rules against references written from the papers, on the tiny model in
real node processes: SparseLoCo, NoLoCo, DES-LOC, MuLoCo and eager updates. (Asynchronous DiLoCo:
test_async.py.)"""

import math

import numpy as np
import pytest
import torch
from test_strategies import N_TINY, Nesterov, flat, local_grad, local_sgd, run_strategy
from tiny import tiny_model

from pysim.compress import TopKCodec
from pysim.launch import run_nodes


def run(name, kwargs, steps, nodes=2, opt="sgd", lr=0.1):
    return run_nodes(run_strategy, nodes, (name, kwargs, steps, opt, lr))


def params_of(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def model_with(params) -> torch.nn.Module:
    m = tiny_model()
    with torch.no_grad():
        for p, v in zip(m.parameters(), params, strict=True):
            p.copy_(v)
    return m


def bf16_up(v: float) -> float:
    b = torch.tensor([v]).view(torch.int32).item()
    return torch.tensor([(b >> 16) + (b & 0xFFFF != 0) << 16], dtype=torch.int32).view(torch.float32).item()


def two_bit(values: torch.Tensor) -> torch.Tensor:
    """The paper's 2-bit values as pysim sends them: per 64 values the nearest of -s, -s/3, s/3, s
    (s = the bf16 at or above their largest magnitude)."""
    out = torch.empty_like(values)
    for b in range(0, len(values), 64):
        block = values[b:b + 64]
        s = bf16_up(block.abs().max().item())
        levels = torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0]) * s
        out[b:b + 64] = levels[(block[:, None] - levels[None, :]).abs().argmin(dim=1)]
    return out


# ---------------------------------------------------------------- SparseLoCo


def test_sparseloco_matches_error_feedback_tiled_topk_and_two_bit_values():
    """Tiles of up to 5 x 5: the 5 x 6 weight in two 5 x 3 tiles (column blocks), the 3 x 5 one in
    one 3 x 5 tile, the biases in one run each; the 4 largest |e| of each kept."""
    H, tile, topk, beta, lr, steps = 2, 5, 4, 0.9, 1.0, 4
    res = run("SparseLoCo", {"H": H, "tile": tile, "topk": topk, "beta": beta, "outer_lr": lr}, steps)
    theta = params_of(tiny_model())
    assert [tuple(p.shape) for p in theta] == [(5, 6), (5,), (3, 5), (3,)]
    blocks = {(5, 6): (5, 3), (5,): (5, 1), (3, 5): (3, 5), (3,): (3, 1)}   # rows x columns of a chunk
    errors = [[torch.zeros_like(p) for p in theta] for _ in range(2)]
    count = 0
    for rnd in range(steps // H):
        decoded = []
        for rank in range(2):
            local = params_of(local_sgd(model_with(theta), rank, range(rnd * H, (rnd + 1) * H)))
            kept = []
            for i, (g, p) in enumerate(zip(theta, local, strict=True)):
                errors[rank][i] = beta * errors[rank][i] + (g - p)
                e = errors[rank][i].reshape(g.shape[0], -1)
                a, b = blocks[tuple(g.shape)]
                k = torch.zeros_like(e)
                for r0 in range(0, e.shape[0], a):            # tile by tile, its topk largest |e|
                    for c0 in range(0, e.shape[1], b):
                        part = e[r0:r0 + a, c0:c0 + b]
                        idx = part.reshape(-1).abs().topk(min(topk, part.numel())).indices
                        rows, cols = idx // part.shape[1] + r0, idx % part.shape[1] + c0
                        k[rows, cols] = e[rows, cols]
                kept.append(k.reshape(-1))
            flat_kept = torch.cat(kept)
            nz = flat_kept.nonzero().squeeze(1)
            sent = torch.zeros_like(flat_kept)
            sent[nz] = two_bit(flat_kept[nz])                # the selected values, in index order, 2 bits each
            count = len(nz)
            off = 0
            for i, e in enumerate(errors[rank]):
                errors[rank][i] = e - sent[off:off + e.numel()].view_as(e)
                off += e.numel()
            decoded.append(sent)
        mean = (decoded[0] + decoded[1]) / 2
        off = 0
        for i, g in enumerate(theta):
            theta[i] = g - lr * mean[off:off + g.numel()].view_as(g)
            off += g.numel()
    for r in res:
        torch.testing.assert_close(flat(r["params"]), flat(theta), atol=1e-6, rtol=0)
        torch.testing.assert_close(flat(r["local"]), flat(theta), atol=1e-6, rtol=0)
    # each round, each node sends its one packet to the other (an all-gather of two)
    assert count == 2 * 4 + 4 + 4 + 3
    assert res[0]["sent"] == (steps // H) * TopKCodec(count, "int2").nbytes((N_TINY,))


def test_sparseloco_label_default_tile_and_bad_tiles():
    from pysim.strategies import make_strategy

    assert make_strategy("SparseLoCo").label == "SparseLoCo H=30 top64/64x64 int2 EF 0.95 outer 1"
    assert make_strategy("SparseLoCo(H=3, tile=16, topk=8)").label == "SparseLoCo H=3 top8/16x16 int2 EF 0.95 outer 1"
    for tile in (0, -64, True, 1.5, "64"):
        with pytest.raises(ValueError, match="tile .* must be an integer >= 1"):
            make_strategy("SparseLoCo", tile=tile)


# ---------------------------------------------------------------- NoLoCo


def test_noloco_averages_within_seeded_random_pairs_with_the_reference_outer_step():
    H, lr, beta, steps, nodes = 2, 0.7, 0.9, 4, 4
    res = run("NoLoCo", {"H": H, "outer_lr": lr, "outer_momentum": beta}, steps, nodes=nodes)
    phi = [params_of(tiny_model()) for _ in range(nodes)]
    mom = [[torch.zeros_like(p) for p in phi[0]] for _ in range(nodes)]
    for rnd in range(steps // H):
        step = (rnd + 1) * H - 1
        perm = np.random.default_rng([0, step]).permutation(nodes)     # the run's seed 0, this step
        groups = [sorted(perm[j::nodes // 2]) for j in range(nodes // 2)]
        theta = [params_of(local_sgd(model_with(phi[i]), i, range(rnd * H, (rnd + 1) * H))) for i in range(nodes)]
        new_phi = []
        for i in range(nodes):
            group = next(g for g in groups if i in g)
            new = []
            for k in range(len(phi[i])):
                g_mean = sum(theta[j][k] - phi[j][k] for j in group) / len(group)
                phi_mean = sum(phi[j][k] for j in group) / len(group)
                mom[i][k] = beta * mom[i][k] + lr * g_mean + lr * (phi_mean - phi[i][k])
                new.append(phi[i][k] + mom[i][k])
            new_phi.append(new)
        phi = new_phi
    for i, r in enumerate(res):
        torch.testing.assert_close(flat(r["local"]), flat(phi[i]), atol=1e-5, rtol=0)
    assert not torch.equal(flat(res[0]["local"]), flat(res[1]["local"]))   # no global model
    pair_ring = sum(24 + 4 + 4 * c for c in (N_TINY, N_TINY))   # [phi, theta - phi] in a ring of two
    assert all(r["sent"] == (steps // H) * pair_ring for r in res)


def test_noloco_groups_need_a_divisible_number_of_nodes():
    from pysim.strategies.noloco import random_groups

    assert sorted(sum(random_groups(6, 3, 1, 5), [])) == list(range(6))
    rounds = [sorted(map(tuple, random_groups(4, 2, 0, r))) for r in range(8)]
    assert len(set(map(tuple, rounds))) == 3   # every pairing of 4 nodes shows up: redrawn each round
    assert rounds != [sorted(map(tuple, random_groups(4, 2, 1, r))) for r in range(8)]   # and per seed
    with pytest.raises(ValueError, match="divisible by 2"):
        random_groups(3, 2, 0, 0)


# ---------------------------------------------------------------- DES-LOC


class HandAdamW:
    """AdamW written out (Loshchilov & Hutter): p *= 1 - lr*wd; m, v; bias-corrected step."""

    def __init__(self, params, lr=0.05, betas=(0.9, 0.999), eps=1e-8, wd=0.01):
        self.params, self.lr, self.b1, self.b2, self.eps, self.wd = params, lr, *betas, eps, wd
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    def step(self, grads):
        self.t += 1
        for i, (p, g) in enumerate(zip(self.params, grads, strict=True)):
            p.mul_(1 - self.lr * self.wd)
            self.m[i] = self.b1 * self.m[i] + (1 - self.b1) * g
            self.v[i] = self.b2 * self.v[i] + (1 - self.b2) * g * g
            mhat, vhat = self.m[i] / (1 - self.b1 ** self.t), self.v[i] / (1 - self.b2 ** self.t)
            p.sub_(self.lr * mhat / (vhat.sqrt() + self.eps))


@pytest.mark.parametrize(("Ku", "v_first", "clip"), [
    (3, True, None), (3, False, None),
    (2, True, None),    # v joins m's first average only (t=2), then keeps its own period (t=6, not t=4)
    (3, True, 0.5),     # the tiny model's gradient norms are 0.33-0.63: some steps are clipped, some not
])
def test_desloc_averages_parameters_and_each_moment_on_its_own_period(Ku, v_first, clip):
    Kx, Kv, steps = 2, 6, 7
    res = run("DESLOC", {"Kx": Kx, "Ku": Ku, "Kv": Kv, "v_first": v_first, "clip": clip}, steps, opt="adamw",
              lr=0.05)
    models = [tiny_model() for _ in range(2)]
    opts = [HandAdamW([p.data for p in m.parameters()]) for m in models]
    v_done = False
    clipped = []

    def average(lists):
        for a, b in zip(*lists, strict=True):
            mean = (a + b) / 2
            a.copy_(mean)
            b.copy_(mean)

    for step in range(steps):
        t = step + 1
        grads = []
        for rank, m in enumerate(models):
            local_grad(m, rank, step)
            g = [p.grad.clone() for p in m.parameters()]
            if clip is not None:   # torch's clip_grad_norm_: scale by clip / (norm + 1e-6) where that is < 1
                norm = float(torch.sqrt(sum((x ** 2).sum() for x in g)))
                clipped.append(norm > clip)
                g = [x * min(1.0, clip / (norm + 1e-6)) for x in g]
            grads.append(g)
        if t % Kx == 0:
            average([[p.data for p in m.parameters()] for m in models])
        if t > 1 and t % Ku == 0:
            average([o.m for o in opts])
        if t > 1 and (t % Kv == 0 or (v_first and t % Ku == 0 and not v_done)):
            average([o.v for o in opts])
            v_done = True
        for o, g in zip(opts, grads, strict=True):
            o.step(g)
    average([[p.data for p in m.parameters()] for m in models])   # after the last step
    assert clip is None or (any(clipped) and not all(clipped))
    for r in res:
        torch.testing.assert_close(flat(r["params"]), flat(models[0].parameters()), atol=1e-6, rtol=0)


def test_desloc_labels_its_default_deviation_and_not_the_papers_rule():
    from pysim.strategies import make_strategy

    assert make_strategy("DESLOC(Kx=10)").label == "DESLOC Kx=10 Ku=30 Kv=60 v-first"
    assert make_strategy("DESLOC(Kx=10, v_first=False)").label == "DESLOC Kx=10 Ku=30 Kv=60"


def test_desloc_needs_adam():
    with pytest.raises(Exception, match="must be Adam or AdamW"):
        run("DESLOC", {"Kx": 2}, 2, opt="sgd")


# ---------------------------------------------------------------- MuLoCo


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Muon's orthogonalisation, written from Jordan et al.'s description, in float32: X = G / ||G||,
    transposed to be wide, then X = a X + (b A + c A^2) X with A = X X^T, (a, b, c) = (3.4445,
    -4.775, 2.0315). (Their reference and torch.optim.Muon iterate in bfloat16: the two differ by
    bfloat16's rounding, about 1% of the update.)"""
    a, b, c = 3.4445, -4.775, 2.0315
    x = g.clone()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        A = x @ x.T
        x = a * x + (b * A + c * (A @ A)) @ x
    return x.T if tall else x


def test_muloco_steps_hidden_matrices_with_muon_the_rest_with_adamw_then_diloco():
    H, steps, lr, mu = 2, 4, 0.01, 0.95
    res = run("MuLoCo", {"H": H, "codec": None, "outer_lr": 0.7, "outer_momentum": 0.9}, steps, opt="adamw", lr=lr)
    ref = tiny_model()
    outer = Nesterov(list(ref.parameters()), 0.7, 0.9)
    models = [tiny_model() for _ in range(2)]           # each node's local model; its optimizers persist
    adams = [HandAdamW([p.data for p in list(m.parameters())[1:]], lr=lr) for m in models]
    bufs = [torch.zeros_like(next(m.parameters())) for m in models]
    for rnd in range(steps // H):
        for rank, m in enumerate(models):
            ps = list(m.parameters())            # [W1, b1, W2, b2]: W1 is the one hidden matrix
            with torch.no_grad():
                for p, g in zip(ps, ref.parameters(), strict=True):
                    p.copy_(g)
            for step in range(rnd * H, (rnd + 1) * H):
                local_grad(m, rank, step)
                g = ps[0].grad
                with torch.no_grad():
                    bufs[rank] = mu * bufs[rank] + g
                    update = newton_schulz(g + mu * bufs[rank])
                    ps[0].mul_(1 - lr * 0.01)                                   # Muon's decoupled decay
                    ps[0].sub_(0.2 * math.sqrt(max(ps[0].shape)) * lr * update)  # match_rms_adamw
                    adams[rank].step([p.grad for p in ps[1:]])
        finals = [list(m.parameters()) for m in models]
        outer.step([((p - finals[0][i]) + (p - finals[1][i])).detach() / 2 for i, p in enumerate(ref.parameters())])
    start = params_of(tiny_model())
    for r in res:
        got, want = r["params"], list(ref.parameters())
        # W1 stepped with Muon: within bfloat16's rounding of its Newton-Schulz iteration (~1% of how far
        # it moved); the AdamW-stepped parameters to float32 precision
        moved = (want[0] - start[0]).abs().max().item()
        torch.testing.assert_close(got[0], want[0].detach(), atol=0.03 * moved, rtol=0)
        torch.testing.assert_close(flat(got[1:]), flat(want[1:]), atol=3e-5, rtol=0)


def test_muloco_muon_takes_the_scheduled_rate_at_every_step():
    # Muon's rate is the inner optimizer's scheduled rate x lr_scale at each step, not the rate the
    # schedule had when Muon was made (the run's warm-up/cosine moves it every step)
    from pysim.comm import Comm
    from pysim.compute import ComputeMeter
    from pysim.network import Network
    from pysim.strategies import make_strategy

    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (s + 1) / 4)
    strategy = make_strategy("MuLoCo(H=10, codec=None, lr_scale=0.5)")
    strategy.setup(model, optimizer, Comm(0, 1, Network.uniform(1, "1Gbps"), ComputeMeter()), scheduler)
    used = []
    muon_step = strategy.muon.step
    strategy.muon.step = lambda: (used.append(strategy.muon.param_groups[0]["lr"]), muon_step())[1]
    for step in range(4):
        local_grad(model, 0, step)
        strategy.step(step)
    assert used == pytest.approx([0.01 * (s + 1) / 4 * 0.5 for s in range(4)], rel=1e-12)


# ---------------------------------------------------------------- eager updates


def test_eager_updates_apply_the_fresh_local_share_and_the_others_previous_shares():
    H, steps, n = 2, 6, 2
    res = run("EagerDiLoCo", {"H": H, "outer_lr": 0.7, "outer_momentum": 0.9}, steps)
    glob = [tiny_model() for _ in range(n)]                      # each node's own global model
    outers = [Nesterov(list(g.parameters()), 0.7, 0.9) for g in glob]
    previous = None                                                # (each node's delta, their mean)
    for rnd in range(steps // H):
        deltas = []
        for rank in range(n):
            start = params_of(glob[rank])
            local = params_of(local_sgd(glob[rank], rank, range(rnd * H, (rnd + 1) * H)))
            deltas.append([s - p for s, p in zip(start, local, strict=True)])
        mean = [(a + b) / 2 for a, b in zip(*deltas, strict=True)]
        last = rnd == steps // H - 1
        for rank in range(n):
            fresh = mean if last else [d / n for d in deltas[rank]]
            owed = [0] * len(fresh) if previous is None else \
                [pm - pd / n for pm, pd in zip(previous[1], previous[0][rank], strict=True)]
            outers[rank].step([f + o for f, o in zip(fresh, owed, strict=True)])
        previous = (deltas, mean)
    for rank, r in enumerate(res):
        torch.testing.assert_close(flat(r["params"]), flat(glob[rank].parameters()), atol=1e-5, rtol=0)
    assert not torch.equal(flat(res[0]["params"]), flat(res[1]["params"]))   # each applied its own share first
