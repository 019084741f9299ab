#!/usr/bin/env python
"""FID, KID, patch FID/KID and spatial FID/KID of a folder of generated images against a reference folder.

    python scripts/eval_fid.py --gen outputs/sc_2048 --ref data/laion_2048/reference \
        --metrics fid,kid,pfid,pkid,sfid,skid --crop 299 --crops_per_image 1 --out results/sc_2048.json

Works offline: the FID Inception weights (pytorch-fid's pt_inception-2015-12-05-6726825d.pth) are read
from --inception_weights, $FID_INCEPTION_WEIGHTS or the torch hub cache.  Features are cached per
folder (see --cache_dir), so the reference folder is processed once.  See docs/evaluation.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

# this checkout's package first (as the other scripts do): scripts/ and ldm/ of one checkout belong together, even
# where another checkout is installed with `pip install -e .`
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from ldm.evaluation.evaluate import ALL_METRICS, evaluate_folders, format_table, parse_metrics  # noqa: E402
from ldm.evaluation.inception import WEIGHTS_ENV, InceptionWeightsError  # noqa: E402
from ldm.evaluation.metrics import EvalError  # noqa: E402
from ldm.inference import UsageError, check_output_file, seed_arg  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="FID/KID (clean 299² resize), pFID/pKID (native-resolution crops) and sFID/sKID "
                    "(mixed_6/conv spatial features) of --gen against --ref, with the standard FID "
                    "Inception-v3.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--gen", required=True, help="folder of generated images (png/jpg, searched recursively)")
    p.add_argument("--ref", required=True, help="folder of reference images (real LAION or base-resolution samples)")
    p.add_argument("--metrics", default=",".join(ALL_METRICS),
                   help=f"comma-separated subset of {','.join(ALL_METRICS)} (or 'all')")
    p.add_argument("--crop", type=int, default=299, help="pFID/pKID crop size in pixels, taken at native resolution")
    p.add_argument("--crops_per_image", type=int, default=1, help="random crops per image for pFID/pKID")
    p.add_argument("--seed", type=seed_arg, default=0, help="seed of the crop positions and of the KID subsets")
    p.add_argument("--kid_subsets", type=int, default=100, help="number of KID subsets")
    p.add_argument("--kid_subset_size", type=int, default=1000, help="KID subset size")
    p.add_argument("--inception_weights", default=None,
                   help=f"FID Inception weights file (default: ${WEIGHTS_ENV} or the torch hub cache)")
    p.add_argument("--device", default=None, help="cuda / cuda:1 / cpu (default: cuda if available)")
    p.add_argument("--batch_size", type=int, default=50, help="images per Inception forward")
    p.add_argument("--num_workers", type=int, default=None, help="image decoding workers (default: min(8, CPUs))")
    p.add_argument("--cache_dir", default=None,
                   help="feature cache (default: $SCALECRAFTER_EVAL_CACHE or ~/.cache/scalecrafter_eval)")
    p.add_argument("--no_cache", action="store_true", help="neither read nor write the feature cache")
    p.add_argument("--strict", action="store_true", help="unreadable image files are an error instead of being skipped")
    p.add_argument("--name", default=None, help="row label in the printed table (default: the --gen folder name)")
    p.add_argument("--out", default=None, help="write the full result (values, counts, settings, extractor) as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    caught = []

    def show(message, category, filename, lineno, file=None, line=None):
        caught.append(str(message))
        print(f"warning: {message}", file=sys.stderr)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = show
            if args.out:  # before the features are computed (minutes), not after
                check_output_file(args.out, "--out")
            metrics = parse_metrics(args.metrics)
            result = evaluate_folders(
                args.gen, args.ref, metrics=metrics, inception_weights=args.inception_weights,
                device=args.device, batch_size=args.batch_size, num_workers=args.num_workers,
                crop=args.crop, crops_per_image=args.crops_per_image, seed=args.seed,
                kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size,
                cache_dir=args.cache_dir, use_cache=not args.no_cache, progress=not args.quiet,
                strict=args.strict)
    except (EvalError, InceptionWeightsError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    result["warnings"] = caught
    result["command"] = [os.path.basename(sys.argv[0] or "eval_fid.py")] + list(
        argv if argv is not None else sys.argv[1:])
    if not result["feature_extractor"].get("sha256_matches_standard_name"):
        print("note: the Inception weights' sha256 does not start with 6726825d (the standard file's tag); "
              "values are not comparable with published numbers unless this is the standard network",
              file=sys.stderr)
    print(format_table([result], names=[args.name] if args.name else None))
    if args.out:
        out_dir = os.path.dirname(os.path.abspath(args.out))
        os.makedirs(out_dir, exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
