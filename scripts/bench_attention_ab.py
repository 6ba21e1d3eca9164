#!/usr/bin/env python
"""In-process A/B of the attention path against an older tree's, for when whole-run A/B rounds drown in
the machine's drift (docs/benchmarks.md, sixth round).

    git worktree add --detach /tmp/ab_old af5bc78
    .venv/bin/python scripts/bench_attention_ab.py /tmp/ab_old --steps 44

Builds the library's Trainer once (Multi30k en-de, the d256 recipe, bf16, as `bench_train.py`) and runs
every batch twice: once with this tree's `multihead.attend` / `_SplitKV`, once with the old tree's (its
`attention_softmax` module bound to the old tree's kernels, built under another extension name),
alternating which goes first (`bench_ab.py`'s loop). Prints the mean time per update of each and the
per-update ratios.
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import bench_ab  # noqa: E402

from nmt import cpu_kernels  # noqa: E402
from nmt.errors import run_reporting_errors  # noqa: E402
from nmt.models import multihead  # noqa: E402


def old_attention(tree: Path) -> tuple:
    """(attend, _SplitKV) of the old tree at `tree`, its softmax kernel built from that tree's sources."""
    kernels = cpu_kernels.build("nmt_old_kernels_ab", sorted((tree / "nmt" / "csrc").glob("*.cpp")))
    modules = {}
    for name, replaced in (("attention_softmax", "from nmt import cpu_kernels"),
                           ("multihead", "from nmt.models import attention_softmax")):
        module = types.ModuleType(f"old_{name}")
        sys.modules[module.__name__] = module
        module.cpu_kernels = types.SimpleNamespace(extension=lambda: kernels, usable_on=cpu_kernels.usable_on)
        module.attention_softmax = modules.get("attention_softmax")
        source = (tree / "nmt" / "models" / f"{name}.py").read_text().replace(replaced, "")
        exec(compile(source.replace('@register_attention("multihead", MultiHeadOptions)', ""), name, "exec"),
             module.__dict__)
        modules[name] = module
    return modules["multihead"].attend, modules["multihead"]._SplitKV


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old_tree", type=Path, help="a checkout of the older revision")
    bench_ab.add_common_arguments(parser)
    args = parser.parse_args()
    implementations = {"old": old_attention(args.old_tree.resolve()), "new": (multihead.attend, multihead._SplitKV)}

    def use(name: str):
        def apply() -> None:
            multihead.attend, multihead._SplitKV = implementations[name]
        return apply

    print(bench_ab.report(bench_ab.paired_times({name: use(name) for name in implementations}, args.steps,
                                                args.skip, args.data, args.cache)))


if __name__ == "__main__":
    run_reporting_errors(main)
