"""``python -m pysim compare`` (and the examples over it): every bad input is one line, before training."""

import numpy as np
import pytest

from pysim.cli import main
from pysim.compare import split_specs

SMALL = ["--strategies", "SimpleReduce", "--steps", "10", "--batch-size", "8", "--eval-every", "5",
         "--eval-subset", "100", "--seeds", "1"]


def run_cli(argv, out="/tmp/pysim-test-compare"):
    return main(["compare", "--workload", "mnist", *SMALL, "--out", out, *argv])


BAD_INPUTS = [
    (["--seed", "-1"], "seed must be >= 0"),
    (["--seeds", "0"], "--seeds must be an integer >= 1"),
    (["--batch-size", "100000"], "batch size 100000 exceeds each node's shard"),
    (["--target", "nan"], "bad target"),
    (["--target", "accuracy>=nan"], "bad target"),
    (["--nodes", "100000"], "100000 nodes need about"),
    (["--nodes", "0"], "nodes"),
    (["--steps", "0"], "steps must be an integer >= 1"),
    (["--eval-subset", "0"], "eval_subset must be"),
    (["--compute", "tpu"], "unknown compute mode"),
    (["--compute-profile", "/nonexistent/profile.json"], "no compute profile"),
    (["--strategies", "Nope"], "unknown strategy"),
    (["--strategies", " ; "], "--strategies is empty"),
    (["--sharding", "dirichlet:0"], "bad sharding"),
    (["--latency=-5ms"], "bad latency"),
    (["--bandwidth", "fast"], "bad bandwidth"),
    (["--topology", "weird"], "bad topology"),
    (["--data-dir", "/nonexistent/mnist"], "does not exist"),
    (["--compute-speed", "1,x"], "bad --compute-speed"),
    (["--compute-speed", "1,0"], "bad --compute-speed"),
    (["--compute-speed", "1,1,1"], "3 speeds for 2 nodes"),
    (["--jitter", "-1"], "jitter"),
    (["--jitter", "inf"], "jitter"),
    (["--framing", "udp"], "framing"),
    (["--strategies", "DiLoCo(outer_lr=1e999)"], "outer_lr must be a number in (0, 3.40282e+38], got inf"),
    (["--bandwidth", "1e-320"], "bad bandwidth"),
    (["--lr", "inf"], "--lr must be"),
    (["--lr", "-1"], "--lr must be"),
    (["--checkpoint-every", "0"], "checkpoint_every must be"),
    (["--network", "/nonexistent/net.json"], "network"),
    (["--strategies", "StreamingDiLoCo(H=10, fragments=9, tau=1)"], "9 fragments for a model of 4 layers; use at"),
    (["--strategies", "EagerDiLoCo(H=10, fragments=5)"], "5 fragments for a model of 4 layers"),
    (["--strategies", "DiLoCo(H=5); SimpleReduce; DiLoCo(H=5)"], "names 'DiLoCo(H=5)' twice"),
    (["--nodes", "2", "--processes", "5"], "5 processes for 2 nodes"),
    (["--nodes", "50", "--sharding", "dirichlet:0.001"], "without data; use a larger alpha or fewer nodes"),
]


@pytest.mark.parametrize("argv,message", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_before_training(argv, message, capsys):
    assert run_cli(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    assert message in captured.err
    assert "training" not in captured.out


def test_strategy_specs_split_outside_parentheses():
    assert split_specs("SimpleReduce, DiLoCo(H=5, codec='lowrank:8'); SPARTA(p=0.01)") == \
        ["SimpleReduce", "DiLoCo(H=5, codec='lowrank:8')", "SPARTA(p=0.01)"]


def test_resume_keeps_finished_runs_and_the_saved_profile(tmp_path, capsys):
    out = str(tmp_path / "cmp")
    argv = ["--strategies", "SimpleReduce; DiLoCo(H=5)"]
    first = run_cli(argv, out)
    assert first == 0
    table = capsys.readouterr().out.split("| strategy")[1]
    again = run_cli(argv + ["--resume"], out)
    printed = capsys.readouterr().out
    assert again == 0 and "reusing" in printed and "training" not in printed
    assert printed.count("finished earlier, kept") == 2
    # the same runs, so the same table (real runtimes included: nothing was retrained)
    assert printed.split("| strategy")[1] == table


def test_network_file_and_framing_reach_every_config(tmp_path):
    import json

    from pysim.cli import base_config, build_parser
    from pysim.compare import comparison_configs
    from pysim.network import Network, network_to_json
    from pysim.workload import image_workload

    _, parsers = build_parser()
    wl = image_workload()

    def configs(argv):
        a = parsers["compare"].parse_args([*SMALL, "--nodes", "2", *argv])
        return comparison_configs(base_config(a, wl), ["SimpleReduce"], 2)

    cfgs = configs(["--framing", "tcp"])
    assert len(cfgs) == 2 and all(c.network.framing_name() == "tcp" for c in cfgs)
    assert [c.seed for c in cfgs] == [0, 1]
    path = tmp_path / "net.json"
    path.write_text(json.dumps(network_to_json(Network.uniform(1, "93.5Mbit", "0.4ms", "tcp"))))
    cfgs = configs(["--network", str(path), "--bandwidth", "1Gbps"])
    assert cfgs[0].network.n == 2 and "93.5 Mbit/s" in cfgs[0].network.describe()


def test_the_table_spread_is_a_95_percent_interval_of_the_mean():
    from pysim.report import ci95_half_width, mean_ci

    # n = 3: t(0.975, 2) = 4.303; std of (1, 2, 3) is 1, so h = 4.303 / sqrt(3)
    assert ci95_half_width([1.0, 2.0, 3.0]) == pytest.approx(4.303 / 3 ** 0.5)
    assert ci95_half_width([5.0]) == 0.0
    # between table entries the next smaller df: n = 12 (df 11) takes df 10's 2.228; past df 60, 1.96
    v = [float(x) for x in range(12)]
    assert ci95_half_width(v) == pytest.approx(2.228 * float(np.std(v, ddof=1)) / 12 ** 0.5)
    w = [float(x % 7) for x in range(62)]
    assert ci95_half_width(w) == pytest.approx(1.96 * float(np.std(w, ddof=1)) / 62 ** 0.5)
    assert mean_ci([1.0, 2.0, 3.0], lambda v: f"{v:.2f}") == "2.00 ± 2.48"


def test_bytes_against_the_baseline_never_read_1x():
    from pysim.report import bytes_ratio

    assert bytes_ratio(1e6, 32e6) == "32x fewer"
    assert bytes_ratio(1.5e6, 1e6) == "1.5x more"
    assert bytes_ratio(1e6, 1e6) == "same"
    assert bytes_ratio(1.002e6, 1e6) == "0.2% more"     # .3g of 1.002 is "1": the table said "1x more"
    assert bytes_ratio(1e6, 1.004e6) == "0.4% fewer"
    assert bytes_ratio(1.006e6, 1e6) == "1.01x more"
    assert bytes_ratio(100.0000001, 100) == "under 0.01% more"   # not "1e-07% more"
    assert bytes_ratio(76.44e3, 112.19e6) == "1,468x fewer"       # not "1.47e+03x fewer"
    assert bytes_ratio(999.4, 1) == "999x more"


def test_verdicts_only_where_every_seed_agrees():
    from dataclasses import replace

    from test_rundir import fake_run

    from pysim.report import verdicts

    template = fake_run(1.0)

    def res(label, seed, t, diverged=None):
        return replace(template, label=label, config={"seed": seed, "strategy": label},
                       final=replace(template.final, time_to_target_s=t, diverged_at_step=diverged))

    base = [res("SimpleReduce", s, 10.0) for s in (0, 1, 2)]
    lines = verdicts(base + [res("A", 0, 5.0), res("A", 1, 6.0), res("A", 2, 9.0),
                             res("B", 0, 5.0), res("B", 1, 12.0), res("B", 2, 9.0),
                             res("C", 0, None), res("C", 1, None), res("C", 2, None),
                             res("D", 0, 11.0), res("D", 1, None), res("D", 2, 30.0),
                             res("E", 0, None, 40), res("E", 1, None, 12), res("E", 2, None, 7)])
    assert lines == ["A reaches the target before SimpleReduce in all 3 seeds",
                     "B and SimpleReduce tie: the seeds disagree (2 of 3 faster, 1 slower)",
                     "C never reaches the target; SimpleReduce does in all 3 seeds",
                     "D reaches the target after SimpleReduce in all 3 seeds (never in 1 of them)",
                     "E diverged in all 3 seeds (at step 40, 12, 7): no verdict"]


def test_the_idle_share_is_the_mean_of_each_seeds_own_share():
    from dataclasses import replace

    from test_rundir import fake_run

    from pysim.report import results_table

    template = fake_run(1.0)

    def res(seed, idle_s, sim_s):
        return replace(template, label="A", config={"seed": seed, "strategy": "A"},
                       final=replace(template.final, idle_s=idle_s, sim_time_s=sim_s))

    row = next(line for line in results_table([res(0, 1.0, 2.0), res(1, 1.0, 4.0)]).splitlines()
               if line.startswith("| A"))
    assert row.split("|")[7].strip() == "38%"   # (50% + 25%) / 2, not 2 s idle over 6 s or over the longest


def test_the_profile_line_gives_the_calibrated_step_in_ms(monkeypatch, tmp_path):
    import pysim.compare
    from pysim.compute import ComputeProfile, workload_step_key
    from pysim.config import TrainConfig

    cfg = TrainConfig(workload="mnist", nodes=2, batch_size=8, compute="calibrated")
    key = workload_step_key(cfg.workload, cfg.batch_size)
    profile = ComputeProfile("calibrated", 1e10, 1e10, 1e-6, {key: 0.0123})
    monkeypatch.setattr(pysim.compare, "machine_profile", lambda *a, **k: (profile, "measured now"))
    line = pysim.compare.shared_profile([cfg], tmp_path, resume=False, recalibrate=False)
    assert line.startswith("compute profile: 12.30 ms per forward+backward step, measured now; saved to")


def test_verdicts_where_the_baseline_misses_the_target():
    # the case that once read "tie: the seeds disagree (0 of 3 faster)" although every seed agreed
    from dataclasses import replace

    from test_rundir import fake_run

    from pysim.report import verdicts

    template = fake_run(1.0)

    def res(label, seed, t, diverged=None):
        return replace(template, label=label, config={"seed": seed, "strategy": label},
                       final=replace(template.final, time_to_target_s=t, diverged_at_step=diverged))

    base = [res("SimpleReduce", 0, None), res("SimpleReduce", 1, None), res("SimpleReduce", 2, 8.0, 90)]
    lines = verdicts(base + [res("A", 0, None), res("A", 1, None), res("A", 2, None),
                             res("B", 0, 5.0), res("B", 1, 6.0), res("B", 2, 4.0),
                             res("C", 0, None), res("C", 1, 3.0), res("C", 2, 9.0)])
    assert lines == ["SimpleReduce diverged in 1 of 3 seeds (at step 90)",
                     "A and SimpleReduce tie: the seeds disagree (0 of 3 faster, 1 slower, 2 where neither "
                     "reaches it)",
                     "B reaches the target before SimpleReduce in all 3 seeds (SimpleReduce never does in 2 of "
                     "them)",
                     "C and SimpleReduce tie: the seeds disagree (1 of 3 faster, 1 slower, 1 where neither "
                     "reaches it)"]
    assert verdicts([res("SimpleReduce", 0, None), res("A", 0, None)]) == \
        ["A and SimpleReduce: neither reaches the target (one seed)"]


def test_no_pin_cpus_reaches_the_run_options(monkeypatch, tmp_path):
    import pysim.compare

    seen = []

    def instead_of_training(configs, out, resume, recalibrate, options, say):
        seen.append(options.pin_cpus)
        raise SystemExit(0)

    monkeypatch.setattr(pysim.compare, "compare", instead_of_training)
    for argv in ([], ["--no-pin-cpus"]):
        with pytest.raises(SystemExit):
            run_cli(argv, out=str(tmp_path))
    assert seen == [True, False]


def test_strategies_whose_labels_coincide_are_named_by_their_specs():
    # the report takes runs of one name for seeds of one strategy: two SPARTA seeds were one row of "2 seeds"
    from pysim.cli import base_config, build_parser
    from pysim.compare import comparison_configs
    from pysim.workload import image_workload

    _, parsers = build_parser()
    base = base_config(parsers["compare"].parse_args([*SMALL, "--nodes", "3"]), image_workload())
    specs = ["FedAvg(H=2, clients_per_round=1)", "FedAvg(H=2, clients_per_round=1.0)", "SPARTA(p=1)",
             "SPARTA(p=1.0)", "SPARTA(p=0.01, seed=1)", "SPARTA(p=0.01, seed=2)", "SimpleReduce"]
    names = [c.name for c in comparison_configs(base, specs, 1)]
    assert names == ["FedAvg H=2 1 client/round", "FedAvg H=2 100% of clients/round", "SPARTA(p=1)",
                     "SPARTA(p=1.0)", "SPARTA p=0.01 seed=1", "SPARTA p=0.01 seed=2", "SimpleReduce"]


def test_resume_keeps_a_finished_run_written_with_another_checkpoint_interval(tmp_path, capsys):
    out = str(tmp_path / "cmp")
    assert run_cli(["--checkpoint-every", "5"], out) == 0
    capsys.readouterr()
    assert run_cli(["--checkpoint-every", "3", "--resume"], out) == 0   # the same results: kept, not refused
    printed = capsys.readouterr().out
    assert "finished earlier, kept" in printed and "training" not in printed


def test_resume_refuses_a_finished_run_of_a_strategy_whose_computation_changed_since(monkeypatch, capsys, tmp_path):
    # PowerSGD's revision 1 steps with the paper's momentum SGD: a run an older pysim finished under the
    # same spec and label computed something else, and --resume kept it as if it were this one's
    from pysim.rundir import load_result
    from pysim.strategies.gradients import PowerSGD

    out, argv = str(tmp_path / "cmp"), ["--strategies", "PowerSGD(rank=1)", *SMALL[2:]]
    monkeypatch.setattr(PowerSGD, "revision", 0)   # as before revisions: nothing in the identity
    assert run_cli(argv, out) == 0
    saved = load_result(next((tmp_path / "cmp").rglob("manifest.json")).parent)
    assert "strategy_revision" not in saved.config
    monkeypatch.undo()
    capsys.readouterr()
    assert run_cli([*argv, "--resume"], out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "made by an older pysim" in err and "revision 0, now 1" in err, err
    assert load_result(next((tmp_path / "cmp").rglob("manifest.json")).parent).run_id == saved.run_id   # kept
    out2 = str(tmp_path / "cmp2")
    assert run_cli(argv, out2) == 0 and run_cli([*argv, "--resume"], out2) == 0   # the same revision: kept
    assert "finished earlier, kept" in capsys.readouterr().out


def test_strategies_whose_computation_changed_carry_their_revision():
    from pysim.config import TrainConfig

    # DGC 3: vectors dense, weight decay local; PowerSGD 1: the paper's momentum SGD; SparseLoCo 1: tiles
    for spec, revision in (("DGC", 3), ("PowerSGD", 1), ("SparseLoCo", 1), ("DiLoCo", 0), ("FedAvg", 0)):
        saved = TrainConfig(strategy=spec).to_json()
        assert saved.get("strategy_revision", 0) == revision, spec


def test_ctrl_c_while_the_report_is_made_is_one_line(monkeypatch, capsys, tmp_path):
    # after the runs were saved, an interrupt in plotting printed a bare KeyboardInterrupt traceback
    import pysim.compare

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pysim.compare, "report", interrupted)
    assert run_cli([], str(tmp_path / "cmp")) == 130
    err = capsys.readouterr().err
    assert err == "interrupted; finished runs are saved, run again with --resume to continue\n"
