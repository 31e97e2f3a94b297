"""Every bad input is one true line and exit code 2, before any process starts or any time is spent.

The table below is the inputs tried, by class (issue: "nothing silently wrong"). Each row runs the
command line in-process; none of them may train, print a traceback, or take more than a few
seconds. Bad workloads of a user's own are in test_probe.py, divergence in test_divergence.py,
calibration in test_calibrate.py, API objects (Link, ComputeProfile, ComputeScaling) next to
their modules.
"""

import json
import re
import time

import pytest

from pysim.cli import main

C = ["compare", "--compute", "cpu", "--seeds", "1", "--steps", "5"]

CASES = [  # (class, argv after `python -m pysim`, the one line (regex))
    # links: a bare number once ran at 100 bit/s or 20 s
    ("units", C + ["--latency", "20"], "bad latency '20': give a unit, e.g. '20ms'"),
    ("units", C + ["--bandwidth", "100"], "bad bandwidth '100': give a unit, e.g. '100Mbit'"),
    ("units", C + ["--bandwidth", "fast"], "bad bandwidth 'fast'"),
    ("units", C + ["--bandwidth=-1Gbit"], "bad bandwidth '-1Gbit'"),
    # a value after a space that starts with a minus and a digit is the option's value, not "expected one argument"
    ("units", C + ["--bandwidth", "-5Mbit"], "bad bandwidth '-5Mbit'"),
    ("units", C + ["--latency", "-3ms"], "bad latency '-3ms'"),
    ("stragglers", C + ["--jitter", "-.5"], "must lie in"),
    ("units", C + ["--topology", "two-tier:2:10:50ms"], "bad bandwidth '10': give a unit"),
    ("units", C + ["--topology", "ring"], "bad topology 'ring'"),
    ("units", C + ["--framing", "pigeon"], "bad framing 'pigeon'"),
    ("network file", C + ["--network", "{neg}"], "bad link: up_bps = -1.0; a rate must be a finite number"),
    ("network file", C + ["--network", "{nan}"], "bad link: up_bps = nan"),
    ("network file", C + ["--network", "{words}"], "malformed network description: a link is"),
    ("network file", C + ["--network", "{missing}"], "cannot read network file"),
    ("compute", C[:1] + ["--seeds", "1", "--compute-profile", "{profile}"], "step 'k' takes -0.01 s"),
    ("compute", C + ["--compute", "tpu"], "unknown compute mode 'tpu'"),
    ("stragglers", C + ["--jitter", "1000"], r"jitter \(lognormal sigma\) must lie in \[0, 3\], got 1000.0"),
    ("stragglers", C + ["--jitter", "nan"], "must lie in"),
    ("stragglers", C + ["--jitter=-1"], "must lie in"),
    ("stragglers", C + ["--nodes", "2", "--compute-speed", "0,1"], "speeds must be positive finite"),
    ("stragglers", C + ["--nodes", "2", "--compute-speed", "1,x"], "give one number per node"),
    ("stragglers", C + ["--nodes", "2", "--compute-speed", "1,1,1"], "gives 3 speeds for 2 nodes"),
    ("target", C + ["--target", "acc>=0.9"], "names metric 'acc', which workload 'mnist' does not report"),
    ("target", C + ["--target", "f1>=0.9"], "names metric 'f1'"),
    ("target", C + ["--target", "accuracy>0.9"], "bad target 'accuracy>0.9'"),
    ("sizes", C + ["--nodes", "0"], "number of nodes must be an integer >= 1"),
    ("sizes", C + ["--nodes", "100000"], r"100000 nodes need about .* GiB .*: use at most \d+ nodes"),
    ("sizes", C + ["--steps", "0"], "steps must be an integer >= 1"),
    ("sizes", C + ["--seeds", "0"], "--seeds must be an integer >= 1"),
    ("sizes", C + ["--eval-every", "0"], "eval_every must be an integer >= 1"),
    ("sizes", C + ["--eval-subset", "0"], "eval_subset must be an integer >= 1"),
    ("sizes", C + ["--batch-size", "100000"], "use --batch-size 30000 or less"),
    ("sizes", C + ["--processes", "0"], "processes must be an integer >= 1"),
    ("sizes", C + ["--nodes", "2", "--processes", "3"], "3 processes for 2 nodes"),
    ("sizes", C + ["--checkpoint-every", "0"], "checkpoint_every must be an integer >= 1"),
    ("sizes", C + ["--seed=-1"], "--seed must be >= 0"),
    ("sizes", C + ["--lr=-1"], "--lr must be a positive finite learning rate"),
    ("sizes", C + ["--lr", "-1e-3"], "--lr must be a positive finite learning rate"),
    ("sizes", C + ["--lr", "nan"], "--lr must be a positive finite learning rate"),
    ("strategies", C + ["--strategies", "Nope"], "unknown strategy 'Nope'; known:"),
    ("strategies", C + ["--strategies", "DiLoCo(H=0)"], "H .* must be an integer >= 1, got 0"),
    ("strategies", C + ["--strategies", "DiLoCo(h=10)"], "did you mean 'H'"),
    ("strategies", C + ["--strategies", ";"], "--strategies is empty"),
    # a wrong type once ended in a TypeError traceback ("'<' not supported between ...") or was taken
    ("strategies", C + ["--strategies", "PowerSGD(lr='0.1')"], r"PowerSGD lr must be a number in \(0, "),
    ("strategies", C + ["--strategies", "PowerSGD(lr=True)"], r"PowerSGD lr must be a number .* got True"),
    ("strategies", C + ["--strategies", "PowerSGD(lr=1e300)"], r"PowerSGD lr must be a number in \(0, 3.40282e\+38\]"),
    ("strategies", C + ["--strategies", "PowerSGD(weight_decay=1" + "0" * 400 + ")"],
     r"weight_decay must be a number .* got 1000000000000000000000000000000000000000$"),
    ("strategies", C + ["--strategies", "PowerSGD(optimizer='inner', lr=0.5)"], "with optimizer='inner' .*drop lr"),
    ("strategies", C + ["--strategies", "DGC(optimizer='inner', lr=0.5)"], "with optimizer='inner' .*drop lr"),
    ("strategies", C + ["--strategies", "DGC(clip_norm='x')"], r"DGC clip_norm \(None: no clipping\) must be"),
    ("strategies", C + ["--strategies", "DiLoCo(outer_lr=None)"], r"outer_lr must be a number in \(0, "),
    ("strategies", C + ["--strategies", "StreamingDiLoCo(alpha='x')"], r"alpha .* must be a number in \[0, 1\]"),
    ("strategies", C + ["--strategies", "DESLOC(v_first=1)"], "v_first must be True or False, got 1"),
    ("strategies", C + ["--strategies", "SPARTA(seed='a')"], r"SPARTA seed must be an integer in \[0, 2\^63\)"),
    ("strategies", C + ["--strategies", "PowerSGD(seed=1.5)"], r"PowerSGD seed must be an integer"),
    ("strategies", C + ["--strategies", "Local(args=1)"], "Local got unknown argument 'args'; it takes none"),
    ("strategies", C + ["--strategies", "TopK(index_code=[1])"], "unknown index code"),
    ("strategies", C + ["--sharding", "dirichlet:-1"], "bad sharding 'dirichlet:-1'"),
    ("strategies", C + ["--algorithm", "tree"], "invalid choice: 'tree'"),
    ("workload", C + ["--workload", "cifar"], "unknown workload 'cifar'"),
    ("workload", C + ["--workload", "nosuchmod:fn"], "cannot import nosuchmod"),
    ("workload", C + ["--workload", "workloads:nope"], "module workloads has no 'nope'"),
    ("workload", C + ["--data-dir", "{missing}"], "does not exist; pass --data-dir"),
    ("workload", C + ["--import", "nosuchmodule_xyz"], "cannot import nosuchmodule_xyz"),
    ("config file", C + ["--config", "{missing}"], "cannot read --config"),
    ("config file", C + ["--config", "{unknown_key}"], "compare has no flag 'bogus'"),
    ("config file", C + ["--config", "{bad_type}"], "steps = 'many' is not an integer"),
    ("flags", C + ["--bogus"], r"unrecognized arguments: --bogus \(see python -m pysim --help\)"),
    ("output", C + ["--out", "/proc/pysim"], "cannot write results to /proc/pysim"),
    ("sweep", ["sweep"], "give run folders, or --train JSON"),
    ("sweep", ["sweep", "{missing}"], "no run at"),
    ("sweep", ["sweep", "{run}", "--bandwidths", "1Gbit:10Mbit:5"], "needs 0 < LO <= HI"),
    ("sweep", ["sweep", "{run}", "--latencies", "20"], "bad latency '20': give a unit"),
    ("sweep", ["sweep", "{run}", "--target", "f1>=0.5"], "metric .f1., which the runs do not record; they record acc"),
    ("show", ["show", "{missing}"], "no run at"),
    ("show", ["show", "{empty}"], "no pysim runs in"),
    ("resume", C + ["--nodes", "2", "--eval-subset", "100", "--out", "{runs}", "--resume", "--bandwidth", "1Gbit"],
     "holds a finished run of another configuration \\(differs in network\\); resume with the same flags"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    write = {"neg": {"links": [[-1, -1, 0.02]], "inter": None, "group_size": None},
             "nan": {"links": [[float("nan"), 1e9, 0.02]], "inter": None, "group_size": None},
             "words": {"links": [["1Gbit", "1Gbit", "20ms"]], "inter": None, "group_size": None}}
    paths = {k: d / f"{k}.json" for k in write}
    for k, v in write.items():
        paths[k].write_text(json.dumps(v))
    from pysim.compute import PROFILE_VERSION

    paths["profile"] = d / "profile.json"
    paths["profile"].write_text(json.dumps({"name": "calibrated", "flops_per_s": 1e10, "bytes_per_s": 1e10,
                                            "kernel_s": 1e-6, "steps": {"k": -0.01}, "version": PROFILE_VERSION}))
    paths["unknown_key"], paths["bad_type"] = d / "unknown.toml", d / "bad_type.toml"
    paths["unknown_key"].write_text("bogus = 1\n")
    paths["bad_type"].write_text('steps = "many"\n')
    paths["missing"], paths["empty"] = d / "missing", d / "empty"
    paths["empty"].mkdir()
    paths["runs"] = d / "runs"   # one finished run: SimpleReduce seed 0 on 100 Mbit/s
    assert main(C + ["--strategies", "SimpleReduce", "--nodes", "2", "--eval-subset", "100",
                     "--out", str(paths["runs"])]) == 0
    paths["run"] = paths["runs"] / "SimpleReduce_seed0"
    return {k: str(v) for k, v in paths.items()}


@pytest.mark.parametrize("kind,argv,line", CASES, ids=[f"{c[0]}: {' '.join(c[1][len(C):] or c[1])}" for c in CASES])
def test_a_bad_input_is_one_line_and_exit_code_2(kind, argv, line, files, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))   # --workload workloads:...
    argv = [a.format(**files) for a in argv]
    capsys.readouterr()
    t0 = time.perf_counter()
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert re.search(line, lines[0]), lines[0]
    assert time.perf_counter() - t0 < 10   # before any training


def test_resume_refusal_keeps_the_finished_run(files, capsys):
    from pysim.rundir import load_result

    before = load_result(files["run"])
    assert main(C + ["--nodes", "2", "--eval-subset", "100", "--out", files["runs"], "--resume",
                     "--bandwidth", "1Gbit"]) == 2
    after = load_result(files["run"])
    assert after.final == before.final and after.run_id == before.run_id


def test_an_unwritable_tensorboard_folder_fails_before_training(capsys):
    assert main(C + ["--tensorboard", "/proc/pysim-tb"]) == 2
    assert "cannot write results to /proc/pysim-tb" in capsys.readouterr().err
