"""The ring's phases, message by message, as the schedule's definition writes them."""

import gc

import pytest

from pysim import schedule
from pysim.schedule import Message, group_of, phases, ring_allgather_chunks, ring_reduce_scatter


@pytest.mark.parametrize("n", [1, 2, 3, 5, 64])
def test_ring_phases_are_the_definition_message_by_message(n):
    sizes = tuple(range(10, 10 + n))   # every member's size differs: a wrong chunk shows
    reduce_scatter = [tuple(Message(i, (i + 1) % n, sizes[(i - t) % n], (i - t) % n) for i in range(n))
                      for t in range(n - 1)]
    allgather = [tuple(Message(i, (i + 1) % n, sizes[(i + 1 - t) % n], (i + 1 - t) % n) for i in range(n))
                 for t in range(n - 1)]
    assert ring_reduce_scatter(sizes) == reduce_scatter and ring_allgather_chunks(sizes) == allgather
    assert all(type(m) is Message for phase in ring_reduce_scatter(sizes) for m in phase)
    assert phases("allreduce", "ring", sizes) == tuple(reduce_scatter + allgather)


@pytest.mark.parametrize("enabled", [True, False])
def test_making_phases_leaves_the_garbage_collector_as_it_was(enabled, monkeypatch):
    was = gc.isenabled()
    seen = []
    real = schedule._one_group
    monkeypatch.setattr(schedule, "_one_group", lambda *a: seen.append(gc.isenabled()) or real(*a))
    schedule._phases.cache_clear()
    try:
        (gc.enable if enabled else gc.disable)()
        phases("allreduce", "ring", (7,) * 37)
        assert seen == [False] and gc.isenabled() is enabled    # paused while made, then as it was
        monkeypatch.setattr(schedule, "_one_group", lambda *a: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            phases("allreduce", "ring", (7,) * 38)
        assert gc.isenabled() is enabled                         # and after a failure inside
    finally:
        (gc.enable if was else gc.disable)()
        schedule._phases.cache_clear()


def test_group_of_shares_one_tuple_of_all_members():
    assert group_of(None, 3, 8) == tuple(range(8)) and group_of(None, 3, 8) is group_of(None, 5, 8)
    groups = ((0, 2), (1, 3))
    assert group_of(groups, 2, 4) == (0, 2) and group_of(groups, 3, 4) == (1, 3)


def test_a_tree_broadcast_to_a_number_of_nodes_that_is_no_power_of_two():
    from pysim.network import Network, collective_s
    from pysim.schedule import bytes_received

    assert phases("broadcast", "tree", (10,) * 3) == ((Message(0, 1, 10, 0),), (Message(0, 2, 10, 0),))
    assert phases("broadcast", "tree", (10,) * 5) == (
        (Message(0, 1, 10, 0),), (Message(0, 2, 10, 0), Message(1, 3, 10, 0)), (Message(0, 4, 10, 0),))
    assert bytes_received("broadcast", "tree", (10,) * 3) == [0, 10, 10]
    # two rounds of one 80-bit message on 80 bit/s links with 0.5 s latency
    assert collective_s(Network.uniform(3, 80, 0.5), "broadcast", "tree", (10,) * 3) == pytest.approx(3.0)
