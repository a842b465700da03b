"""Where a reported number came from: the one record every JSON report carries under "provenance".

    prov = provenance.begin("python -m anjax.evaluate", argv)   # at the command's start
    report["provenance"] = prov.finish(model=scoring_model)      # just before the report is written

The record: the git commit of the code and whether its tracked files differed from it (`dirty`), the
command (paths inside the repository written relative to it), library versions, the machine (CPU model,
cores, the load average at start and at end: a shared machine's timings read with it), and per model its
path (relative), weights fingerprint (`weights_sha256`: SHA-256 of every parameter in the per-layer layout,
the same whether the layers are stacked or not) and the training step of the checkpoint it came from where
the path is a run directory or its export. Reports built from other reports (compare, policies) name their
sources' records (`sources`).
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from anjax.core.params import Params, with_scan_layers
from anjax.eval.resume import params_digest
from anjax.io import run_dir

REPO = Path(__file__).resolve().parents[2]
LIBRARIES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "transformers", "tokenizers")


def relative(path: str | os.PathLike) -> str:
    """`path` relative to the repository when it lies inside it, else as given."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(REPO)) if p.is_absolute() or p.exists() else str(path)
    except ValueError:
        return str(path)


def git_state() -> dict[str, Any]:
    """{"commit": HEAD, "dirty": tracked files differ from it} of the repository (None where git cannot tell)."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def libraries() -> dict[str, str | None]:
    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"python": platform.python_version(), **{name: version(name) for name in LIBRARIES}}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def training_step(path: str | os.PathLike | None) -> int | None:
    """The latest checkpoint step of a run directory, or of the run an export (RUN/export) lies in; else None."""
    if path is None:
        return None
    for run in (Path(path), Path(path).parent):
        if run_dir.is_run_dir(run):
            steps = [int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()]
            return max(steps, default=None)
    return None


def weights_fingerprint(cfg, params: Params) -> str:
    """SHA-256 of the parameters in the per-layer layout (`anjax.eval.resume.params_digest`; fused projections,
    `anjax.core.params.fuse_projections`, hash as they are)."""
    if cfg.scan_layers:
        cfg, params = with_scan_layers(cfg, params, False)
    return params_digest(params)


def model_record(model, path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Name, path, weights fingerprint and training step of a model (anything with `cfg` and `params`)."""
    return {
        "name": getattr(model, "name", None),
        "path": None if path is None else relative(path),
        "weights_sha256": weights_fingerprint(model.cfg, model.params),
        "training_step": training_step(path),
        "anchor_scheme": model.scheme.to_dict() if hasattr(model, "scheme") else None,
    }


@dataclasses.dataclass(frozen=True)
class Provenance:
    """A command's start (`begin`); `finish` completes the record."""

    command: str
    started: str
    load_start: list[float] | None

    def finish(
        self, sources: dict[str, Any] | None = None, paths: dict[str, Any] | None = None, **models
    ) -> dict[str, Any]:
        """The record; `models`: name -> a model (`model_record`, its path from `paths`); `sources`: the records
        of the reports this one was built from."""
        record = {
            "command": self.command,
            "started": self.started,
            "finished": _now(),
            **git_state(),
            "libraries": libraries(),
            "machine": {
                "cpu": cpu_model(),
                "cores": os.cpu_count(),
                "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                "platform": platform.platform(),
                "load_average_start": self.load_start,
                "load_average_end": _load(),
            },
            "models": {k: model_record(m, (paths or {}).get(k)) for k, m in models.items()},
        }
        if sources is not None:
            record["sources"] = sources
        return record


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def begin(program: str, argv: Sequence[str] | None = None) -> Provenance:
    """Record a command's start: `program` (e.g. "python -m anjax.evaluate") and its arguments (default
    sys.argv[1:]), paths inside the repository made relative."""
    args = sys.argv[1:] if argv is None else list(argv)
    shown = [relative(a) if os.sep in a and Path(a).is_absolute() else a for a in args]
    return Provenance(" ".join([program, *map(shlex.quote, shown)]), _now(), _load())
