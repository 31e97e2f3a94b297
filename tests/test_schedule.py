"""The ring's phases, message by message, as the schedule's definition writes them."""

import gc

import pytest

from pysim.schedule import Message, phases, ring_allgather_chunks, ring_reduce_scatter


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
def test_making_phases_leaves_the_garbage_collector_as_it_was(enabled):
    was = gc.isenabled()
    try:
        (gc.enable if enabled else gc.disable)()
        phases("allreduce", "ring", (7,) * 37)
        assert gc.isenabled() is enabled
        with pytest.raises(ValueError, match="negative"):
            phases("allreduce", "ring", (-1,) * 38)
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()
