"""Print the schedule-vs-effective LR table of docs/lr.md from a real run.

A cosine schedule over 400 steps, NaN losses at steps 56 and 58 (bad inputs: skipped, the
LR left alone), an update at step 60 that writes NaN into the weight (rolled back, the LR
cut, and its recovery) and a loss that stops improving after step 150 (a plateau reduction).

    python scripts/lr_table.py
"""

from __future__ import annotations

import logging

import torch

from stableopt import PlateauLR, SafeOptimizer

STEPS = 400


def main() -> None:
    logging.getLogger("stableopt").setLevel(logging.ERROR)
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.zeros(4))
    opt = SafeOptimizer(
        torch.optim.SGD([weight], lr=0.1),
        plateau=PlateauLR(patience_steps=100, check_every_steps=10, cooldown_steps=50),
        check_weights="every_step",
    )

    def corrupt(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        if opt.monitor.counters["steps"] == 60:
            with torch.no_grad():
                weight[0] = float("nan")

    opt.optimizer.register_step_post_hook(corrupt)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)
    used: list[float] = []
    opt.optimizer.register_step_pre_hook(lambda o, a, k: used.append(o.param_groups[0]["lr"]))
    rows = []
    noise = torch.Generator().manual_seed(1)
    for step in range(1, STEPS + 1):
        trend = 1.0 / step if step < 150 else 1.0 / 150
        loss = torch.tensor(trend) + 0.002 * torch.randn((), generator=noise)
        if step in (56, 58):
            loss = torch.tensor(float("nan"))
        opt.zero_grad()
        weight.grad = torch.full_like(weight, 0.01)
        opt.observe_loss(loss)
        scheduled = opt.param_groups[0]["lr"]
        updates_before = len(used)
        opt.step()
        sched.step()
        kinds = [e.kind for e in opt.events() if e.step == step]
        effective = f"{used[-1]:.5f}" if len(used) > updates_before else "(skipped)"
        if "rollback" in kinds:
            effective += " (undone)"
        if kinds or step % 50 == 0 or step in (1, 55, 61):
            rows.append((step, scheduled, opt.stats()["lr_factor"], effective, ", ".join(kinds)))
    print("| step | scheduled LR (`group['lr']`) | our factor after the step | LR the update used | events |")
    print("|---:|---:|---:|---:|---|")
    for step, scheduled, factor, effective, kinds in rows:
        print(f"| {step} | {scheduled:.5f} | {factor:.3g} | {effective} | {kinds} |")


if __name__ == "__main__":
    main()
