"""`python -m anjax.serve`: an OpenAI-compatible HTTP server with continuous batching (anjax.serve).

    python -m anjax.serve --model PATH --port 8000 --slots 8 --capacity 1024 --cache anchor

--model takes what infer.py takes (an HF directory, a GGUF file, an anjax run; default: the embedded
SmolLM2-135M-Instruct). Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models,
GET /health, GET /metrics. SIGTERM or Ctrl-C (SIGINT) stops accepting requests, lets the ones in flight
finish for up to --drain-seconds (then ends them: a stream with a final error event, a plain request with
a 503), and exits 0; a second Ctrl-C exits at once. --slots x --capacity whose KV cache and weights cannot
fit in the memory available is refused (arithmetic on the model's config) before any weight is read.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path

from anjax import cli

DRAIN_MARGIN_S = 10.0  # uvicorn's own cut-off after the drain: requests ended by the drain finish their responses


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m anjax.serve", description=cli.summary(__doc__))
    cli.add_engine_args(p)
    p.add_argument("--model-name", default=None, help="the name /v1/models reports (default: from --model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--slots", type=int, default=8, help="decode slots: requests generated together")
    p.add_argument("--capacity", type=int, default=1024, help="KV cache slots per decode slot")
    p.add_argument("--cache", choices=("anchor", "full"), default=None, help="default: anchor if the model has anchors")
    p.add_argument("--chunk-size", type=int, default=256, help="prefill chunk (tokens)")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot (then 429)")
    p.add_argument("--drain-seconds", type=float, default=30.0, help="on SIGTERM, wait this long for requests")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    cli.check_range("--port", args.port, 0, 65535)
    for name in ("slots", "capacity", "chunk_size", "max_queue"):
        cli.check_range(f"--{name.replace('_', '-')}", getattr(args, name), 1)
    cli.check_range("--drain-seconds", args.drain_seconds, 0)
    check_listen(args.host, args.port)
    return args


def check_listen(host: str, port: int) -> None:
    """UsageError unless the address can be listened on (checked before the model loads)."""
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        raise cli.UsageError(
            f"cannot listen on {host}:{port} ({e.strerror or e}): pick another --port or --host"
        ) from None


def available_bytes(device) -> int | None:
    """Memory free for new buffers on `device`: the accelerator's limit minus what is in use, or the host's
    MemAvailable for a CPU; None when unknown."""
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None


def check_cache_fits(cfg, slots: int, capacity: int, mesh: dict[str, int] | None = None) -> None:
    """UsageError when the decode cache (keys and values of every layer, `slots` rows of `capacity` + 1 slots)
    and the weights need more bytes per device than a device has free: arithmetic on the config alone
    (`anjax.io.loading.load_config`), before any weight is read. Over a `mesh` {"data": D, "tensor": T} the
    cache splits over D x T devices and the weights over T."""
    import jax
    import jax.numpy as jnp

    from anjax.core.config import kv_bytes, num_params

    data, tensor = (mesh or {}).get("data", 1), (mesh or {}).get("tensor", 1)
    cache = kv_bytes(cfg, slots, capacity + 1) // (data * tensor)
    weights = num_params(cfg) * jnp.dtype(cfg.param_dtype).itemsize // tensor
    free = available_bytes(jax.devices()[0])
    if free is not None and cache + weights > free:
        raise cli.UsageError(
            f"--slots {slots} x --capacity {capacity} needs a {cache / 2**30:.1f} GiB KV cache beside "
            f"{weights / 2**30:.1f} GiB of weights, more than the {free / 2**30:.1f} GiB free: "
            "lower --slots or --capacity"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        raise cli.UsageError(
            "python -m anjax.serve runs in one process (a mesh over its host's devices: --mesh); a multi-process "
            "run would need every process to take the same requests in step: unset JAX_COORDINATOR_ADDRESS"
        )

    from anjax.io.loading import load_config

    check_cache_fits(load_config(args.model, args.dtype), args.slots, args.capacity, args.mesh)
    import uvicorn

    from anjax.inference.engine import Engine, EngineConfig
    from anjax.serve.api import DrainingServer, create_app
    from anjax.serve.metrics import Metrics
    from anjax.serve.scheduler import Scheduler

    engine = Engine.load(args.model, EngineConfig.from_args(args), args.dtype, args.mesh)
    scheduler = Scheduler(engine, args.slots, args.capacity, Metrics(), args.max_queue)
    name = args.model_name or (Path(args.model).name if args.model else "SmolLM2-135M-Instruct")
    server = DrainingServer(
        uvicorn.Config(
            create_app(scheduler, name),
            host=args.host,
            port=args.port,
            http="h11",
            timeout_graceful_shutdown=args.drain_seconds + DRAIN_MARGIN_S,
            log_level="warning",
        ),
        scheduler,
        args.drain_seconds,
    )
    # uvicorn drains on SIGTERM / SIGINT, then re-raises the signal: no-op handlers make that a clean exit 0
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    print(
        f"serving {name} on http://{args.host}:{args.port}/v1 ({args.slots} slots x {args.capacity} "
        f"{engine.cache_kind}-cache slots)",
        file=sys.stderr,
        flush=True,
    )
    server.run()
    return 0
