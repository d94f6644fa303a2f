"""PPO's critic: a value head sharing the policy's adapter (what llamatune does) vs a value
function with its own adapter, on ``recipes/ppo.yaml``.

    python bench/ppo_value_bench.py [--iterations 3]

Sets up ``recipes/ppo.yaml`` (needs ``runs/alpaca`` and ``runs/reward``), then for a few rollouts
times what one PPO iteration costs after the rollout:

* **shared**: the stage's own scoring and update (the value head reads the policy's hidden
  states: one pass through the base per mini-batch gives log-probs and values);
* **own adapter**: the same, plus what a separate value adapter adds: in scoring, one more
  no-grad pass through the base per mini-batch, and in every update mini-batch one more
  forward and backward through the base for the value loss. These extra passes run here
  with the policy adapter standing in for the value adapter (same shapes, same kernels,
  same FLOPs); the second adapter's weights, gradients and AdamW state are counted from its
  parameter count.

Prints seconds per iteration for each and the memory the second adapter would add.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iterations", type=int, default=3)
    args = ap.parse_args()
    import torch

    from llamatune.advantages import value_loss
    from llamatune.config import load_config
    from llamatune.experience import minibatch, partition
    from llamatune.recipes.ppo import PPORecipe, _rollout, _update

    recipe = REPO / "recipes" / "ppo.yaml"
    out = Path(tempfile.mkdtemp(prefix="bench-value-")) / "run"
    cfg = load_config(recipe, [f"output_dir={out}", "train.eval_every=0", "train.save_every=0",
                               "train.progress=false", "ppo.sample_every=0"])
    r = PPORecipe(cfg, str(recipe))
    r.setup()
    p, tc = cfg.ppo, cfg.train
    shared, extra = [], []
    for it in range(args.iterations):
        rows = [r.train_samples[i] for i in range(it * p.rollout_batch, (it + 1) * p.rollout_batch)]
        torch.manual_seed(it)
        roll = _rollout(r, rows)
        parts = partition(len(rows), tc.batch_size, seed=it)
        t = time.perf_counter()
        scored = r._score(roll, parts)
        _update(r, r.loop.updates, roll, scored, parts, one_pass=False)
        shared.append(time.perf_counter() - t)
        # What a value adapter of its own adds: its passes through the base.
        t = time.perf_counter()
        with torch.no_grad():
            for idx in parts:
                mb, _ = minibatch(roll.batch, idx, r.device)
                r.net("values", mb, head="value")
        for _ in range(p.epochs):
            for idx in parts:
                mb, w = minibatch(roll.batch, idx, r.device)
                m = roll.mask[idx, :w].to(r.device)
                v = r.net("values", mb, head="value")[:, :-1].float() * m
                tgt = scored.returns[idx, :w].to(r.device)
                value_loss(v, scored.values[idx, :w].to(r.device), tgt, m,
                           p.cliprange_value).backward()
        r.net.zero_grad(set_to_none=True)
        extra.append(time.perf_counter() - t)
    n_adapter = sum(q.numel() for n, q in r.net.named_parameters() if ".policy." in n)
    s, e = statistics.median(shared), statistics.median(extra)
    print(f"scoring + update per iteration ({args.iterations} rollouts of {p.rollout_batch} "
          f"answers, {p.epochs} epochs, mini-batch {tc.batch_size}):")
    print(f"  shared value head      {s:.2f} s")
    print(f"  value adapter its own  {s + e:.2f} s  (+{e:.2f} s, {100 * e / s:.0f}% more)")
    print(f"  its own adapter would also hold {n_adapter / 1e6:.2f}M more trainable parameters: "
          f"{n_adapter * 16 / 2**20:.0f} MiB of fp32 weights, gradients and AdamW state")


if __name__ == "__main__":
    main()
