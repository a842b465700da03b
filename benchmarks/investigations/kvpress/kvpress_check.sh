#!/usr/bin/env bash
# Cross-check anjax's window/snapkv policies against kvpress (benchmarks/investigations/kvpress/kvpress_check.py has the details).
#   bash benchmarks/investigations/kvpress/kvpress_check.sh [--tasks boolq,hellaswag] [--limit 20] [--budget 0.5] [--dir runs/kvpress_check]
# kvpress 0.5.5 pins transformers < 5.3, so it gets its own environment, .venv-kvpress (git-ignored):
# its own kvpress, transformers 5.2 and their hub/tokenizer pins, and everything else (torch CPU,
# numpy, safetensors, ...) read from anjax's .venv through a .pth placed after its own site-packages
# (PyPI's Linux torch wheels pull in CUDA; the CPU wheel index is not reachable here). Nothing is
# installed into anjax's .venv.
set -euo pipefail
cd "$(dirname "$0")/../../.."
VENV=.venv-kvpress
if [ ! -f "$VENV/.built" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --no-deps kvpress==0.5.5 transformers==5.2.0 tokenizers==0.22.2 \
    huggingface_hub==1.33.0 httpx==0.28.1 httpcore==1.0.9 cachetools==5.5.2 fire==0.6.0 termcolor==3.3.0
  site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  .venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > "$site/zz_shared_anjax_venv.pth"
  "$VENV/bin/python" -c "import kvpress, transformers; assert transformers.__version__ == '5.2.0'"
  touch "$VENV/.built"
fi
nice -n 5 .venv/bin/python -m benchmarks.investigations.kvpress.kvpress_check anjax "$@"
nice -n 5 "$VENV/bin/python" -m benchmarks.investigations.kvpress.kvpress_check kvpress "$@"
.venv/bin/python -m benchmarks.investigations.kvpress.kvpress_check compare "$@"
