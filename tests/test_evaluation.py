"""Evaluation inside a run: subsets, split evaluation across nodes, and the bisection to the first step."""

import node_programs
import pytest
import torch

from pysim.evaluation import CrossingFinder, Evaluator, eval_subset
from pysim.launch import NodeError, run_nodes
from pysim.result import crossing_step
from pysim.workload import Target


def test_eval_subset_is_fixed_sorted_and_independent_of_the_run_seed():
    a, b = eval_subset(10_000, 1000), eval_subset(10_000, 1000)
    assert torch.equal(a, b) and len(a) == 1000 and bool((a[1:] > a[:-1]).all())
    assert torch.equal(eval_subset(50, None), torch.arange(50)) and torch.equal(eval_subset(50, 80), torch.arange(50))


@pytest.mark.parametrize("world, n", [(2, 301), (3, 2), (5, 2), (5, 100)])   # uneven shares; nodes with none
def test_split_evaluation_is_node0s_model_on_every_example(world, n):
    out = run_nodes(node_programs.split_evaluation, world, (n,))
    ref = out[0]["alone"]                                    # node 0 alone, on every example
    for r in range(world):
        assert out[r]["split"]["accuracy"] == ref["accuracy"]   # counts: exact
        # float32 batch means, summed in another order
        assert out[r]["split"]["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    # the other nodes held other models: had theirs been evaluated, the loss would differ
    assert all(out[r]["alone"]["loss"] != ref["loss"] for r in range(1, world))


@pytest.mark.parametrize("world, holder, processes", [(2, 1, None), (3, 2, None), (4, 3, 2)])
def test_an_unsplit_evaluation_is_the_holders_model_on_every_node(world, holder, processes):
    out = run_nodes(node_programs.unsplit_evaluation_by_holder, world, (holder,), processes=processes)
    assert all(r["got"] == out[holder]["own"] for r in out)
    assert all(out[r]["own"] != out[holder]["own"] for r in range(world) if r != holder)   # models differ


def test_split_search_finds_the_same_step_on_every_node():
    out = run_nodes(node_programs.split_evaluation, 2, (40,))
    # the score is node 0's step / 100: the first step at or above 0.37 is 37, found in (25, 50]
    assert out[0]["reached"] and out[1]["reached"]
    assert out[0]["found"] == out[1]["found"] == list(range(26, 38))


def test_split_metrics_that_differ_between_shares_are_one_clear_error():
    with pytest.raises(NodeError, match=r"node 1 failed: ValueError: the metrics \['accuracy', 'f1'\] on node 1's "
                                        r"share of the data differ from \['accuracy'\].*split_evaluation=False"):
        run_nodes(node_programs.mismatched_metrics, 2)


@pytest.mark.parametrize("world, n, processes", [(3, 301, 1), (3, 301, 2), (5, 100, 2)])   # against one per node
def test_split_evaluation_does_not_depend_on_the_placement(world, n, processes):
    """Shares are held by nodes and combined in node order, whatever process evaluates them."""
    out = run_nodes(node_programs.split_evaluation, world, (n,), processes=processes)
    alone = run_nodes(node_programs.split_evaluation, world, (n,))
    assert [r["split"] for r in out] == [r["split"] for r in alone]


@pytest.mark.parametrize("examples, nodes", [(500, 256), (500, 2), (10_000, 256), (2, 3), (0, 3), (301, 3),
                                             (500, 1024), (31, 5), (64, 64), (95, 2)])
def test_split_shares_cover_every_example_once_one_per_node_while_each_gets_enough(examples, nodes):
    from pysim.evaluation import SHARE_EXAMPLES, split_shares
    from pysim.placement import Placement

    held = split_shares(examples, nodes)
    rows = torch.cat(list(held.values()))
    assert sorted(rows.tolist()) == list(range(examples))
    assert all(0 <= n < nodes for n in held) and list(held) == sorted(held)
    if examples >= nodes * SHARE_EXAMPLES:
        assert list(held) == list(range(nodes))            # node i: examples i, i + N, ... as always
        assert all(torch.equal(r, torch.arange(i, examples, nodes)) for i, r in held.items())
    elif len(held) > 1:
        assert min(len(r) for r in held.values()) >= SHARE_EXAMPLES
        assert len(held) == examples // SHARE_EXAMPLES
    per_process = [sum(Placement(nodes, 2).process_of(n) == p for n in held) for p in range(2)] if nodes > 1 else [1]
    assert max(per_process) - min(per_process) <= 1       # spread over the workers


def test_not_split_or_one_node_evaluates_in_one_process():
    from pysim.host import solo_host

    host = solo_host(0, 1)
    assert Evaluator(host, lambda m, d: {}, split=False).split is False
    assert Evaluator(host, lambda m, d: {}).split is False   # one node: nothing to split
    assert Evaluator(host, lambda m, d: {"accuracy": 1.0})(torch.nn.Linear(2, 2), [0]) == {"accuracy": 1.0}


class _Scalar(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))


def run_finder(values: dict[int, float], every: int = 25) -> tuple[list, list, CrossingFinder]:
    """A CrossingFinder over 100 steps whose model after step k scores ``values[k]``; evaluations
    every ``every`` steps. Returns (kept evaluations found, every evaluation run, the finder)."""
    evaluated = []

    def evaluate(model, holder):
        evaluated.append(float(model.w.detach()))
        return {"accuracy": float(model.w.detach())}

    finder = CrossingFinder(Target("accuracy", ">=", 0.98), evaluate)
    model = _Scalar()
    found = []
    for step in range(1, 101):
        with torch.no_grad():
            model.w.fill_(values[step])
        if step % every:
            finder.keep(step, model, 0)
        else:
            found += finder.evaluated(step, {"accuracy": values[step]})
    return found, evaluated, finder


def test_crossing_finder_finds_the_first_step_reaching_the_target():
    # the "accuracy" of the model after step k is its weight: a rise that first reaches 0.98 at step 37
    values = {k: min(1.0, 0.5 + 0.013 * k) for k in range(1, 101)}
    first = min(k for k, v in values.items() if v >= 0.98)
    found, evaluated, finder = run_finder(values)
    assert [s for s, _ in found] == list(range(26, first + 1))   # from the last evaluation below, up to it
    assert len(evaluated) == len(found)
    series = sorted(found + [(s, {"accuracy": values[s]}) for s in (25, 50, 75, 100)])
    crossing = crossing_step([(s, m["accuracy"]) for s, m in series], Target("accuracy", ">=", 0.98))
    assert crossing == (float(first), first - 1, first)
    assert finder.reached and not finder.kept  # nothing kept once reached


def test_crossing_finder_finds_an_early_crossing_a_bisection_would_skip():
    # the metric touches the target at step 28, dips, and stays above it from step 45: a bisection of
    # (25, 50] (37, then 43, 46, 44, 45) would report 45
    values = {k: 0.5 for k in range(1, 101)}
    values.update({28: 0.985, **{k: 0.99 for k in range(45, 101)}})
    found, _, _ = run_finder(values)
    assert found[-1][0] == 28 and found[-1][1]["accuracy"] >= 0.98


def _run_counting_evaluations(monkeypatch, eval_subset, reuse=True) -> tuple[dict, list[int]]:
    from pysim.config import TrainConfig
    from pysim.host import Host, current_node
    from pysim.node import NodeRun, train_node
    from pysim.placement import Placement
    from pysim.transport import Transport

    passes = []   # node 0's calls (every node takes part in each)
    real_call = Evaluator.__call__
    monkeypatch.setattr(Evaluator, "__call__", lambda self, m, data, holder=0: (current_node() == 0 and passes.append(
        len(data))) or real_call(self, m, data, holder))
    if not reuse:   # the final evaluation made as if the last one had not been of the whole set
        real_finish = NodeRun.finish

        def finish(self):
            self.last_metrics = None
            return real_finish(self)
        monkeypatch.setattr(NodeRun, "finish", finish)
    cfg = TrainConfig(workload="mnist", strategy="SimpleReduce", nodes=3, steps=6, eval_every=3,
                      eval_subset=eval_subset, train_examples=600, batch_size=16, compute="cpu")
    cfg.check()
    placement = Placement(3, 1)   # three nodes in this process, the evaluation split between them
    return Host(placement.hosted(0), 3, Transport(placement, 0)).run(train_node, (cfg,))[0], passes


def test_a_last_evaluation_of_the_whole_set_is_the_final_one_not_a_second_pass(monkeypatch):
    out, passes = _run_counting_evaluations(monkeypatch, None)
    assert passes == [10_000, 10_000]                       # after steps 3 and 6; no third pass
    assert out["final_metrics"] == out["evals"][-1][1]
    with monkeypatch.context() as m:
        forced, forced_passes = _run_counting_evaluations(m, None, reuse=False)
    assert forced_passes == [10_000, 10_000, 10_000]
    assert forced["final_metrics"] == out["final_metrics"]  # the pass it saves gives the very same metrics


def test_a_subset_evaluation_still_ends_in_a_pass_over_the_whole_set(monkeypatch):
    out, passes = _run_counting_evaluations(monkeypatch, 500)
    assert passes == [500, 500, 10_000]


def test_a_restored_crossing_finder_evaluates_the_kept_models():
    model = torch.nn.Linear(2, 2)
    seen = []

    def evaluate(m, holder):
        seen.append(m.weight.detach().clone())
        return {"accuracy": 0.99}

    first = CrossingFinder(Target("accuracy", ">=", 0.98), evaluate)
    first.evaluated(2, {"accuracy": 0.1})
    first.keep(3, model, 0)
    state = first.state()                                  # what a checkpoint after step 3 holds
    resumed = CrossingFinder(Target("accuracy", ">=", 0.98), evaluate)
    resumed.restore(state, torch.nn.Linear(2, 2))         # a template of the architecture, other weights
    assert resumed.evaluated(4, {"accuracy": 0.99}) == [(3, {"accuracy": 0.99})]
    assert torch.equal(seen[0], model.weight)              # the kept weights, not the template's


def test_metrics_see_the_model_in_evaluation_mode_and_every_submodule_gets_its_mode_back():
    """Dropout would make a training-mode evaluation random; a frozen batch norm inside a
    training model stays frozen after."""
    from pysim.host import solo_host
    from pysim.workload import evaluation_mode

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Dropout(0.5))
    model[1].eval()
    seen = []

    def metrics(m, data):
        seen.append([sub.training for sub in m.modules()])
        return {"accuracy": 1.0}

    assert Evaluator(solo_host(0, 1), metrics)(model, [0]) == {"accuracy": 1.0}
    assert seen == [[False] * 4]
    assert [sub.training for sub in model.modules()] == [True, True, False, True]
    with pytest.raises(RuntimeError), evaluation_mode(model):
        raise RuntimeError("a metric failed")
    assert [sub.training for sub in model.modules()] == [True, True, False, True]


def test_classification_metrics_leave_the_mode_as_it_was():
    from pysim.workload import classification_metrics

    g = torch.Generator().manual_seed(0)
    data = node_programs._Rows(torch.randn(20, 6, generator=g), torch.randint(0, 3, (20,), generator=g))
    model = torch.nn.Sequential(torch.nn.Linear(6, 3), torch.nn.Dropout(0.9))
    ref = classification_metrics(model, data)
    assert model.training and classification_metrics(model, data) == ref   # evaluated without dropout
    model.eval()
    assert classification_metrics(model, data) == ref and not model.training
    model[1].train()   # only a submodule training: still evaluated without dropout
    assert classification_metrics(model, data) == ref
    assert [m.training for m in model.modules()] == [False, False, True]   # and it trains again after
    model.train()
    model[0].eval()    # a submodule its owner keeps in evaluation mode stays there
    assert classification_metrics(model, data) == ref
    assert [m.training for m in model.modules()] == [True, False, True]


def test_a_split_evaluation_runs_every_share_in_evaluation_mode():
    out = run_nodes(node_programs.evaluation_modes, 3, processes=2)
    assert [r["seen training"] for r in out] == [False] * 3 and sum(r["shares"] for r in out) == 3   # of 32
    assert all(r["after"] for r in out)
