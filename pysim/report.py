"""Tables and plots of finished runs."""

from __future__ import annotations

from pathlib import Path


def human_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def human_seconds(s: float | None) -> str:
    if s is None:
        return "never"
    if s >= 3600:
        return f"{s / 3600:.2f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    return f"{s:.2f} s"


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    """A Markdown table with columns padded to their widest cell."""
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def results_table(results: list[dict], target_acc: float) -> str:
    """One row per run: accuracy, simulated time, time to target, bytes, real runtime."""
    head = ["strategy", "test acc", "sim. wall-clock", f"time to {100 * target_acc:g}%", "bytes sent/node",
            "vs SimpleReduce", "real runtime"]
    base = next((r["final"]["bytes_sent_per_node"] for r in results if r["config"]["strategy"] == "SimpleReduce"),
                None)
    rows = []
    for r in results:
        f = r["final"]
        if not base or not f["bytes_sent_per_node"]:
            ratio = "-"
        elif r["config"]["strategy"] == "SimpleReduce":
            ratio = "baseline"
        else:
            ratio = f"{base / f['bytes_sent_per_node']:.0f}x fewer"
        rows.append([r["name"], f"{100 * f['test_acc']:.2f}%", human_seconds(f["sim_time_s"]),
                     human_seconds(f["time_to_target_s"]), human_bytes(f["bytes_sent_per_node"]), ratio,
                     f"{f['real_runtime_s']:.1f} s"])
    return markdown_table(head, rows)


def plot_runs(results: list[dict], path: str | Path, title: str = "") -> Path:
    """Test accuracy vs simulated time and vs bytes sent per node, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        ev = r["evals"]
        acc = [100 * e["test_acc"] for e in ev]
        ax_t.plot([e["sim_time_s"] for e in ev], acc, marker="o", ms=3, label=r["name"])
        ax_b.plot([max(e["bytes_sent_per_node"], 1) for e in ev], acc, marker="o", ms=3, label=r["name"])
    ax_t.set_xlabel("simulated wall-clock (s)")
    ax_b.set_xlabel("bytes sent per node")
    ax_b.set_xscale("log")
    for ax in (ax_t, ax_b):
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(90, 100)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
