"""Compile-only devices of an accelerator topology that is not attached, and what one device has.

`GEN:AxB[xC]` (v4, v5e, v5p, v6e) are libtpu's TPU topologies; `h100:N` is N H100s on one host, described by
anjax/aot/specs/h100_sxm.txtpb for jax's CUDA plugin (no GPU or CUDA libraries needed). Chip figures are Google's
and NVIDIA's spec sheets.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import sys
from pathlib import Path
from types import ModuleType

import jax

from anjax.core.config import ModelConfig

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip; a device of the topology may be a part of it (v4: one TensorCore of two)."""

    hbm_bytes: int
    peak_bf16_flops: float  # dense bf16 FLOP/s
    hbm_bytes_per_s: float
    cores: int  # TensorCores per chip


# Cloud TPU system-architecture pages (cloud.google.com/tpu/docs/v4, v5e, v5p, v6e), per chip.
CHIPS = {
    "v4": Chip(32 * GiB, 275e12, 1228e9, 2),
    "v5e": Chip(16 * GiB, 197e12, 819e9, 1),
    "v5p": Chip(95 * GiB, 459e12, 2765e9, 2),
    "v6e": Chip(32 * GiB, 918e12, 1640e9, 1),
    # NVIDIA H100 SXM5 datasheet: 80 GB HBM3 (here the device_memory_size of specs/h100_sxm.txtpb), 989 TFLOP/s
    # dense bf16, 3.35 TB/s.
    "h100": Chip(84987740160, 989e12, 3.35e12, 1),
}
GPU_SPECS = {"h100": Path(__file__).parent / "specs" / "h100_sxm.txtpb"}  # XLA GpuTargetConfigProto text
# jax's CUDA plugin (scripts/setup_tpu_aot.sh), apart from site-packages: installed, it logs on every jax start
CUDA_PLUGIN = Path(sys.prefix) / "aot-cuda"


@dataclasses.dataclass(frozen=True)
class Target:
    """The topology's devices and what one device has (its share of a chip)."""

    name: str
    platform: str  # "tpu" | "gpu": picks the attention kernel (`target_attention`), never the host's backend
    devices: tuple
    hbm_bytes: int
    peak_flops: float
    hbm_bytes_per_s: float


def tpu_target(name: str) -> Target:
    """`gen:AxB[xC]` (e.g. v5e:16x16) -> compile-only devices from libtpu."""
    from jax.experimental import topologies

    try:
        devices = topologies.get_topology_desc(platform="tpu", topology_name=name).devices
    except jax.errors.JaxRuntimeError as e:
        raise ValueError(f"topology {name!r}: {str(e).splitlines()[0]}") from None
    except RuntimeError as e:  # no libtpu: jax cannot make a TPU topology
        raise ValueError(
            f"no TPU compiler here ({str(e).splitlines()[0]}): run `bash scripts/setup_tpu_aot.sh` "
            "and use .venv-tpu/bin/python"
        ) from None
    chip = CHIPS[name.split(":")[0]]
    share = getattr(devices[0], "num_cores", chip.cores) / chip.cores
    return Target(
        name,
        "tpu",
        tuple(devices),
        int(chip.hbm_bytes * share),
        chip.peak_bf16_flops * share,
        chip.hbm_bytes_per_s * share,
    )


def _import_from(directory: Path, name: str) -> ModuleType:
    """Import the package `name` from `directory`, which is not on sys.path; its submodules follow its path."""
    package = directory.joinpath(*name.split("."))
    spec = importlib.util.spec_from_file_location(
        name, package / "__init__.py", submodule_search_locations=[str(package)]
    )
    if spec is None or spec.loader is None:
        raise ImportError(f"no package {name} in {directory}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def register_cuda_plugin(directory: Path = CUDA_PLUGIN) -> None:
    """Register jax's CUDA plugin from `directory` as jax's plugin discovery would (import the module, call its
    `initialize()`), before the first topology is made; once, and not where jax finds the plugin itself (installed)
    or without that directory."""
    installed = importlib.util.find_spec("jax_cuda12_plugin") is not None
    if installed or "jax_plugins.xla_cuda12" in sys.modules or not directory.is_dir():
        return
    _import_from(directory, "jax_cuda12_plugin")  # its extensions, which the plugin imports by name
    _import_from(directory, "jax_plugins.xla_cuda12").initialize()


def gpu_target(name: str) -> Target:
    """`h100:N` -> N compile-only GPUs on one host, described by anjax/aot/specs/h100_sxm.txtpb (CUDA plugin)."""
    from jax.experimental import topologies

    register_cuda_plugin()
    gen, n = name.split(":")
    try:
        devices = topologies.get_topology_desc(
            platform="cuda", topology_name=gen, topology=f"1x1x{n}", target_config=GPU_SPECS[gen].read_text()
        ).devices
    except (NotImplementedError, RuntimeError) as e:  # no CUDA plugin, or it failed to register
        raise ValueError(
            f"no CUDA compiler here ({str(e).splitlines()[0]}): run `bash scripts/setup_tpu_aot.sh` "
            "and use .venv-tpu/bin/python"
        ) from None
    chip = CHIPS[gen]
    return Target(name, "gpu", tuple(devices), chip.hbm_bytes, chip.peak_bf16_flops, chip.hbm_bytes_per_s)


def make_target(name: str) -> Target:
    """Compile-only devices of a TPU topology (`v5e:16x16`) or of N GPUs on one host (`h100:8`)."""
    gen = name.split(":")[0]
    if gen in GPU_SPECS and re.fullmatch(r"[a-z0-9]+:[1-8]", name):
        return gpu_target(name)
    if gen in CHIPS and gen not in GPU_SPECS and re.fullmatch(r"[a-z0-9]+:\d+(x\d+){1,2}", name):
        return tpu_target(name)
    raise ValueError(
        f"unknown topology {name!r}: expected GEN:AxB[xC] with GEN one of "
        f"{', '.join(g for g in CHIPS if g not in GPU_SPECS)} (e.g. v5e:2x2, v4:2x2x4, v5p:4x4x4) "
        f"or {'|'.join(GPU_SPECS)}:N for N <= 8 GPUs on one host"
    )


def target_attention(cfg: ModelConfig, target: Target) -> ModelConfig:
    """`cfg` with `attention=kernel` bound to the target's kernel (kernel:tpu, Mosaic; kernel:gpu, Triton): the
    program is traced on the host, whose backend is the CPU, so the platform's choice is made here."""
    return cfg.replace(attention=f"kernel:{target.platform}") if cfg.attention == "kernel" else cfg


def attention_path(cfg: ModelConfig) -> str:
    """What the compiled program's attention is, for the report."""
    if cfg.attention.startswith("kernel:"):
        name = cfg.attention.removeprefix("kernel:")
        return f"sparse, band on the Pallas {'Mosaic TPU' if name == 'tpu' else 'Triton GPU'} kernel"
    return {"dense": "dense", "sparse": "sparse, tiled (XLA)", "auto": "auto: sparse tiled (XLA) from 256 tokens"}[
        cfg.attention
    ]


def quiet_libtpu() -> None:
    """Compile-only use of libtpu and the CUDA plugin: the host backend is the CPU, libtpu skips its TPU-host
    discovery and the CUDA plugin registers without CUDA libraries (it only compiles)."""
    jax.config.update("jax_platforms", "cpu")
    for key, value in (
        ("TPU_SKIP_MDS_QUERY", "1"),
        ("TPU_WORKER_HOSTNAMES", "localhost"),
        ("TPU_ACCELERATOR_TYPE", "v5litepod-4"),
        ("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1"),
        ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"),
    ):
        os.environ.setdefault(key, value)
