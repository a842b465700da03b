"""The quality report of a model (see anjax/cli/quality.py): 8 tasks × 200 documents, full vs anchor
cache with 95% intervals, plus held-out perplexity — markdown, JSON and PNG.

    python benchmarks/quality_report.py --model runs/main-job/hf [--limit 200] [--out-dir benchmarks/results]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from anjax import cli  # noqa: E402
from anjax.cli import quality  # noqa: E402

if __name__ == "__main__":
    cli.run(quality.main)
