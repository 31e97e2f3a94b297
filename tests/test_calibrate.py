"""Calibration: the least-squares fit against known links, and a real run over a tbf-shaped veth pair."""

import json
import re
import socket
import subprocess
import sys
import time

import pytest

from pysim.calibrate import ShapedVeth, fit_link, veth_missing
from pysim.network import FRAMINGS, load_network_file


def test_fit_recovers_a_known_link_with_tcp_framing():
    # T(S) = 2 (alpha + 8 (wire(S/2) + acks(S/2)) / beta): 66 bytes per 1448-byte segment, and
    # the other direction's 66-byte ACK per 2 segments
    alpha, beta = 300e-6, 100e6

    def on_wire(c: int) -> int:
        segments = -(-c // 1448)
        return c + 66 * segments + 66 * -(-segments // 2)

    sizes = [100_000, 1_000_000, 4_000_000]
    real = [2 * (alpha + 8 * on_wire(s // 2) / beta) for s in sizes]
    fit = fit_link(sizes, real, "tcp")
    assert fit.bandwidth_bps == pytest.approx(beta, rel=1e-9) and fit.latency_s == pytest.approx(alpha, rel=1e-6)
    assert fit.model_s == pytest.approx(real, rel=1e-9)
    # with the raw rate known, the bytes per segment are fitted instead
    known = fit_link(sizes, real, "tcp", bandwidth="100Mbit")
    assert known.framing == FRAMINGS["tcp"] and known.latency_s == pytest.approx(alpha, rel=1e-6)


def test_fit_keeps_the_slope_when_the_link_starts_ahead_of_its_rate():
    # a token-bucket shaper sends its burst (here 16 KiB each way) at once: every all-reduce is
    # 8 * 16384 / beta shorter than the link's rate says. The slope is still the rate; the fixed
    # cost below zero is reported, not turned into a latency or a faster link
    beta, credit_s = 100e6, 8 * 16384 / 100e6
    fr = FRAMINGS["tcp"]
    sizes = [262_144, 1_048_576, 4_194_304, 8_388_608]
    real = [16 * (fr.wire_bytes(s // 2) + fr.acks(s // 2)) / beta - credit_s for s in sizes]
    fit = fit_link(sizes, real, "tcp")
    assert fit.bandwidth_bps == pytest.approx(beta, rel=1e-9)
    assert fit.latency_s == 0.0 and fit.head_start_s == pytest.approx(credit_s, rel=1e-6)
    assert "faster than its rate" in fit.table()
    # the model errs by the credit alone, most on the smallest transfer
    assert [m - r for m, r in zip(fit.model_s, real, strict=True)] == pytest.approx([credit_s] * 4, rel=1e-6)
    assert fit_link(sizes, [r + 2 * credit_s for r in real], "tcp").head_start_s == 0.0


def test_shaped_link_refuses_a_malformed_congestion_control_name():
    with pytest.raises(ValueError, match="bad TCP congestion control name 'reno; reboot'"):
        ShapedVeth("100mbit", congestion="reno; reboot")


def test_fit_needs_two_sizes():
    with pytest.raises(ValueError, match="two different sizes"):
        fit_link([1000, 1000], [0.1, 0.1])


def test_calibrate_command_rejects_bad_sizes(capsys):
    from pysim.__main__ import main

    assert main(["calibrate", "--rank", "0", "--master", "127.0.0.1:1", "--sizes", "1MB"]) == 2
    assert "bad --sizes" in capsys.readouterr().err
    assert main(["calibrate", "--rank", "0", "--master", "127.0.0.1:1", "--seconds", "-1"]) == 2
    assert "--seconds >= 0" in capsys.readouterr().err


@pytest.mark.skipif(veth_missing() is not None, reason=f"shaped veth link unavailable: {veth_missing()}")
def test_calibrate_over_a_tbf_shaped_veth_link(tmp_path):
    out = tmp_path / "link.json"
    with ShapedVeth("100mbit", name="pysimtst", congestion="reno") as link:
        ns_cc = subprocess.run(link.command(0, ["sysctl", "-n", "net.ipv4.tcp_congestion_control"]),
                               capture_output=True, text=True).stdout.strip()
        done = link.calibrate(["--sizes", "524288,1048576,2097152", "--reps", "2", "--seconds", "2", "--out", str(out)],
                              timeout_s=120)
    assert ns_cc == "reno"
    assert done.returncode == 0, done.stderr[-2000:]
    net = load_network_file(out)
    # tbf counts 1514-byte frames for 1448 payload bytes and the ACKs beside them: with tcp framing the fit
    # finds the shaper's rate
    assert net.links[0].up_bps == pytest.approx(100e6, rel=0.05)
    assert net.framing == FRAMINGS["tcp"]
    cal = json.loads(out.read_text())["calibration"]
    for real, model in zip(cal["real_s"], cal["model_s"], strict=True):
        assert model == pytest.approx(real, rel=0.1)
    assert cal["tcp_congestion_control"] == "reno" and "TCP congestion control: reno" in done.stdout
    assert "TCP window: not fitted" in done.stdout and "--tcp reno:rendezvous=on:segment=1MiB" in done.stdout
    # at least 2 rounds, and more until 2 s have passed: a round of 3.5 MiB takes ~0.3 s at 100 Mbit/s
    assert int(re.search(r"min of (\d+) repetitions", done.stdout).group(1)) > 2
    assert "model/real" in done.stdout
    assert subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.count("pysimtst") == 0


@pytest.mark.skipif(veth_missing() is not None, reason=f"shaped veth link unavailable: {veth_missing()}")
def test_shaped_link_refuses_a_congestion_control_it_cannot_set():
    with pytest.raises(ValueError, match=r"'no_such_cc' cannot be set here \(.+\); allowed: .*reno"):
        with ShapedVeth("100mbit", name="pysimtcc", congestion="no_such_cc"):
            pass
    assert "pysimtcc" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


@pytest.mark.parametrize("args,message", [
    (["--rank", "0", "--master", "127.0.0.1:29581", "--bandwidth", "fast"], "bad bandwidth 'fast'"),
    (["--rank", "0", "--master", "127.0.0.1:29581", "--bandwidth", "100"], "give a unit"),
    (["--rank", "1", "--master", "127.0.0.1"], "give ADDR:PORT"),
    (["--rank", "1", "--master", "127.0.0.1:99999"], "give ADDR:PORT"),
    (["--rank", "1", "--master", "no-such-host.invalid:29500"], "cannot resolve 'no-such-host.invalid'"),
    (["--rank", "0", "--master", "192.0.2.1:29581"], "192.0.2.1 is not an address of this machine"),
    (["--rank", "0", "--master", "127.0.0.1:29581", "--out", "/no/such/folder/net.json"],
     "cannot write /no/such/folder/net.json: folder /no/such/folder does not exist"),
    (["--rank", "0", "--master", "127.0.0.1:29581", "--ifname", "nope0"], "--ifname 'nope0': no such network"),
    (["--rank", "0", "--master", "127.0.0.1:29581", "--timeout", "0"], "--timeout must be a positive"),
    (["--rank", "0", "--master", "127.0.0.1:29581", "--sizes", "1024,1024"], "at least two different sizes"),
])
def test_calibrate_argument_errors_come_before_waiting_for_the_peer(args, message, capsys):
    # --bandwidth fast was once checked only after the whole calibration
    from pysim.__main__ import main

    t0 = time.perf_counter()
    assert main(["calibrate", *args]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and len(err.strip().splitlines()) == 1, err
    assert time.perf_counter() - t0 < 5


def test_calibrate_refuses_a_port_in_use_for_rank_0(capsys):
    from pysim.__main__ import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["calibrate", "--rank", "0", "--master", f"127.0.0.1:{port}"]) == 2
    assert f"port {port} is in use" in capsys.readouterr().err


@pytest.mark.parametrize("rank", [0, 1])
def test_a_peer_that_never_comes_is_one_line(rank, tmp_path):
    # once 64-132 lines of torch's C++ log with stack frames
    from pysim.launch import free_port

    out = subprocess.run([sys.executable, "-m", "pysim", "calibrate", "--rank", str(rank), "--master",
                          f"127.0.0.1:{free_port()}", "--timeout", "2", "--out", str(tmp_path / "n.json")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: calibrate: "), out.stderr
    assert ("no other rank joined" if rank == 0 else "could not reach rank 0") in lines[0]


def test_timings_are_saved_before_the_fit_can_fail(tmp_path, monkeypatch, capsys):
    from pysim import calibrate
    from pysim.__main__ import main
    from pysim.launch import free_port

    master = f"127.0.0.1:{free_port()}"
    peer = subprocess.Popen([sys.executable, "-m", "pysim", "calibrate", "--rank", "1", "--master", master,
                             "--sizes", "4096,65536", "--reps", "2", "--seconds", "0", "--timeout", "60"])

    def fit_fails(*args, **kwargs):
        raise ValueError("calibration: time does not grow with size; use larger sizes")

    monkeypatch.setattr(calibrate, "fit_link", fit_fails)
    try:
        code = main(["calibrate", "--rank", "0", "--master", master, "--sizes", "4096,65536", "--reps", "2",
                     "--seconds", "0", "--timeout", "60", "--out", str(tmp_path / "net.json")])
    finally:
        assert peer.wait(timeout=60) == 0
    assert code == 2 and "time does not grow" in capsys.readouterr().err
    saved = json.loads((tmp_path / "net.timings.json").read_text())
    assert saved["sizes"] == [4096, 65536] and len(saved["torch"]) == 2 and saved["reps"] == 2
    assert not (tmp_path / "net.json").exists()
