#!/usr/bin/env python3
"""Solve, print and save the ScaleCrafter dispersion matrix R (small -> large kernel).

Example (the authors' released parameters, 3x3 -> 5x5, 3x3 features, scale 2, eta 0.05):

    python scripts/solve_dispersion.py --out R_3to5.npy

By default the pixel-level rows are weighted by eta as in the authors' MATLAB solver
(objective ||struct||^2 + eta^2 ||pixel||^2), which reproduces their shipped
transforms/R20to1_new.mat; ``--objective paper`` minimises the paper's
||struct||^2 + eta ||pixel||^2 instead (the same as the release with sqrt(eta)).

The output format follows the suffix: ``.npy`` (numpy), ``.txt`` (plain text,
``np.savetxt``) or ``.mat`` (MATLAB, variable ``R``).
"""
import argparse
import os
import sys

try:
    import ldm  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from ldm.unet_hooks.dispersion import (
    DEFAULTS,
    OBJECTIVES,
    calibration_residuals,
    dispersion_objective,
    get_dispersion_transform,
    solve_dispersion,
)


SUFFIXES = (".npy", ".txt", ".mat")


def _odd(text):
    value = int(text)
    if value < 1 or value % 2 == 0:
        raise argparse.ArgumentTypeError(f"must be a positive odd integer (a kernel with a centre), got {text}")
    return value


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _non_negative_float(text):
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--small", type=_odd, default=DEFAULTS["small"], help="pretrained kernel size r (odd)")
    p.add_argument("--large", type=_odd, default=DEFAULTS["large"], help="dispersed kernel size r' (odd, >= r)")
    p.add_argument("--feature_size", type=_positive_int, default=DEFAULTS["feature_size"],
                   help="calibration feature map size n")
    p.add_argument("--scale", type=_positive_float, default=DEFAULTS["scale"],
                   help="upsampling scale s (map n -> s(n-1)+1)")
    p.add_argument("--eta", type=_non_negative_float, default=DEFAULTS["eta"],
                   help="weight of the pixel-level calibration")
    p.add_argument("--objective", choices=OBJECTIVES, default=DEFAULTS["objective"],
                   help="release: pixel rows weighted by eta (||struct||^2 + eta^2 ||pixel||^2), as the authors' "
                        "solver; gives their shipped R20to1_new.mat. paper: ||struct||^2 + eta ||pixel||^2 as the "
                        "paper's equation writes it")
    p.add_argument("--out", type=str, default=None, help="output file (.npy, .txt or .mat)")
    p.add_argument("--cache_dir", type=str, default=None,
                   help="read/write the on-disk cache here (default: no cache, always solve)")
    p.add_argument("--precision", type=_positive_int, default=4, help="printed decimals")
    args = p.parse_args(argv)
    if args.large < args.small:
        p.error(f"argument --large: must be >= --small ({args.small}), got {args.large}")
    if args.out and os.path.splitext(args.out)[1].lower() not in SUFFIXES:
        p.error(f"argument --out: unsupported suffix {os.path.splitext(args.out)[1]!r}; use one of {SUFFIXES}")
    return args


def save(path, R):
    ext = os.path.splitext(path)[1].lower()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if ext == ".npy":
        np.save(path, R)
    elif ext == ".txt":
        np.savetxt(path, R, fmt="%.17g")
    elif ext == ".mat":
        from scipy.io import savemat

        savemat(path, {"R": R})
    else:  # parse_args refuses other suffixes
        raise ValueError(f"unsupported output suffix {ext!r}; use one of {SUFFIXES}")


def main(argv=None):
    args = parse_args(argv)
    params = dict(small=args.small, large=args.large, feature_size=args.feature_size,
                  scale=args.scale, eta=args.eta, objective=args.objective)
    if args.cache_dir is not None:
        R = get_dispersion_transform(**params, cache_dir=args.cache_dir)
    else:
        R = solve_dispersion(**params)

    np.set_printoptions(precision=args.precision, suppress=True, linewidth=160)
    print("parameters:", ", ".join(f"{k}={v}" for k, v in params.items()))
    print(f"R ({R.shape[0]} x {R.shape[1]}), k' = (R @ k.ravel()).reshape({args.large}, {args.large}):")
    print(R)
    print(f"response to the all-ones {args.small}x{args.small} kernel:")
    print((R @ np.ones(args.small ** 2)).reshape(args.large, args.large))
    res = calibration_residuals(R, args.small, args.large, args.feature_size, args.scale)
    print(f"structure-level residual ||interp(f_k(h)) - f_k'(interp(h))||^2 = {res['struct']:.6g} "
          f"(relative {res['struct_rel']:.4f})")
    print(f"pixel-level residual     ||f_k(h) - f_k'(h)||^2                  = {res['pixel']:.6g} "
          f"(relative {res['pixel_rel']:.4f})")
    weight = "eta^2" if args.objective == "release" else "eta"
    print(f"objective (struct + {weight} * pixel) = "
          f"{dispersion_objective(R, **params):.6g}  [summed over unit inputs and the {args.small ** 2} basis kernels]")
    if args.out:
        save(args.out, R)
        print(f"saved to {args.out}")
    return R


if __name__ == "__main__":
    main()
