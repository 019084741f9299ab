#!/usr/bin/env python
"""Write a random-weight checkpoint in the original layout for a config (tests, benchmarks, smoke runs).

    python scripts/make_random_checkpoint.py --config configs/stable-diffusion/v2-inference.yaml \
        --out checkpoints/random-sd21.ckpt
    python scripts/make_random_checkpoint.py --config configs/tiny/tiny-x4-upscaler.yaml --out x4-tiny.ckpt
"""
import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from ldm.inference import UsageError, seed_arg  # noqa: E402
from ldm.util import checked_config, instantiate_from_config, load_config_file  # noqa: E402


def make_random_state_dict(config, seed=0, std=None, trust=False):
    """Build the model with its default random init (optionally re-drawn with a fixed std).
    ``trust=True`` allows config targets outside this package (see ``ldm.util.instantiate_from_config``)."""
    config = checked_config(config, trust=trust)  # resolved and target-checked, as load_model_from_config does
    torch.manual_seed(seed)
    model = instantiate_from_config(config.model, trust=trust)
    if std is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, std)
    return model.state_dict()


def save_checkpoint(sd, out):
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in sd.items()}, str(out))
    else:
        torch.save({"state_dict": sd, "global_step": 0}, out)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True, help=".ckpt (a dict with state_dict) or .safetensors")
    p.add_argument("--seed", type=seed_arg, default=0)
    p.add_argument("--trust_config", action="store_true",
                   help="allow config targets outside this package (ldm.*); a config is code, like a pickle")
    opt = p.parse_args(argv)
    try:
        config = load_config_file(opt.config, trust=opt.trust_config, flag="--config")
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sd = make_random_state_dict(config, seed=opt.seed, trust=opt.trust_config)
    print(f"wrote {save_checkpoint(sd, opt.out)} ({len(sd)} tensors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
