#!/usr/bin/env python
"""Record the pinned outputs of tests/test_pinned_outputs.py into this folder (only when a change of the outputs
is intended, and say so in the commit).

    python tests/reference/pinned/record.py              # every case (stale <case>.npz files removed first)
    python tests/reference/pinned/record.py -k sdxl      # some cases (any pytest option)
    python tests/reference/pinned/record.py --out DIR    # elsewhere, e.g. to compare two machines

It runs the test file with PINNED_RECORD_DIR set: each case writes <case>.npz instead of comparing. Then update
README.md with the line printed at the end (commit, machine, torch).
"""
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[2]


def describe_machine():
    import numpy
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "ldm", "scripts", "configs"], cwd=REPO_ROOT,
                           capture_output=True, text=True).stdout.strip()
    return (f"commit {commit or '?'}{' (with uncommitted changes in ldm/ scripts/ configs/)' if dirty else ''}; "
            f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} (CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}, 1 thread), numpy {numpy.__version__}, Python "
            f"{platform.python_version()}, {platform.system()} {platform.machine()}")


def main(argv):
    out = HERE
    if "--out" in argv:
        i = argv.index("--out")
        out = Path(argv[i + 1]).resolve()
        argv = argv[:i] + argv[i + 2:]
    out.mkdir(parents=True, exist_ok=True)
    if not any(a.startswith("-k") or "::" in a for a in argv):  # all cases: no file of a renamed case stays
        for stale in out.glob("*.npz"):
            stale.unlink()
    env = dict(os.environ, PINNED_RECORD_DIR=str(out))
    code = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            "tests/test_pinned_outputs.py", *argv], cwd=REPO_ROOT, env=env)
    print(f"\nrecorded into {out}: {describe_machine()}")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
