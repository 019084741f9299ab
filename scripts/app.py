#!/usr/bin/env python
"""The web app: sample with any model, method and sampler of this repository from a browser page.

    python scripts/app.py            # then open http://127.0.0.1:7860/

Binds to 127.0.0.1 (this machine only) unless --listen. The app is ``ldm/app/``; this file is its command line.
"""
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from ldm.app.server import build_parser, main  # noqa: E402,F401  (build_parser: for the docs and tests)

if __name__ == "__main__":
    sys.exit(main())
