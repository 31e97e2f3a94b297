"""Calibration: the least-squares fit against known links, and a real run over a tbf-shaped veth pair."""

import json
import subprocess

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


def test_fit_needs_two_sizes():
    with pytest.raises(ValueError, match="two different sizes"):
        fit_link([1000, 1000], [0.1, 0.1])


def test_calibrate_command_rejects_bad_sizes(capsys):
    from pysim.__main__ import main

    assert main(["calibrate", "--rank", "0", "--master", "127.0.0.1:1", "--sizes", "1MB"]) == 2
    assert "bad --sizes" in capsys.readouterr().err


@pytest.mark.skipif(veth_missing() is not None, reason=f"shaped veth link unavailable: {veth_missing()}")
def test_calibrate_over_a_tbf_shaped_veth_link(tmp_path):
    out = tmp_path / "link.json"
    with ShapedVeth("100mbit", name="pysimtst") as link:
        done = link.calibrate(["--sizes", "524288,1048576,2097152", "--reps", "2", "--out", str(out)], timeout_s=120)
    assert done.returncode == 0, done.stderr[-2000:]
    net = load_network_file(out)
    # tbf counts 1514-byte frames for 1448 payload bytes and the ACKs beside them: with tcp framing the fit
    # finds the shaper's rate
    assert net.links[0].up_bps == pytest.approx(100e6, rel=0.05)
    assert net.framing == FRAMINGS["tcp"]
    cal = json.loads(out.read_text())["calibration"]
    for real, model in zip(cal["real_s"], cal["model_s"], strict=True):
        assert model == pytest.approx(real, rel=0.1)
    assert "model/real" in done.stdout
    assert subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.count("pysimtst") == 0
