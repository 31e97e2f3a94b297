"""Compute time: counted work, profiles that make runs repeatable, strategy work charged, clear errors."""

import json

import pytest
import torch

from pysim.compute import DEVICE_PROFILES, ComputeMeter, ComputeProfile, Work, count_work, resolve_compute


def test_counted_work_of_a_matmul_is_its_flops_and_bytes():
    a, b = torch.randn(64, 32), torch.randn(32, 16)
    w = count_work(lambda: a @ b)
    assert w.flops == 2 * 64 * 32 * 16
    assert w.kernels == 1 and w.bytes == 4 * (64 * 32 + 32 * 16 + 64 * 16)  # inputs and output, fp32


def _two_mode_count(fn) -> Work:
    """The work of ``fn()`` as pysim counted it before one mode did both: torch's
    ``FlopCounterMode`` for FLOPs with a kernel counter inside it for kernels and bytes."""
    from torch.utils.flop_counter import FlopCounterMode

    from pysim.compute import _KernelCounter
    from pysim.kernel_count import open_counters

    flop_mode, kernel_mode = FlopCounterMode(display=False), _KernelCounter()
    open_counters().append(kernel_mode)
    try:
        with flop_mode, kernel_mode:
            fn()
    finally:
        open_counters().pop()
    return Work(float(flop_mode.get_total_flops()) + kernel_mode.native_flops, float(kernel_mode.bytes),
                kernel_mode.kernels)


def _blocks():
    """Work pysim counts: training steps of both built-in models, inference (where torch hands
    composite operators such as ``linear`` to the mode, and counting runs their decomposition),
    optimizer steps, DeMo's DCT and top-k, codecs (C++ kernels with torch ops around them)."""
    from pysim.compress import TopKCodec, get_codec
    from pysim.strategies.demo import ChunkedDCT, keep_topk_per_chunk
    from pysim.workload import Batches, get_workload

    for name, batch in (("mnist", 8), ("shakespeare", 2)):
        wl = get_workload(name)
        x, y = Batches(wl.data()[0]).batch(torch.arange(batch))

        def step(wl=wl, x=x, y=y):
            torch.manual_seed(0)
            model = wl.model()
            opt = wl.optimizer(model.parameters())
            return lambda: (wl.loss(model(x), y).backward(), opt.step(), opt.step())

        def inference(wl=wl, x=x, y=y):
            torch.manual_seed(0)
            model = wl.model()

            def run():
                with torch.inference_mode():
                    wl.loss(model(x), y)
            return run

        yield f"{name} step", step
        yield f"{name} inference", inference

    def demo():
        g = torch.Generator().manual_seed(0)
        ps = [torch.randn(32, 16, 5, 5, generator=g), torch.randn(64, 512, generator=g), torch.randn(64, generator=g)]
        dcts = [ChunkedDCT(p.shape, 64) for p in ps]

        def run():
            kept = [keep_topk_per_chunk(d.encode(p), 32) for p, d in zip(ps, dcts, strict=True)]
            for p, d, k in zip(ps, dcts, kept, strict=True):
                p.sub_(d.decode(k))
            TopKCodec(500).pack(torch.cat([k.reshape(-1) for k in kept]), key="demo", step=0)
        return run

    def nesterov():
        ps = [torch.nn.Parameter(torch.randn(40, 30)) for _ in range(3)]
        opt = torch.optim.SGD(ps, lr=0.7, momentum=0.9, nesterov=True)

        def run():
            for p in ps:
                p.grad = torch.ones_like(p)
            opt.step()
        return run

    def nested():   # FlopCounterMode left metadata queries of non-standard tensors as they are
        nt = torch.nested.nested_tensor([torch.ones(2, 3), torch.ones(4, 3)], layout=torch.jagged)
        return lambda: (nt.is_contiguous(), nt.numel(), nt.storage_offset(), nt * 2.0)

    yield "DeMo's compression", demo
    yield "nested tensor", nested
    yield "outer Nesterov step", nesterov
    for spec in ("lowrank:4", "int8", "topk:0.01", "randomk:0.01", "dense:bf16"):
        def codec(spec=spec):
            c, x = get_codec(spec), torch.randn(64, 96, generator=torch.Generator().manual_seed(1))
            return lambda: c.unpack(c.pack(x, key="k", step=0), expect_shape=x.shape)
        yield f"codec {spec}", codec


@pytest.mark.parametrize("name,make", list(_blocks()), ids=[n for n, _ in _blocks()])
def test_one_mode_counts_what_flop_counter_and_kernel_counter_counted_together(name, make):
    from pysim import compute

    assert count_work(make()) == _two_mode_count(make())
    if name.endswith("inference"):   # the decomposition path ran
        assert any(compute._DECOMPOSES.values())


def test_profile_cost_formula():
    p = ComputeProfile("x", flops_per_s=1e9, bytes_per_s=1e8, kernel_s=1e-5, steps={"k": 0.25})
    assert p.seconds(Work(2e9, 1e8, 10)) == pytest.approx(2.0 + 1.0 + 1e-4)
    assert p.seconds(Work(2e9, 1e8, 10), key="k") == 0.25  # a measured step replaces the counted cost


def test_profile_meter_charges_the_same_work_the_same_time():
    meter = ComputeMeter(DEVICE_PROFILES["cpu"])
    x = torch.randn(1000)
    times = []
    for _ in range(3):
        with meter.measure():
            x.mul(2.0).add(1.0)
        times.append(meter.take()[0])
    assert times[0] == times[1] == times[2] > 0
    expected = DEVICE_PROFILES["cpu"].seconds(Work(0.0, 2 * 2 * 4000, 2))  # two kernels, 4 kB in and out each
    assert times[0] == pytest.approx(expected)


def test_cpp_codec_kernels_are_counted_like_torch_kernels():
    from pysim.compress import DenseCodec, lowrank_mq, lowrank_mtp, orthonormalize

    x, codec = torch.randn(10_000), DenseCodec()
    packet = codec.pack(x)
    assert count_work(lambda: codec.pack(x)) == Work(0.0, 40_000 + packet.numel(), 1)  # x in, packet out
    assert count_work(lambda: codec.unpack(packet)) == Work(0.0, packet.numel() + 40_000, 1)
    m, q, p = torch.randn(64, 32), torch.randn(32, 4), torch.randn(64, 4)
    assert count_work(lambda: lowrank_mq(m, q)) == Work(2.0 * 64 * 32 * 4, 4 * (64 * 32 + 32 * 4 + 64 * 4), 1)
    assert count_work(lambda: lowrank_mtp(m, p)) == Work(2.0 * 64 * 32 * 4, 4 * (64 * 32 + 64 * 4 + 32 * 4), 1)
    assert count_work(lambda: orthonormalize(p)).flops == 2.0 * 64 * 4 ** 2
    # outside a count the kernels cost nothing extra, and a profile meter charges them
    meter = ComputeMeter("cpu")
    with meter.measure():
        codec.pack(x)
    assert meter.take()[0] == pytest.approx(DEVICE_PROFILES["cpu"].seconds(Work(0.0, 40_000 + packet.numel(), 1)))


def test_codec_heavy_strategy_costs_more_than_simple_reduce_at_equal_model_work():
    from pysim.config import TrainConfig
    from pysim.network import Network
    from pysim.trainer import run
    from pysim.workload import image_workload

    def compute_s(strategy, **args):
        cfg = TrainConfig(workload=image_workload(), strategy=strategy, strategy_args=args, nodes=2, steps=6,
                          eval_every=6, eval_subset=200, train_examples=1000, warmup_steps=1, compute="h100",
                          network=Network.uniform(2, "1Gbps", "1ms"))
        return run(cfg).final.compute_s

    # the same optimizer (the workload's AdamW) on both: what differs is PowerSGD's codec work
    simple, powersgd = compute_s("SimpleReduce"), compute_s("PowerSGD", rank=2, optimizer="inner")
    assert powersgd > simple


def test_bad_compute_modes_and_profile_files(tmp_path):
    with pytest.raises(ValueError, match="unknown compute mode 'tpu'"):
        resolve_compute("tpu")
    with pytest.raises(ValueError, match="no compute profile"):
        resolve_compute(f"profile:{tmp_path / 'missing.json'}")
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="not a pysim compute profile"):
        resolve_compute(f"profile:{foreign}")
    good = ComputeProfile("calibrated", 1e10, 1e10, 1e-6, {"k": 0.01}).save(tmp_path / "p.json")
    assert resolve_compute(f"profile:{good}").steps == {"k": 0.01}


@pytest.mark.parametrize("edit", [{"flops_per_s": -1e9}, {"bytes_per_s": float("nan")}, {"kernel_s": -1e-6},
                                  {"steps": {"k": -0.01}}, {"steps": {"k": float("nan")}}, {"steps": {"k": "fast"}},
                                  {"flops_per_s": "1e9"}])
def test_profile_with_negative_or_nan_numbers_is_refused(tmp_path, edit):
    # a negative step time once gave "idle 1917%", NaN a clock that never ended
    d = json.loads(ComputeProfile("calibrated", 1e10, 1e10, 1e-6, {"k": 0.01}).save(tmp_path / "p.json").read_text())
    (tmp_path / "p.json").write_text(json.dumps(d | edit))
    with pytest.raises(ValueError, match="not a pysim compute profile.*compute profile 'calibrated'") as e:
        resolve_compute(f"profile:{tmp_path / 'p.json'}")
    assert "\n" not in str(e.value)


def test_reused_block_is_counted_twice_then_charged_the_same_without_counting(monkeypatch):
    import pysim.compute as compute

    meter = ComputeMeter("cpu")
    x = torch.randn(64, 64)
    calls = []
    real = compute.counting

    def spy():
        calls.append(1)
        return real()

    monkeypatch.setattr(compute, "counting", spy)
    charged = []
    for _ in range(5):
        with meter.measure(reuse="mm"):
            x @ x
        charged.append(meter.take()[0])
    assert len(calls) == 2  # the first run may create state; the second count is kept
    expected = DEVICE_PROFILES["cpu"].seconds(count_work(lambda: x @ x))
    assert charged[1:] == [expected] * 4 and expected > 0


def test_calibration_takes_the_fastest_run_noise_only_adds_time():
    from pysim.compute import _min_thread_time

    calls = []

    def work():  # every third call does 20x the work, as a disturbed step would take longer
        calls.append(1)
        n = 20 if len(calls) % 3 == 0 else 1
        x = torch.randn(64, 64)
        for _ in range(n * 20):
            x = x @ x / 64

    light = _min_thread_time(work, 9, 1)
    assert len(calls) == 10
    heavy_only = _min_thread_time(lambda: [work() for _ in range(3)], 2, 0)
    assert light < heavy_only / 5


def test_a_calibrated_step_records_when_it_was_measured():
    from pysim.compute import ComputeProfile, calibrate_step

    profile = ComputeProfile("calibrated", 1e10, 1e10, 1e-6, calibrated_at="2026-01-01T00:00:00Z")
    seconds = calibrate_step(profile, "w|10|4", lambda: torch.randn(8).sum(), repeats=3, warmup=1)
    assert profile.steps["w|10|4"] == seconds > 0
    assert profile.step_calibrated_at("w|10|4") > "2026-01-01T00:00:00Z"
    # a profile kept before steps had their own time says when its rates were measured
    assert profile.step_calibrated_at("old|1|1") == "2026-01-01T00:00:00Z"


def test_machine_profile_is_calibrated_once_then_kept_for_later_comparisons(tmp_path, monkeypatch):
    import pysim.compute as compute
    from pysim.compute import ComputeProfile, machine_cache_path, this_machine, workload_step_key
    from pysim.workload import image_workload

    wl = image_workload()

    def machine_profile(batch_size, recalibrate=False):
        return compute.machine_profile(wl, batch_size, recalibrate=recalibrate)

    monkeypatch.setenv("PYSIM_CACHE_DIR", str(tmp_path / "cache"))
    calls = []

    def fake_calibrate(workload, batch_size, seed=0, profile=None):
        calls.append(profile)
        p = profile or ComputeProfile("calibrated", 1e10, 1e10, 1e-6, machine=this_machine(),
                                      calibrated_at="2026-12-02T00:00:00Z")
        p.steps[workload_step_key(workload, batch_size)] = 0.01 * len(calls)
        p.steps_calibrated_at[workload_step_key(workload, batch_size)] = f"2026-12-0{2 + len(calls)}T00:00:00Z"
        return p

    monkeypatch.setattr(compute, "calibrate_workload", fake_calibrate)
    key = workload_step_key(wl, 64)
    first, origin = machine_profile(64)
    assert "calibrated now" in origin and machine_cache_path().is_file() and first.steps[key] == 0.01
    again, origin = machine_profile(64)             # a later comparison: the same compute, not a new draw
    assert len(calls) == 1 and again.steps[key] == 0.01 and "kept in" in origin and "at 2026-12-03" in origin
    both, _ = machine_profile(32)                    # a new step is added to the kept machine rates
    assert calls[-1] is not None and set(both.steps) == {key, workload_step_key(wl, 32)}
    assert "at 2026-12-04" in machine_profile(32)[1]   # the time the added step was measured
    fresh, origin = machine_profile(64, recalibrate=True)
    assert calls[-1] is None and fresh.steps[key] == 0.03 and "calibrated now" in origin
    assert ComputeProfile.load(machine_cache_path()).steps[key] == 0.03   # the new one is kept
    machine_cache_path().write_text("{not json")     # unreadable: calibrated again, replaced
    assert "calibrated now" in machine_profile(64)[1]
    foreign = ComputeProfile.load(machine_cache_path())
    foreign.machine = "another CPU"
    foreign.save(machine_cache_path())               # another machine's rates are not used
    assert "calibrated now" in machine_profile(64)[1] and calls[-1] is None
    blocked = tmp_path / "file"
    blocked.write_text("")
    monkeypatch.setenv("PYSIM_CACHE_DIR", str(blocked / "cache"))   # cannot be created: not kept, no crash
    profile, origin = machine_profile(64)
    assert key in profile.steps and "not kept" in origin and "PYSIM_CACHE_DIR" in origin
