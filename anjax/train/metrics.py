"""Training metrics: RUN/metrics.jsonl, TensorBoard event files (RUN/tb) and the loss-curve PNG.

metrics.jsonl holds one JSON object per logged step: `step`, `loss` (mean
training cross-entropy of that step), `grad_norm`, `lr`, `tokens_per_s`, `train_s` (seconds spent in optimizer steps
since the run began, over all sittings; validation and start-up excluded), and on
validation steps `val_loss_full` / `val_loss_anchor` (step 0 is the validation
of the starting model and has no `loss`); distillation runs add `kl` and `val_kl`
(anjax.train.distill; `loss` stays the LM cross-entropy). On resume, lines after the restored
step (written by the interrupted process after its last checkpoint) are dropped,
so the file is one consistent history. On gs:// (no appends there) the file is rewritten at each record.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from etils import epath

from anjax.io.run_dir import is_remote


class MetricsLog:
    def __init__(self, run_dir: Path | epath.Path, resumed_step: int | None, tensorboard: bool):
        self.path = run_dir / "metrics.jsonl"
        kept = (
            [ln for ln in self.path.read_text().splitlines() if json.loads(ln)["step"] <= resumed_step]
            if resumed_step is not None and self.path.exists()
            else []
        )
        self.lines = [ln + "\n" for ln in kept] if is_remote(run_dir) else None  # the whole file, when rewritten
        self.path.write_text("".join(ln + "\n" for ln in kept))
        self.tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            purge = resumed_step + 1 if resumed_step is not None else None
            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=purge)

    def last(self, key: str, default: Any = None) -> Any:
        """`key` of the last record that has it (after the resume cut), else `default`."""
        for line in reversed(self.path.read_text().splitlines()):
            record = json.loads(line)
            if key in record:
                return record[key]
        return default

    def write(self, record: dict) -> None:
        if self.lines is None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        else:
            self.lines.append(json.dumps(record) + "\n")
            self.path.write_text("".join(self.lines))
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and value is not None:
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read(path: Path | epath.Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def plot_losses(metrics_path: Path | epath.Path, png_path: Path | epath.Path) -> None:
    """Training loss and both validation losses against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read(metrics_path)
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (
        ("loss", "train (anchor mask)"),
        ("val_loss_full", "validation, full attention"),
        ("val_loss_anchor", "validation, anchor mask"),
    ):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), marker="o" if key != "loss" else None, markersize=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with png_path.open("wb") as f:  # a file object: png_path may be on gs://
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
