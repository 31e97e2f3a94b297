"""How the evaluation subset moves the time to target over seeds (issue 8).

    python bench/eval_subsets.py train      # SimpleReduce and DiLoCo(H=10), seeds 0-2 and 100-102: ~5 min
    python bench/eval_subsets.py evaluate   # every 10th step's model on all 10,000 test images: ~10 min
    python bench/eval_subsets.py analyze    # first crossing of 98% per evaluation subset

``train`` runs the MNIST defaults (600 steps, 2 nodes, device profile ``cpu``) with a
metrics function that saves node 0's deployed model every 5 steps instead of evaluating
it; ``evaluate`` records which test images each saved model (steps 50-600, every 10th
step) gets right; ``analyze`` derives, for the full test set and for fixed subsets of
it, the first step whose model reaches 98%, per seed, and prints its spread over the six
seeds (coefficient of variation) and the ratio of the two seed sets' means.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import sys
from pathlib import Path

import numpy as np
import torch

import pysim
from pysim.evaluation import eval_subset
from pysim.workload import Batches, image_workload

ROOT = Path(os.environ.get("EVAL_SUBSETS_DIR", "runs/eval_subsets"))
SEEDS = (0, 1, 2, 100, 101, 102)
STRATEGIES = ("SimpleReduce", "DiLoCo(H=10)")


def saving_metrics(model, data) -> dict[str, float]:
    """Saves the model instead of evaluating it (the target is never reached: no bisection)."""
    folder = Path(os.environ["EVAL_SUBSETS_SAVE"])
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, folder / f"{len(os.listdir(folder)):04d}.pt")
    return {"accuracy": 0.0, "loss": 1.0}


def train() -> None:
    for strategy in STRATEGIES:
        for seed in SEEDS:
            folder = ROOT / f"{strategy.split('(')[0]}_{seed}"
            folder.mkdir(parents=True, exist_ok=True)
            os.environ["EVAL_SUBSETS_SAVE"] = str(folder)
            wl = dataclasses.replace(image_workload(None), metrics=saving_metrics, split_evaluation=False)
            pysim.run(pysim.TrainConfig(workload=wl, strategy=strategy, steps=600, batch_size=64, eval_every=5,
                                        eval_subset=1, seed=seed, resolve_target=False, compute="cpu"))


def evaluate() -> None:
    torch.set_num_threads(1)
    wl = image_workload(None)
    test = Batches(wl.data()[1])
    x, y = test.batch(torch.arange(len(test)))
    model = wl.model().eval()
    for folder in sorted(ROOT.glob("*_*")):
        if not folder.is_dir() or folder.with_suffix(".npz").exists():
            continue
        files = sorted(folder.glob("*.pt"))[:-1]           # the last is the final evaluation: step 600 again
        kept = [(5 * (i + 1), f) for i, f in enumerate(files) if (5 * (i + 1)) % 10 == 0 and 5 * (i + 1) >= 50]
        rows = []
        with torch.inference_mode():
            for _, f in kept:
                model.load_state_dict(torch.load(f))
                pred = torch.cat([model(x[i:i + 250]).argmax(-1) for i in range(0, len(x), 250)])
                rows.append((pred == y).numpy())
        np.savez_compressed(folder.with_suffix(".npz"), steps=np.array([s for s, _ in kept]), correct=np.array(rows))
        print(folder.name, len(kept), flush=True)


def analyze() -> None:
    runs = {Path(f).stem: np.load(f) for f in glob.glob(str(ROOT / "*.npz"))}
    subsets = {"full test set": None, "1000 (the old subset)": 1000, "2000": 2000, "5000": 5000}
    print("first step reaching 98% (every 10th step), seeds 0,1,2 | 100,101,102")
    for strategy in STRATEGIES:
        name = strategy.split("(")[0]
        for label, size in subsets.items():
            idx = eval_subset(10_000, size).numpy()
            firsts, finals = [], []
            for seed in SEEDS:
                d = runs[f"{name}_{seed}"]
                acc = d["correct"][:, idx].mean(1)
                hit = np.nonzero(acc >= 0.98)[0]
                firsts.append(int(d.steps[hit[0]]) if len(hit) else None)
                finals.append(acc[-1])
            found = [f for f in firsts if f is not None]
            cv = np.std(found, ddof=1) / np.mean(found)
            a, b = [f for f in firsts[:3] if f], [f for f in firsts[3:] if f]
            print(f"{strategy:13s} {label:22s} final {np.mean(finals):.4f}  {firsts[:3]} | {firsts[3:]}  "
                  f"CV {100 * cv:4.1f}%  set 100 vs set 0 {100 * (np.mean(b) / np.mean(a) - 1):+5.1f}%")


if __name__ == "__main__":
    {"train": train, "evaluate": evaluate, "analyze": analyze}[sys.argv[1] if len(sys.argv) > 1 else "analyze"]()
