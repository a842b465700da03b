#!/usr/bin/env bash
# One-time restructuring of issue 14 (docs/ARCH_PLAN.md): move anjax's flat modules into the
# layered packages core -> text -> io -> {inference, train} -> eval -> cli, rewrite every import
# and module reference, add the packages' __init__.py and thin shims at the old command names.
#
#     bash scripts/restructure.sh          # from the repository root, on a clean work tree
#     EXTRA_MOVES="encoder:text.encode serve:cli.serve" EXTRA_COMMANDS="serve" bash scripts/restructure.sh
#
# EXTRA_MOVES adds old:new pairs for modules created after this script was written; EXTRA_COMMANDS
# names `python -m anjax.<name>` commands to keep as typed (write their shims by hand, like evaluate's).
#
# Only whole modules move (git mv, history kept); splitting modules (train.py's library part,
# the encoder out of data.py, checkpoint into run files + orbax, the mains into anjax/cli/) is
# the follow-up listed in docs/ARCH_PLAN.md. Modules this script does not know (added after it
# was written) stay where they are and are listed at the end: place them by hand.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
if [ -e anjax/core ]; then echo "error: anjax/core exists: already restructured" >&2; exit 2; fi
if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
    echo "error: commit or stash your changes first (the moves are a commit of their own)" >&2; exit 2
fi

# old module -> new dotted path (relative to anjax)
MOVES="
config:core.config  mask:core.mask  cache:core.cache  model:core.model  sharding:core.sharding
anchors:text.anchors
hf:io.hf  gguf_import:io.gguf_import  loading:io.loading  checkpoint:io.checkpoint
generate:inference.engine  scoring:inference.scoring
data:train.data  run_config:train.run_config  trainer:train.trainer  metrics:train.metrics
tasks:eval.tasks  evaluate:eval.evaluate  perplexity:eval.perplexity  lm_eval_adapter:eval.lm_eval_adapter
export:cli.export
${EXTRA_MOVES:-}"
declare -A DOC=(
  [core]="The model and its invariants: config, mask predicate, KV cache, Llama, sharding rules (jax/flax/numpy only)."
  [text]="Text to ids: anchor ids and the one encoder shared by training, inference and evaluation (no jax, no datasets)."
  [io]="Models in and out: Hugging Face directories, GGUF, run directories and checkpoints, model-argument loading."
  [inference]="The inference runtime: jitted prefill/decode steps, the generation engine, the scorer (no optax/orbax/datasets)."
  [train]="Training: data pipeline, run config, train step, metrics, the training loop."
  [eval]="Evaluation: benchmark tasks, accuracy/C-reduction/T-speed-up tables, perplexity, the lm-eval adapter."
  [cli]="Command-line entry points; \`run\` gives every command one error format (one line, exit 2)."
)

moved=()
for pair in $MOVES; do
    old=${pair%%:*}; new=${pair#*:}
    src=anjax/$old.py; dst=anjax/${new//.//}.py
    if [ ! -f "$src" ]; then echo "warning: $src is gone; skipped (check docs/ARCH_PLAN.md)" >&2; continue; fi
    mkdir -p "$(dirname "$dst")"
    git mv "$src" "$dst"
    moved+=("$old:$new")
done
git mv anjax/cli.py anjax/cli/__init__.py   # the CLI helper (run, UsageError) is the cli package itself
for pkg in core text io inference train eval; do
    printf '"""%s"""\n' "${DOC[$pkg]}" > anjax/$pkg/__init__.py
    git add anjax/$pkg/__init__.py
done

# Rewrite imports and references in every tracked text file (shims are written afterwards).
MOVED="${moved[*]}" python3 - <<'PY'
import os, re, subprocess
moves = dict(p.split(":") for p in os.environ["MOVED"].split())
shims = {"evaluate", "export", "anchors", "lm_eval_adapter", *os.environ.get("EXTRA_COMMANDS", "").split()}
files = subprocess.run(["git", "ls-files", "*.py", "*.md", "*.sh", "*.yaml", "*.txt", ".ci/*"],
                       capture_output=True, text=True, check=True).stdout.split()
skip = {"scripts/restructure.sh", "docs/ARCH_PLAN.md"}
names = "|".join(sorted(moves, key=len, reverse=True))
dotted = re.compile(rf"\banjax\.({names})\b(?!\.py)")
path = re.compile(rf"\banjax/({names})\.py\b")
from_pkg = re.compile(r"^([ \t]*)from anjax import ([\w ,]+?)[ \t]*$", re.M)


def regroup(m):
    """`from anjax import a, b as c` -> one import line per new package."""
    indent, groups, out = m.group(1), {}, []
    for item in (s.strip() for s in m.group(2).split(",")):
        name, _, alias = item.partition(" as ")
        alias = alias.strip() or name
        if name in moves:
            pkg, _, mod = moves[name].rpartition(".")
            groups.setdefault(f"anjax.{pkg}", []).append(mod if mod == alias else f"{mod} as {alias}")
        else:
            groups.setdefault("anjax", []).append(item)
    for pkg, items in sorted(groups.items()):
        out.append(f"{indent}from {pkg} import {', '.join(items)}")
    return "\n".join(out)


def dotted_ref(m):
    name, before = m.group(1), m.string[max(0, m.start() - 8):m.start()]
    if name in shims and re.search(r"""-m(\s+|["'],\s*["'])$""", before):
        return m.group(0)          # a command users type: the shim keeps it working
    return f"anjax.{moves[name]}"


for f in files:
    if f in skip or not os.path.isfile(f):
        continue
    text = open(f, encoding="utf-8").read()
    new = text
    if f.endswith(".py"):
        new = from_pkg.sub(regroup, new)
    new = dotted.sub(dotted_ref, new)
    new = path.sub(lambda m: f"anjax/{moves[m.group(1)].replace('.', '/')}.py", new)
    new = new.replace("anjax/cli.py", "anjax/cli/__init__.py")
    if f == "anjax/eval/tasks.py":   # the repository root is one level further up now
        new = new.replace('Path(__file__).resolve().parent.parent / "data"', 'Path(__file__).resolve().parents[2] / "data"')
    if new != text:
        open(f, "w", encoding="utf-8").write(new)
        print(f"rewrote {f}")
PY
git add -u
if [ -x .venv/bin/ruff ]; then   # regrouped imports back into isort order (import blocks only)
    .venv/bin/ruff check -q --select I001 --fix $(git diff --cached --name-only --diff-filter=AMR -- '*.py') || true
    git add -u
fi
git commit -q -m "Restructure anjax into core/text/io/inference/train/eval/cli (scripts/restructure.sh, docs/ARCH_PLAN.md)"

# Thin shims: the commands users type keep working; nothing inside anjax imports them.
shim() {  # name, new module, how its __main__ runs, extra import
    cat > anjax/$1.py <<PYEOF
"""\`python -m anjax.$1\`, the command's established name: a shim for \`$2\`."""

$4
if __name__ == "__main__":
    $3
PYEOF
    git add anjax/$1.py
}
shim evaluate anjax.eval.evaluate "cli.run(main)" "from anjax import cli
from anjax.eval.evaluate import main
"
shim export anjax.cli.export "cli.run(main)" "from anjax import cli
from anjax.cli.export import main
"
shim anchors anjax.text.anchors "sys.exit(main())" "import sys

from anjax.text.anchors import main
"
shim lm_eval_adapter anjax.eval.lm_eval_adapter "main()" "from anjax.eval.lm_eval_adapter import AnjaxLM, main  # noqa: F401 (importing registers lm-eval's \"anjax\" model)
"
cat > anjax/__init__.py <<'PYEOF'
"""anjax: Anchor-based LLMs in JAX/Flax.

Packages, imports flowing one way (docs/DESIGN.md, "Package map"; tests/test_imports.py):
core -> text -> io -> {inference, train} -> eval -> cli. The modules at this level are only
the shims behind `python -m anjax.<command>`.
"""
PYEOF
git add -A anjax
git commit -q -m "Shims at the old command names: python -m anjax.{evaluate,export,anchors,lm_eval_adapter}"
unknown=$(ls anjax/*.py | grep -v -E "anjax/(__init__|evaluate|export|anchors|lm_eval_adapter)\.py" || true)
if [ -n "$unknown" ]; then
    echo "place by hand (see docs/ARCH_PLAN.md, 'New modules'):"; echo "$unknown"
fi
echo "done: two commits (moves, shims); next: docs/ARCH_PLAN.md follow-up steps"
