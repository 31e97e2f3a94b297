"""The process's global generators saved and restored exactly (pysim/global_rng.py), and cheaply:
NumPy's legacy state with and without a cached Gaussian, a reseed, another bit generator."""

import random
import traceback

import numpy as np
import pytest
import torch

from pysim.global_rng import GlobalRNG, seed_torch
from pysim.host import Host, current_host
from pysim.placement import Placement
from pysim.transport import Transport


def draws() -> tuple:
    """One of each generator's draws, NumPy's legacy Gaussian included (it caches every other one)."""
    return torch.rand(2).tolist(), random.random(), np.random.rand(), np.random.randn(), np.random.randint(1 << 30)


@pytest.fixture
def seeded():
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    yield
    np.random.seed()


def test_a_saved_state_gives_the_same_draws_again(seeded):
    generators = GlobalRNG()
    start = generators.save()
    first = draws()
    after = generators.save()          # NumPy holds a cached Gaussian here (one randn drawn)
    second = draws()
    generators.load(start)
    assert draws() == first
    generators.load(after)
    assert draws() == second


@pytest.mark.parametrize("disturb", ["nothing", "uniform", "gaussian", "reseed", "another bit generator"])
def test_a_state_survives_whatever_ran_while_it_was_saved(seeded, disturb):
    generators = GlobalRNG()
    np.random.randn()                  # a cached Gaussian in the saved state, then none
    for cached in (True, False):
        saved = generators.save()
        expected = draws()
        generators.load(saved)
        assert draws() == expected
        generators.load(saved)
        if disturb == "uniform":
            np.random.rand(5)
        elif disturb == "gaussian":
            np.random.randn(3)
        elif disturb == "reseed":
            np.random.seed(7)
        elif disturb == "another bit generator" and hasattr(np.random, "set_bit_generator"):
            np.random.set_bit_generator(np.random.MT19937(3))
        generators.save()              # what a node that passes the turn does
        generators.load(saved)
        assert draws() == expected, (disturb, cached)
        np.random.randn()              # the next round starts from no cached Gaussian


def test_a_state_that_did_not_change_is_not_copied_again(seeded, monkeypatch):
    generators = GlobalRNG()
    np.random.rand()
    saved = generators.save()
    calls = []
    monkeypatch.setattr(np.random, "get_state", lambda *a: calls.append("get"))
    monkeypatch.setattr(np.random, "set_state", lambda *a: calls.append("set"))
    assert generators.save().numpy is saved.numpy
    generators.load(saved)
    assert calls == []


def _gaussians(node: int, world: int) -> list[float]:
    host = current_host()
    out = []
    for turn in range(3):
        out.append(float(np.random.randn()))     # odd counts: a Gaussian stays cached across the turn
        if node == 1:
            np.random.seed(turn + 10)            # another node reseeds between the others' draws
        host.meet("turn", None, lambda req: dict.fromkeys(req))
    return out


def test_nodes_taking_turns_draw_a_fresh_process_s_gaussians():
    placement = Placement(3, 1)
    out = Host(placement.hosted(0), 3, Transport(placement, 0)).run(_gaussians)
    np.random.seed(0)                            # a fresh process's NumPy state
    fresh = [float(np.random.randn()) for _ in range(3)]
    assert out[0] == fresh and out[2] == fresh
    assert out[1][0] == fresh[0] and out[1][1] != fresh[1]


def test_without_raw_access_the_exact_calls_keep_states_apart(seeded, monkeypatch):
    """An older NumPy (no get_bit_generator), another bit generator, or words that do not read back
    as NumPy's own state: every save and restore takes the exact path."""
    import pysim.global_rng as global_rng

    monkeypatch.setattr(global_rng, "_mt19937", lambda: None)
    generators = GlobalRNG()
    np.random.randn()
    saved = generators.save()
    expected = draws()
    np.random.seed(3)
    generators.save()
    generators.load(saved)
    assert draws() == expected


def test_the_raw_words_read_back_as_numpy_s_own_state(seeded):
    import pysim.global_rng as global_rng

    if not hasattr(np.random, "get_bit_generator"):
        pytest.skip("NumPy < 1.25: no raw access, the exact calls are used")
    assert global_rng._mt19937() is not None     # this NumPy's layout is the one assumed


def _rewinds(node: int, world: int) -> list[float]:
    """Node 0 rewinds its words with a Gaussian cached in two ways (the bit generator's public
    ``state`` setter; ``set_state`` with a snapshot holding one), node 1 draws meanwhile."""
    host, out = current_host(), []
    np.random.randn()
    snapshot = np.random.get_state()                 # holds a cached Gaussian
    out.append(float(np.random.randn()))             # the cached one: the words do not move
    host.meet("turn", None, dict.fromkeys)
    if node == 0:
        words = np.random.get_bit_generator().state
        np.random.standard_normal()                  # a pair drawn, one cached
        np.random.get_bit_generator().state = words  # the words back as they were, the Gaussian still cached
    host.meet("turn", None, dict.fromkeys)
    out.append(float(np.random.standard_normal()))
    if node == 0:
        np.random.set_state(snapshot)                # the same words again, a Gaussian cached
    host.meet("turn", None, dict.fromkeys)
    out += [float(v) for v in np.random.randn(3)]
    return out


def test_a_cached_gaussian_under_unchanged_words_is_neither_lost_nor_handed_on(monkeypatch):
    import pysim.global_rng as global_rng

    placement = Placement(2, 1)
    fast = Host(placement.hosted(0), 2, Transport(placement, 0)).run(_rewinds)
    monkeypatch.setattr(global_rng, "_mt19937", lambda: None)   # the exact calls throughout
    exact = Host(placement.hosted(0), 2, Transport(placement, 0)).run(_rewinds)
    assert fast == exact


def test_the_cached_gaussian_flag_is_found_on_this_numpy():
    import pysim.global_rng as global_rng

    if not hasattr(np.random, "get_bit_generator"):
        pytest.skip("NumPy < 1.25: the exact calls are used")
    np.random.seed(0)
    assert global_rng._gauss_cached() is False
    np.random.randn()
    assert global_rng._gauss_cached() is True
    np.random.randn()
    assert global_rng._gauss_cached() is False


def test_python_s_random_is_saved_raw_and_restored_exactly(seeded):
    import pysim.global_rng as global_rng

    assert global_rng._python_mt() is not None   # this Python's layout is the one assumed
    generators = GlobalRNG()
    random.gauss(0.0, 1.0)               # a Gaussian cached in the saved state
    saved = generators.save()
    expected = (random.gauss(0.0, 1.0), random.random(), random.getrandbits(70))
    for disturb in (lambda: random.random(), lambda: random.seed(9), lambda: random.gauss(0.0, 1.0)):
        disturb()
        generators.save()
        generators.load(saved)
        assert (random.gauss(0.0, 1.0), random.random(), random.getrandbits(70)) == expected
        generators.load(saved)


def test_python_s_unchanged_state_is_neither_rebuilt_nor_written(seeded, monkeypatch):
    generators = GlobalRNG()
    saved = generators.save()
    calls = []
    monkeypatch.setattr(random, "getstate", lambda: calls.append("get"))
    monkeypatch.setattr(random, "setstate", lambda s: calls.append("set"))
    assert generators.save().python is saved.python
    generators.load(saved)
    assert calls == []


def test_python_s_random_without_raw_access_uses_the_exact_calls(seeded, monkeypatch):
    import pysim.global_rng as global_rng

    fast = GlobalRNG().save()
    monkeypatch.setattr(global_rng, "_python_mt", lambda: None)
    generators = GlobalRNG()
    saved = generators.save()
    assert saved.python.raw is None
    expected = [random.random() for _ in range(3)]
    random.seed(4)
    generators.load(saved)
    assert [random.random() for _ in range(3)] == expected
    random.seed(4)
    generators.load(fast)              # raw bytes: restored through setstate
    assert [random.random() for _ in range(3)] == expected


def test_python_s_generator_is_the_one_behind_the_module_functions(seeded, monkeypatch):
    """Replacing ``random._inst`` does not rebind ``random.random`` and the others: the state saved
    and restored is that of the generator they draw from."""
    monkeypatch.setattr(random, "_inst", random.Random(99))
    generators = GlobalRNG()
    saved = generators.save()
    expected = [random.random() for _ in range(3)]
    generators.load(saved)
    assert [random.random() for _ in range(3)] == expected


def test_seed_torch_draws_as_torch_manual_seed_and_queues_no_device_seeds(monkeypatch):
    for seed in (0, 7, 2**40 + 3):
        torch.manual_seed(seed)
        expected = (torch.rand(3).tolist(), torch.randn(2).tolist(), torch.randint(1 << 30, (2,)).tolist())
        torch.manual_seed(seed + 1)
        seed_torch(seed)
        assert (torch.rand(3).tolist(), torch.randn(2).tolist(), torch.randint(1 << 30, (2,)).tolist()) == expected
        assert torch.initial_seed() == seed
    if torch.accelerator.is_available():
        return
    # without an accelerator torch.manual_seed formats the stack once per device type it knows (~1 ms
    # from a node's thread, for devices that can never start); seed_torch formats none
    calls = []
    monkeypatch.setattr(traceback, "format_stack", lambda *a, **k: calls.append(1) or [])
    torch.manual_seed(3)
    assert calls, "torch.manual_seed no longer queues lazy device seeds: seed_torch may be dropped"
    calls.clear()
    seed_torch(3)
    assert not calls
