"""Resumable evaluation: each finished task's result is saved with a fingerprint of what determines it.

    store = TaskStore(Path(out_dir) / f"{name}.tasks")
    saved = store.check(fingerprints)          # {task: fingerprint} -> {task: saved entry}; ValueError if one differs
    store.save(task, fingerprint, result, wall_seconds=..., compile_seconds=...)

A task's file `DIR/<task>.json` (the task name, `/` spelled `%2F` for a user's FILE.jsonl) holds
{"fingerprint", "result", "wall_seconds", "compile_seconds"}, written atomically
(`anjax.io.outputs`): a run killed at any moment leaves whole files. The fingerprint
(`task_fingerprint`) covers everything a task's scores depend on: the weights (a SHA-256 of the
parameters' bytes), the model config and anchor scheme, the documents as the model sees them (ids
of every request, gold, choices: the task data, a user's FILE.jsonl contents, --limit, --shots and
--seed), the caches and budgets, the policies' settings, timing on or off, batch and chunk sizes.
A saved task whose fingerprint differs is an error naming what differs; nothing is ever mixed
or deleted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from anjax.core.params import Params
from anjax.eval import tasks
from anjax.inference.policies import Policy, SepLLM
from anjax.inference.scoring import ScoringModel
from anjax.io import outputs


def params_digest(params: Params) -> str:
    """SHA-256 of every parameter's name, dtype, shape and bytes (host copies, one leaf at a time)."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        x = np.asarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}:{x.dtype}:{x.shape};".encode())
        flat = np.ascontiguousarray(x).reshape(-1).view(np.uint8)  # no copy of the bytes
        h.update(flat)  # pyright: ignore[reportArgumentType]  # numpy stubs declare the buffer protocol on 3.12+ only
    return h.hexdigest()


def documents_digest(model: ScoringModel, items: Sequence[tasks.MCItem]) -> str:
    """SHA-256 of the documents as scored: each item's request ids (`ScoringModel.encode_request`), gold, choices."""
    h = hashlib.sha256()
    for it in items:
        r = model.encode_request(it.pairs())
        h.update(json.dumps([r.prefix, r.tails, r.continuations, it.gold, it.choices]).encode())
    return h.hexdigest()


def model_fingerprint(model: ScoringModel) -> dict[str, Any]:
    """The model part of every task's fingerprint (computed once per run)."""
    return {
        "model": model.name,
        "config": dataclasses.asdict(model.cfg),
        "params_sha256": params_digest(model.params),
        "anchor_scheme": model.scheme.to_dict(),
    }


def task_fingerprint(
    model_part: dict,
    model: ScoringModel,
    items: Sequence[tasks.MCItem],
    caches: Sequence[str],
    policies: dict[str, Policy | SepLLM],
    settings: dict[str, Any],
) -> dict[str, Any]:
    """What one task's result depends on; `settings`: the run's options (shots, limit, seed, timing, sizes...)."""
    fingerprint = {
        **model_part,
        **settings,
        "caches": list(caches),
        "policies": {k: dataclasses.asdict(p) for k, p in sorted(policies.items())},
        "documents": len(items),
        "documents_sha256": documents_digest(model, items),
    }
    return json.loads(json.dumps(fingerprint))  # as it reads back from the file


class TaskStore:
    """The saved tasks of one evaluation run, in the directory `root`."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, task: str) -> Path:
        return self.root / (task.replace("%", "%25").replace("/", "%2F") + ".json")

    def load(self, task: str) -> dict | None:
        """The saved entry of `task`, or None; ValueError if its file cannot be read."""
        path = self.path(task)
        if not path.exists():
            return None
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            entry = e
        if not isinstance(entry, dict) or not {"fingerprint", "result"} <= entry.keys():
            raise ValueError(f"{path} is not a saved task result: delete that file to score {task} again")
        return entry

    def check(self, fingerprints: dict[str, dict]) -> dict[str, dict]:
        """{task: saved entry} of the tasks already saved with these fingerprints; ValueError if one was saved
        with others."""
        done = {}
        for task, fingerprint in fingerprints.items():
            entry = self.load(task)
            if entry is None:
                continue
            if entry["fingerprint"] != fingerprint:
                saved = entry["fingerprint"]
                differ = sorted(k for k in fingerprint.keys() | saved.keys() if fingerprint.get(k) != saved.get(k))
                raise ValueError(
                    f"{self.path(task)} holds {task} scored with other settings ({', '.join(differ)} differ): "
                    f"to keep it, use another --name (or --out-dir); to start over, delete {self.root}"
                )
            done[task] = entry
        return done

    def save(self, task: str, fingerprint: dict, result: dict, **timings: float) -> None:
        """Write `task`'s entry atomically (the directory is created)."""
        entry = {"fingerprint": fingerprint, "result": result, **timings}
        outputs.write_text(self.path(task), json.dumps(entry, indent=1))
