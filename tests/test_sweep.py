"""Replay over a grid equals fresh live runs; grids and files are checked."""

import json
from dataclasses import replace

import numpy as np
import pytest

from pysim.cli import main as cli
from pysim.cli import run_sweep
from pysim.config import TrainConfig
from pysim.network import Network, parse_bandwidth, parse_latency
from pysim.rundir import load_result, save_result
from pysim.sweep import build_network, load_runs, parse_grid, sweep
from pysim.trace import Collective, Trace
from pysim.trainer import run
from pysim.workload import Target, image_workload


def config(net: Network, strategy="SimpleReduce", **args) -> TrainConfig:
    # modelled compute (FLOPs on the "cpu" profile) makes time a deterministic function of the run
    return TrainConfig(workload=image_workload(lr=3e-3), strategy=strategy, strategy_args=args, nodes=2, network=net,
                       steps=40, eval_every=10, eval_subset=1000, train_examples=3000, warmup_steps=5, compute="cpu",
                       target="accuracy>=0.6")


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    base = Network.uniform(2, "1Gbps", "1ms")
    run(config(base), out)
    diloco = config(base, "DiLoCo", H=10)
    assert diloco.name == "DiLoCo H=10 outer 0.7/0.9"  # a row says what ran
    diloco.label = "DiLoCo"
    run(diloco, out)
    return out


@pytest.mark.parametrize("bw,lat", [("10Mbit", "50ms"), ("10Gbps", "100us")])
def test_replay_equals_a_fresh_live_run(recorded, bw, lat):
    live = run(config(Network.uniform(2, bw, lat)))
    s, _ = run_sweep([recorded / "SimpleReduce"], bw, lat)
    assert s.total_s[0, 0, 0, 0] == live.final.sim_time_s
    assert s.time_to_target_s[0, 0, 0, 0] == live.final.time_to_target_s
    result = load_result(recorded / "SimpleReduce")
    assert [e.metrics for e in result.evals] == [e.metrics for e in live.evals]


def test_runs_load_from_a_folder_that_also_holds_sweep_outputs(recorded):
    run_sweep([recorded], "1Gbps", "1ms", out_dir=recorded)  # sweep.json, sweep.csv ... beside the runs
    runs = load_runs([recorded, recorded / "DiLoCo"])  # a run named twice is loaded once
    assert sorted(r.name for r in runs) == ["DiLoCo", "SimpleReduce"]


def test_runs_of_different_node_counts_are_not_compared(recorded, tmp_path):
    result = load_result(recorded / "SimpleReduce")
    trace = result.trace
    events = [None if e is None else Collective(e.op, e.algo, e.sizes * 2) for e in trace.events]  # 4 members
    four = Trace(4, [row * 2 for row in trace.compute_s], [row * 2 for row in trace.flops], events, trace.step_ends)
    save_result(replace(result, name="FourNodes", config={**result.config, "nodes": 4}, trace=four), tmp_path)
    with pytest.raises(ValueError, match=r"node count \(2 nodes: .*SimpleReduce; 4 nodes: FourNodes\)"):
        load_runs([recorded, tmp_path])


def test_sweep_outputs_and_crossover(recorded, tmp_path):
    s, table = run_sweep([recorded], "1Mbit:100Gbit:12", "0.1ms,50ms", out_dir=tmp_path)
    assert set(s.names) == {"SimpleReduce", "DiLoCo"}
    assert "crossover" in table
    for f in ("sweep.csv", "sweep.json", "sweep_bandwidth.png", "sweep_winner.png"):
        assert (tmp_path / f).stat().st_size > 0
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert len(data["bandwidths_bps"]) == 12 and len(data["latencies_s"]) == 2
    # time to target never increases with bandwidth
    assert np.all(np.diff(s.time_to_target_s, axis=2) <= 1e-12)


def test_crossover_interpolates_between_grid_points():
    from pysim.sweep import Sweep

    # strategy A, then SimpleReduce; two seeds; A's second seed is 10% slower everywhere
    a = np.array([1.0, 2.0, 4.0])
    ttt = np.array([[a, 1.1 * a], [[2.0] * 3, [2.0] * 3]])[..., None]  # (names, seeds, bandwidths, latencies)
    s = Sweep(["A", "SimpleReduce"], [0, 1], [1e6, 1e7, 1e8], [0.01], ttt, ttt, Target("accuracy", ">=", 0.9))
    # seed 0 crosses where log(a/2) = 0 (1e7); seed 1 where log(1.1 a / 2) = 0, interpolated in log bandwidth
    x1 = np.exp(np.log(1e6) + (np.log(1e7) - np.log(1e6)) * np.log(2 / 1.1) / np.log(2.2 / 1.1))
    assert s.crossover_bps("A", 0) == pytest.approx([1e7, x1])
    # a 1.0 vs 2.0 tie at 1e7 in seed 0 goes to the first listed; seed 1 has A slower there: the seeds disagree
    assert list(s.winner()[:, 0]) == [0, -1, 1]
    assert "wins below" in s.describe_crossover("A", 0) and " to " in s.describe_crossover("A", 0)


def test_no_winner_where_a_seed_never_reaches_the_target():
    from pysim.sweep import Sweep

    nan = float("nan")
    ttt = np.array([[[[5.0]], [[nan]]], [[[6.0]], [[nan]]]])   # A, SimpleReduce; seed 1 reaches nothing
    s = Sweep(["A", "SimpleReduce"], [0, 1], [1e9], [0.02], ttt, ttt, Target("accuracy", ">=", 0.9))
    assert s.winner().tolist() == [[-1]]


def test_the_crossover_is_the_median_over_seeds_and_the_table_reads_in_ms():
    from pysim.report import sweep_table
    from pysim.sweep import Sweep

    # A at f x (1, 4) s against SimpleReduce's 2 s on 1 and 100 Mbit/s: seed f crosses at 1e6 x 100^(log(2/f)/log 4)
    ttt = np.array([[[f, 4 * f] for f in (1.0, 1.5, 1.9)], [[2.0, 2.0]] * 3])[..., None]
    s = Sweep(["A", "SimpleReduce"], [0, 1, 2], [1e6, 1e8], [0.02], ttt, ttt, Target("accuracy", ">=", 0.9))
    assert s.crossover_bps("A", 0) == pytest.approx([1e7, 2.6e6, 1.186e6], rel=2e-3)
    assert s.describe_crossover("A", 0) == "wins below 2.6 Mbit/s (1.19 Mbit/s to 10 Mbit/s)"   # median, not mean
    table = sweep_table(s, 0)
    assert table.splitlines()[0].startswith("simulated time to accuracy>=0.9, latency 20 ms (median")
    assert "| 20 ms " in table


def test_grids_parse_and_bad_grids_fail():
    assert parse_grid("10Mbit:10Gbit:4", parse_bandwidth, "bandwidth") == pytest.approx([1e7, 1e8, 1e9, 1e10])
    assert parse_grid("1ms,20ms", parse_latency, "latency") == pytest.approx([1e-3, 2e-2])
    for bad in ("", "  ", "10Mbit:1Mbit:5", "0:1Gbps:3", "-5Mbit,1Gbps", "fast:slow:3", "1Mbit:1Gbps:0"):
        with pytest.raises(ValueError):
            parse_grid(bad, parse_bandwidth, "bandwidth")
    with pytest.raises(ValueError, match="bad sweep topology"):
        build_network(2, "ring", 1e9, 0.0)
    with pytest.raises(ValueError, match="at least one"):
        sweep([], [1e9], [0.0], "accuracy>=0.9")


def test_cli_errors_are_one_line(recorded, tmp_path, capsys):
    (tmp_path / "old.json").write_text(json.dumps({"version": 0, "name": "x"}))
    for argv in (["sweep", str(tmp_path / "old.json")], ["sweep", str(recorded), "--bandwidths", "fast"],
                 ["sweep", str(tmp_path / "missing.json")], ["sweep"]):
        assert cli(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
    assert cli(["sweep", str(recorded), "--bandwidths", "1Gbps", "--latencies", "1ms", "--target", "accuracy>=0.98",
                "--out", str(tmp_path)]) == 0
    assert "never" in capsys.readouterr().out  # tiny runs never reach 98%


def test_two_tier_sweep_varies_the_inter_link(recorded):
    s, _ = run_sweep([recorded / "SimpleReduce"], "10Mbit,10Gbps", "1ms", topology="two-tier:1:10Gbps:10us")
    assert s.total_s[0, 0, 0, 0] > s.total_s[0, 0, 1, 0]


def test_sweep_trains_missing_runs_from_a_config(tmp_path, capsys):
    cfg = {"strategy": "SPARTA", "strategy_args": {"p": 0.01}, "nodes": 2, "steps": 20, "eval_every": 10,
           "train_examples": 2000, "eval_subset": 500, "compute": "cpu", "target": "accuracy>=0.5"}
    path = tmp_path / "config.json"
    path.write_text(json.dumps([cfg]))
    argv = ["sweep", "--train", str(path), "--runs-dir", str(tmp_path / "runs"), "--bandwidths", "1Mbit,1Gbps",
            "--latencies", "1ms", "--target", "accuracy>=0.5", "--out", str(tmp_path / "out")]
    assert cli(argv) == 0
    assert "SPARTA p=0.01: training" in capsys.readouterr().out
    assert cli(argv) == 0  # second time the recorded run is reused
    assert "using recorded run" in capsys.readouterr().out
    path.write_text(json.dumps({"strategy": "SPARTA"}))
    assert cli(["sweep", "--train", str(path)]) == 2


def test_a_target_no_run_could_reach_and_a_table_latency_off_the_grid_are_one_line(recorded):
    # both printed a table before: "never reaches the target", and the 20 ms table for 999ms
    with pytest.raises(ValueError, match=r"target accuracy>=5 can never be reached: accuracy lies in \[0, 1\] "
                                         r"\(write 0.05 for 5%\)"):
        run_sweep([recorded], "1Gbps", "1ms,20ms", target="accuracy>=5")
    with pytest.raises(ValueError, match=r"--table-latency 999ms is not on the latency grid \(1ms, 20ms\); give one"):
        run_sweep([recorded], "1Gbps", "1ms,20ms", table_latency="999ms")
    run_sweep([recorded], "1Gbps", "1ms,20ms", table_latency="1ms")
    s, _ = run_sweep([recorded], "1Gbps", "5ms,40ms")   # no 20 ms on the grid: the nearest by default
    assert len(s.latencies_s) == 2
