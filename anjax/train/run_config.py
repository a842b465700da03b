"""Run configuration: YAML file + `--set a.b=c` overrides -> a frozen, type-checked `RunConfig`.

Every field has a default; unknown keys and values of the wrong type are
rejected (naming the key) before anything is loaded or compiled. Override
values are parsed as YAML (`--set train.steps=100`, `--set anchors.tokens=[".", "?"]`,
`--set model.path=null`). Each section declares its numeric fields' intervals once, in
RANGES (`anjax.core.config.check_ranges`; `model.arch` is checked against ModelConfig's).
A resumed run keeps RESUME_KEYS (`check_resume`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import yaml

from anjax.core.config import ANCHOR_SCHEME_FIELDS, ATTENTION_CHOICES, SENTENCE_SPLITTERS, ModelConfig, check_ranges
from anjax.text import splitters
from anjax.train.data import DataConfig


@dataclasses.dataclass(frozen=True)
class RunSection:
    dir: str = "runs/default"  # run directory: checkpoints/, metrics.jsonl, tb/, loss.png, export/
    seed: int = 0  # parameter init of from-scratch models; the train-state RNG
    resume: bool = True  # continue from the latest checkpoint in `dir` if there is one
    distributed: bool = False  # jax.distributed.initialize() (multi-host); env JAX_COORDINATOR_ADDRESS also turns it on

    RANGES: ClassVar[dict[str, str]] = {"seed": "[0, 4294967296)"}


@dataclasses.dataclass(frozen=True)
class ModelSection:
    path: str | None = None  # HF dir, GGUF file or hub name; null = embedded SmolLM2-135M-Instruct
    from_scratch: bool = False  # random init from `arch` (the tokenizer still comes from `path`)
    arch: dict = dataclasses.field(default_factory=dict)  # ModelConfig overrides, e.g. {num_layers: 2}
    dtype: str = "float32"  # compute dtype: float32 | bfloat16
    param_dtype: str = "float32"  # master parameter (and optimizer) dtype
    remat: str = "none"  # activation checkpointing: none | full | dots
    scan_layers: bool = False  # nn.scan over the layer stack (faster compiles for deep models)
    # dense | sparse (exact block-sparse, no [T x T] logits) | auto (sparse for long rows) | kernel (sparse with the
    # platform's Pallas kernel, opt-in until checked on hardware; kernel:gpu | kernel:tpu name one)
    attention: str = "dense"

    def runtime(self) -> dict:
        """The ModelConfig fields this section sets on top of the model's own (how it runs, not what it is)."""
        return dict(
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            remat=self.remat,
            scan_layers=self.scan_layers,
            attention=self.attention,
        )


@dataclasses.dataclass(frozen=True)
class AnchorSection:
    mode: str = "ac"  # none | ep (punctuation anchors) | ac (<AC> after each sentence)
    tokens: tuple[str, ...] | None = None  # EP anchor strings; null = [".", "?", "!"]
    ac_init: str = "mean"  # new <AC> embedding row: mean of all rows | copy (of ".")
    window: int = 0  # every token also sees its last n positions (SepLLM's neighbours); 0 = the paper's AnSAN
    rule: str = "ansan"  # ansan (an anchor sees only its sentence) | sepllm (every token sees earlier anchors)
    splitter: str | None = None  # AC sentences: pysbd-en | sentencex-en (faster); null = the model's (pysbd-en)


@dataclasses.dataclass(frozen=True)
class TrainSection:
    steps: int = 100  # optimizer steps in total (a resumed run stops here too)
    grad_accum: int = 1  # micro-batches per step; data.batch_size is split into them
    lr: float = 1e-4  # peak learning rate
    warmup_steps: int = 10  # linear warm-up from 0
    schedule: str = "constant"  # after warm-up: constant | cosine
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at `steps`
    b1: float = 0.9  # Adam beta1
    b2: float = 0.999  # Adam beta2
    eps: float = 1e-8  # Adam epsilon
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    clip_norm: float | None = 1.0  # global gradient-norm clipping; null = off
    distill_weight: float = 0.0  # loss = lm + w * KL(teacher || student), teacher = frozen start model; 0 = off
    distill_temperature: float = 1.0  # softmax temperature T of the distillation KL (scaled by T^2)

    RANGES: ClassVar[dict[str, str]] = {
        "steps": "[1, inf)",
        "grad_accum": "[1, inf)",
        "lr": "(0, inf)",
        "warmup_steps": "[0, inf)",
        "min_lr_ratio": "[0, 1]",
        "b1": "[0, 1)",
        "b2": "[0, 1)",
        "eps": "(0, inf)",
        "weight_decay": "[0, inf)",
        "clip_norm": "(0, inf)",
        "distill_weight": "[0, inf)",
        "distill_temperature": "(0, inf)",
    }


@dataclasses.dataclass(frozen=True)
class EvalSection:
    every: int = 50  # validation every N steps (and before the first and after the last); 0 = off
    batches: int | None = 4  # validation batches per evaluation; null = the whole split

    RANGES: ClassVar[dict[str, str]] = {"every": "[0, inf)", "batches": "[1, inf)"}


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    every: int = 50  # save every N steps (and at the end)
    keep: int = 2  # keep the last K checkpoints
    async_save: bool = True  # write in a background thread while training continues
    export_hf: bool = True  # write RUN/export (Hugging Face format) at the end

    RANGES: ClassVar[dict[str, str]] = {"every": "[1, inf)", "keep": "[1, inf)"}


@dataclasses.dataclass(frozen=True)
class MeshSection:
    data: int = -1  # data-parallel replicas (one axis may be -1: all devices left)
    fsdp: int = 1  # parameter/optimizer/gradient sharding (ZeRO-3)
    tensor: int = 1  # tensor parallelism over heads / kv_heads / mlp / vocab


@dataclasses.dataclass(frozen=True)
class LogSection:
    every: int = 1  # metrics.jsonl / TensorBoard / progress-bar period in steps
    tensorboard: bool = True  # TensorBoard event files in RUN/tb

    RANGES: ClassVar[dict[str, str]] = {"every": "[1, inf)"}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    run: RunSection = RunSection()
    model: ModelSection = ModelSection()
    anchors: AnchorSection = AnchorSection()
    data: DataConfig = DataConfig()  # anjax.train.data.DataConfig; data.batch_size is the GLOBAL batch (all hosts)
    train: TrainSection = TrainSection()
    eval: EvalSection = EvalSection()
    checkpoint: CheckpointSection = CheckpointSection()
    mesh: MeshSection = MeshSection()
    log: LogSection = LogSection()

    def __post_init__(self):
        choices = {
            "model.dtype": (self.model.dtype, ("float32", "bfloat16")),
            "model.param_dtype": (self.model.param_dtype, ("float32", "bfloat16")),
            "model.remat": (self.model.remat, ("none", "full", "dots")),
            "model.attention": (self.model.attention, ATTENTION_CHOICES),
            "anchors.mode": (self.anchors.mode, ("none", "ep", "ac")),
            "anchors.ac_init": (self.anchors.ac_init, ("mean", "copy")),
            "anchors.rule": (self.anchors.rule, ("ansan", "sepllm")),
            "train.schedule": (self.train.schedule, ("constant", "cosine")),
        }
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"{key} must be one of {'|'.join(allowed)}, got {value!r}")
        if self.data.batch_size % self.train.grad_accum:
            raise ValueError(
                f"data.batch_size={self.data.batch_size} is not a multiple of train.grad_accum={self.train.grad_accum}"
            )
        for name in ("run", "train", "eval", "checkpoint", "log"):
            section = getattr(self, name)
            check_ranges(type(section), vars(section), f"{name}.")
        check_ranges(ModelConfig, _check_fields(ModelConfig, self.model.arch, "model.arch"), "model.arch.")
        if "max_position_embeddings" in self.model.arch:  # else checked once the model is loaded
            check_fits(self.data, self.model.arch["max_position_embeddings"])
        if self.anchors.mode == "ep" and self.anchors.tokens == ():
            raise ValueError('anchors.tokens is empty in EP mode: give anchor strings, e.g. [".", "?", "!"], or null')
        if self.anchors.window < 0:
            raise ValueError(f"anchors.window must be >= 0, got {self.anchors.window}")
        if self.anchors.splitter is not None:
            try:  # an unknown name always; a missing package where sentences are split (AC)
                if self.anchors.mode == "ac" or self.anchors.splitter not in SENTENCE_SPLITTERS:
                    splitters.require(self.anchors.splitter)
            except ValueError as e:
                raise ValueError(f"anchors.splitter: {e}") from None
        elsewhere = sorted(set(self.model.arch) & {*self.model.runtime(), *ANCHOR_SCHEME_FIELDS})
        if elsewhere:
            raise ValueError(f"model.arch.{elsewhere[0]}: set it with model.{elsewhere[0]} or the anchors section")

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dicts and lists (YAML/JSON-ready)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` as type `tp` (int, float, bool, str, dict, tuple[X, ...], X | None), else ValueError naming `key`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ValueError:
                pass
    elif origin is tuple and isinstance(value, (list, tuple)):
        return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    elif tp is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value)  # YAML reads 2e-5 (no dot) as a string
        except ValueError:
            pass
    elif tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif tp in (bool, str, dict) and isinstance(value, tp):
        return value
    name = getattr(tp, "__name__", None) or str(tp)
    raise ValueError(f"config key {key}: expected {name}, got {value!r} ({type(value).__name__})")


def _check_fields(cls: type, values: dict, prefix: str) -> dict[str, Any]:
    """Coerce a dict of `cls` fields; rejects unknown keys."""
    if not isinstance(values, dict):
        raise ValueError(f"config key {prefix}: expected a mapping, got {values!r}")
    types_ = typing.get_type_hints(cls)
    hints = {f.name: types_[f.name] for f in dataclasses.fields(cls)}  # not the RANGES class variable
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ValueError(f"unknown config key {prefix}.{unknown[0]} (known: {', '.join(sorted(hints))})")
    return {k: _coerce(v, hints[k], f"{prefix}.{k}") for k, v in values.items()}


def from_dict(raw: dict[str, Any]) -> RunConfig:
    """A RunConfig from nested dicts; every section and key optional."""
    raw = raw or {}
    hints = typing.get_type_hints(RunConfig)
    unknown = sorted(set(raw) - set(hints))
    if unknown:
        raise ValueError(f"unknown config section {unknown[0]!r} (known: {', '.join(hints)})")
    sections = {name: hints[name](**_check_fields(hints[name], raw[name] or {}, name)) for name in raw}
    return RunConfig(**sections)


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one `a.b.c=value` (value parsed as YAML) to nested dicts in place."""
    key, sep, text = assignment.partition("=")
    if not sep or not key:
        raise ValueError(f"--set expects key.path=value, got {assignment!r}")
    *parents, last = key.strip().split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {key}: {part} is not a section")
    node[last] = _parse_yaml(text, f"--set {key}") if text.strip() else ""


def _parse_yaml(text: str, where: str) -> Any:
    """yaml.safe_load, a syntax error becoming a one-line ValueError naming `where`, the line and the column."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ValueError(f"{where}: YAML syntax error{at}: {problem}") from None


def load(path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML config (None: all defaults) and apply `--set` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"config file {path} is not UTF-8 text") from None
        raw = _parse_yaml(text, f"config file {path}") or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping of sections at the top level")
    for assignment in overrides:
        apply_override(raw, assignment)
    return from_dict(raw)


# What a resumed run must keep: everything that changes the batch a step sees or the optimisation, so that a
# resume gives the losses of an uninterrupted run (README). train.steps may grow with a constant schedule (not
# with cosine, whose decay ends at it); run.dir, model.dtype/remat/attention, eval, checkpoint, log and mesh
# settings may change.
RESUME_KEYS = (
    *(("run", k) for k in ("seed",)),
    *(("data", k) for k in ("path", "name", "split", "format", "text_field", "text_sample_by", "seq_len")),
    *(("data", k) for k in ("batch_size", "packing", "ac_in_loss", "shuffle", "seed")),
    *(("train", k) for k in ("grad_accum", "lr", "warmup_steps", "schedule", "min_lr_ratio", "b1", "b2", "eps")),
    *(("train", k) for k in ("weight_decay", "clip_norm", "distill_weight", "distill_temperature")),
    ("model", "param_dtype"),
)


def check_resume(rc: RunConfig, stored: dict[str, Any], run_dir: str | os.PathLike) -> None:
    """ValueError naming the `--set` when `rc` changes a RESUME_KEYS field of the run's `stored` config.yaml
    (fields an older config.yaml lacks are not compared)."""
    now = rc.to_dict()
    keys = RESUME_KEYS + ((("train", "steps"),) if rc.train.schedule == "cosine" else ())
    for section, key in keys:
        if key in (stored.get(section) or {}) and stored[section][key] != now[section][key]:
            was, new = stored[section][key], now[section][key]
            raise ValueError(
                f"the run in {run_dir} was started with {section}.{key}={json.dumps(was)}; resuming it with "
                f"--set {section}.{key}={json.dumps(new)} would change its data or optimisation: keep "
                f"{section}.{key}={json.dumps(was)}, or start a new run with another run.dir"
            )


def check_fits(data: DataConfig, positions: int) -> None:
    """ValueError when data.seq_len exceeds the model's `positions` (max_position_embeddings)."""
    if data.seq_len > positions:
        raise ValueError(
            f"data.seq_len={data.seq_len} exceeds the model's {positions} positions: set data.seq_len <= {positions}"
        )
