"""Node processes: the failed node is the one named, hangs are found, Ctrl-C is clean, nothing is left."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import node_programs
import pytest

from pysim.launch import NodeError, free_port, pin_to_cpu, run_nodes

TESTS = Path(__file__).parent


def children_of_this_process() -> list[int]:
    """Child processes, less multiprocessing's shared helpers (its resource tracker, and the fork
    server node processes start from)."""
    me, kids = os.getpid(), []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) != me:
                        continue
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read()
                    if b"resource_tracker" not in cmdline and b"forkserver" not in cmdline:
                        kids.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return kids


def exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_for_pids(pid_dir: Path, n: int, timeout_s: float = 60.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        files = [pid_dir / f"{r}.pid" for r in range(n)]
        if all(f.exists() for f in files):
            return [int(f.read_text()) for f in files]
        time.sleep(0.05)
    raise AssertionError(f"nodes did not start within {timeout_s} s")


def run_and_signal(tmp_path: Path, n: int, rank: int, sig: int, **kwargs) -> tuple[NodeError, float, list[int]]:
    """Runs collective_loop on n nodes, sends ``sig`` to node ``rank``; (error, seconds to it, node pids)."""
    pids: list[int] = []
    sent_at: list[float] = []

    def strike():
        pids.extend(wait_for_pids(tmp_path, n))
        time.sleep(0.3)  # let the nodes get into their collectives
        sent_at.append(time.monotonic())
        os.kill(pids[rank], sig)

    t = threading.Thread(target=strike)
    t.start()
    try:
        with pytest.raises(NodeError) as e:
            run_nodes(node_programs.collective_loop, n, (str(tmp_path),), **kwargs)
    finally:
        t.join()
    return e.value, time.monotonic() - sent_at[0], pids


@pytest.mark.parametrize("rank", [0, 2])
def test_killed_node_is_named_within_seconds(tmp_path, rank):
    err, took_s, pids = run_and_signal(tmp_path, 3, rank, signal.SIGKILL)
    assert err.rank == rank and f"process {pids[rank]} killed by signal 9 (SIGKILL)" in str(err), str(err)
    assert took_s < 5
    assert not any(exists(p) for p in pids) and children_of_this_process() == []


def test_stopped_node_is_found_by_its_missing_heartbeat(tmp_path):
    err, took_s, pids = run_and_signal(tmp_path, 2, 1, signal.SIGSTOP, heartbeat_s=1.5)
    assert err.rank == 1 and "no heartbeat" in str(err) and "stopped" in str(err), str(err)
    assert 1.0 < took_s < 6
    assert not any(exists(p) for p in pids) and children_of_this_process() == []


def test_node_error_is_reported_quickly_and_nothing_is_left():
    t0 = time.monotonic()
    with pytest.raises(NodeError, match="node 2 failed: RuntimeError: boom on purpose") as e:
        run_nodes(node_programs.fail_on, 3, (2,))
    assert time.monotonic() - t0 < 20
    assert "Traceback" in e.value.node_traceback and e.value.rank == 2
    assert children_of_this_process() == []


def test_node_crash_without_python_error_is_reported():
    with pytest.raises(NodeError, match=r"node 1 failed: process \d+ exited with code 7 without a report"):
        run_nodes(node_programs.crash_hard, 2)
    assert children_of_this_process() == []


def test_results_come_back_by_rank():
    pids = run_nodes(node_programs.report_pid, 2)
    assert len(set(pids)) == 2 and os.getpid() not in pids
    assert children_of_this_process() == []


def test_nothing_listens_beyond_loopback():
    found = run_nodes(node_programs.listening_sockets, 2, (os.getpid(),))[0]
    assert len(found) >= 3  # the parent's store and each node's gloo listener
    # /proc/net/tcp keeps addresses as hex in host byte order: 0100007F is 127.0.0.1; tcp6 ::1 ends in 01000000
    loopback = [a for a in found if a.startswith("/tcp ") and a.split()[1].startswith("0100007F:")
                or a.startswith("tcp6 ") and a.split()[1].startswith("00000000000000000000000001000000:")]
    assert loopback == found, found


def test_local_workers_bind_gloo_to_loopback_whatever_the_parent_names(monkeypatch):
    # the listening test above cannot tell on a host whose name resolves to loopback: ask the workers
    from pysim.launch import loopback_interface

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth-of-the-cluster")   # a user's setting for torchrun runs
    assert run_nodes(node_programs.gloo_interface, 2) == [loopback_interface()] * 2


def test_pin_to_cpu_pins_only_with_one_worker_per_cpu():
    cpus = sorted(os.sched_getaffinity(0))
    seen = {}

    def pin(process: int, processes: int) -> None:   # in a thread of its own: the test process stays free
        seen[(process, processes)] = (pin_to_cpu(process, processes), sorted(os.sched_getaffinity(0)))

    for args in ((0, len(cpus) + 1), (len(cpus) - 1, len(cpus))):
        t = threading.Thread(target=pin, args=args)
        t.start()
        t.join()
    assert seen[(0, len(cpus) + 1)] == (None, cpus)                       # more workers than CPUs: left free
    assert seen[(len(cpus) - 1, len(cpus))] == (cpus[-1], [cpus[-1]])      # one per CPU: the worker's own
    assert sorted(os.sched_getaffinity(0)) == cpus


def test_a_pin_the_system_refuses_leaves_the_worker_free(monkeypatch):
    def refuse(pid, cpus):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setaffinity", refuse)
    assert pin_to_cpu(0, len(os.sched_getaffinity(0))) is None


@pytest.mark.skipif(len(os.sched_getaffinity(0)) > 8, reason="one worker per CPU: kept to small machines")
def test_workers_are_pinned_one_per_cpu_unless_told_not_to():
    cpus = sorted(os.sched_getaffinity(0))
    n = len(cpus)
    assert run_nodes(node_programs.cpus_of_node, n, processes=n) == [[c] for c in cpus]
    assert run_nodes(node_programs.cpus_of_node, n, processes=n, pin_cpus=False) == [cpus] * n
    if n > 1:   # fewer workers than CPUs: the scheduler stays free
        assert run_nodes(node_programs.cpus_of_node, 2, processes=1) == [cpus] * 2


def test_bad_arguments():
    for kwargs in ({"n": 0}, {"n": True}, {"n": 2, "heartbeat_s": 0}, {"n": 2, "timeout_s": -1.0}):
        with pytest.raises(ValueError, match="number of nodes|heartbeat_s|timeout_s"):
            run_nodes(node_programs.report_pid, **kwargs)


INTERRUPTIBLE = """
import faulthandler, signal, sys
from pysim.launch import RunInterrupted, run_nodes
import node_programs
# Python keeps SIGINT ignored if it starts ignored, as every background job of a shell does (the
# suite run as `pytest &`): a program at a terminal has the default handler
signal.signal(signal.SIGINT, signal.default_int_handler)
faulthandler.dump_traceback_later(45, exit=True)  # a hang shows where every thread was, then exits
try:
    run_nodes(node_programs.collective_loop, 2, (sys.argv[1],))
except RunInterrupted as e:
    print(e, file=sys.stderr)
    sys.exit(130)
"""


def test_ctrl_c_stops_every_node_with_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", INTERRUPTIBLE, str(tmp_path)], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pids = wait_for_pids(tmp_path, 2)
        time.sleep(0.3)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert err == "interrupted; stopped 2 node processes\n"
    assert not any(exists(p) for p in pids)


PARENT = """
import sys
from pysim.launch import run_nodes
import node_programs
run_nodes(node_programs.collective_loop, 2, (sys.argv[1],))
"""


def alive(pid: int) -> bool:
    """The process exists and is not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_nodes_and_their_fork_server_end_when_the_parent_is_killed(tmp_path, sig):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        pids = wait_for_pids(tmp_path, 2)
        with open(f"/proc/{pids[0]}/stat") as f:
            server = int(f.read().rsplit(")", 1)[1].split()[1])   # the nodes' parent: the fork server
        os.kill(proc.pid, sig)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while any(alive(p) for p in [*pids, server]) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not any(alive(p) for p in pids), "a node outlived its parent"
    assert not alive(server) or server == proc.pid


KILL_ONE = """
import os, signal, sys, threading, time
from pathlib import Path
from pysim.launch import NodeError, run_nodes
import node_programs

def strike():
    while not Path(sys.argv[1], "1.pid").exists():
        time.sleep(0.05)
    time.sleep(0.3)
    os.kill(int(Path(sys.argv[1], "1.pid").read_text()), signal.SIGKILL)

threading.Thread(target=strike).start()
try:
    run_nodes(node_programs.collective_loop_holding_a_lock, 2, (sys.argv[1],))
except NodeError as e:
    print(e, file=sys.stderr)
"""


def test_a_killed_node_holding_a_lock_leaves_no_leaked_semaphore_warning(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", KILL_ONE, str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.stderr.startswith("node 1 failed: process ") and "killed by signal 9" in out.stderr, out.stderr
    assert out.stderr.count("\n") == 1, out.stderr  # no "resource_tracker: ... leaked semaphore" warning


def test_same_code_runs_under_torchrun_and_only_rank_0_gets_results():
    script = Path(node_programs.__file__)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(free_port()), str(script)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    # results travel as JSON: tuples come back as lists; only rank 0 prints
    assert out.stdout.count("RESULT") == 1 and "RESULT [[0, 2, 1.0], [1, 2, 1.0]]" in out.stdout, out.stdout



def test_a_script_without_a_main_guard_is_told_so_in_one_line(tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text("from pysim.launch import run_nodes\nrun_nodes(print, 2, ())\n")
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and time.monotonic() - t0 < 60
    last = p.stderr.strip().splitlines()[-1]
    assert 'put that code under `if __name__ == "__main__":`' in last and last.startswith("pysim.launch.NodeError")
    # the node processes say it in one line, without tracebacks of their own
    assert p.stderr.count("a node process imported a script that starts runs at import time") >= 1
    assert p.stderr.count("Traceback") == 1


def test_a_program_read_from_standard_input_runs_or_is_told_why_not():
    """``python3 - < script.py``: multiprocessing would re-run ``<stdin>`` as a file in every worker
    and each would die without a word; the run works when its nodes' code is importable, and a
    node function defined in the program itself is refused in one line."""
    runs = ("import node_programs\nfrom pysim.launch import run_nodes\n"
            "print('RESULT', run_nodes(node_programs.rank_and_world, 2))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, "-"], input=runs, capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0 and "RESULT [(0, 2, 1.0), (1, 2, 1.0)]" in p.stdout, p.stderr
    own = "from pysim.launch import run_nodes\ndef f(node, world):\n    return node\nrun_nodes(f, 2)\n"
    p = subprocess.run([sys.executable, "-"], input=own, capture_output=True, text=True, timeout=120)
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode != 0 and last == ("ValueError: 'f' is defined in a program read from standard input, which "
                                          "node processes cannot import: save it to a file and run that")


def test_torchrun_across_hosts_with_a_loopback_hostname_says_which_interface_to_set(monkeypatch):
    import socket

    from pysim import launch

    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.setenv("MASTER_ADDR", "10.1.2.3")
    real = socket.gethostbyname
    monkeypatch.setattr(socket, "gethostbyname", lambda name: "127.0.1.1" if name == socket.gethostname()
                        else real(name))
    monkeypatch.setattr(launch, "interface_towards", lambda address: "eth7" if address == "10.1.2.3" else None)
    with pytest.raises(ValueError, match=r"resolves to 127\.0\.1\.1.*set GLOO_SOCKET_IFNAME=eth7 \(the master is "
                                         r"10\.1\.2\.3\) on every host"):
        launch.check_gloo_interface()
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth7")      # named: gloo binds there, nothing to say
    launch.check_gloo_interface()
    monkeypatch.delenv("GLOO_SOCKET_IFNAME")
    # a run under torchrun says it before joining the group (where each rank would die in gloo)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")

    def joined(*args, **kwargs):
        raise AssertionError("init_process_group reached")

    monkeypatch.setattr("torch.distributed.init_process_group", joined)
    with pytest.raises(ValueError, match=r"set GLOO_SOCKET_IFNAME=eth7 \(the master is 10\.1\.2\.3\)"):
        run_nodes(node_programs.rank_and_world, 2)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")        # one host: loopback is right
    launch.check_gloo_interface()


NODE_GROUPS = """
import json, sys
from pysim.config import TrainConfig
from pysim.trainer import RunOptions, run

if __name__ == "__main__":
    cfg = TrainConfig(workload="mnist", strategy=sys.argv[1], nodes=4, steps=12, eval_every=6, eval_subset=200,
                      train_examples=2000, batch_size=16, compute="cpu", seed=3)
    result = run(cfg, options=RunOptions(processes=int(sys.argv[2])) if sys.argv[2] != "torchrun" else None)
    if result is not None:
        f = result.final
        print("RESULT", json.dumps([f.metrics, f.bytes_sent_per_node, f.sim_time_s,
                                    [e.sim_time_s for e in result.evals]]))
"""


@pytest.mark.parametrize("strategy", ["SimpleReduce", "DiLoCo(H=5)"])
def test_torchrun_ranks_hosting_node_groups_match_one_machine(strategy, tmp_path):
    # 2 torchrun ranks x 2 nodes each = the 4 nodes that 2 local worker processes host
    script = tmp_path / "groups.py"
    script.write_text(NODE_GROUPS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}

    def result(cmd):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
        assert out.returncode == 0, out.stderr[-2000:]
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        assert len(lines) == 1, out.stdout   # rank 0 alone prints
        return lines[0]

    local = result([sys.executable, str(script), strategy, "2"])
    ranks = result([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                    str(free_port()), str(script), strategy, "torchrun"])
    assert ranks == local
