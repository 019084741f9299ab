"""Every full-size config builds (on the meta device) with exactly the original state-dict layout."""
import json

import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO_ROOT
from ldm.util import instantiate_from_config

CASES = [
    ("v2-inference.yaml", "sd21_base_state_dict.json"),
    ("v2-inference-v.yaml", "sd21_v_state_dict.json"),
    ("v1-inference.yaml", "sd15_state_dict.json"),
    ("sdxl-base-inference.yaml", "sdxl_base_state_dict.json"),  # sd_xl_base_1.0.safetensors
]


def build_meta(config_name):
    config = OmegaConf.load(REPO_ROOT / "configs" / "stable-diffusion" / config_name)
    with torch.device("meta"):
        return instantiate_from_config(config.model)


@pytest.mark.parametrize("config_name,manifest", CASES)
def test_state_dict_layout_matches_original(ref_dir, config_name, manifest):
    want = json.load(open(ref_dir / manifest))
    model = build_meta(config_name)
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in want if k not in got]
    extra = [k for k in got if k not in want]
    assert not missing and not extra, f"missing {missing[:5]}, unexpected {extra[:5]}"
    assert [k for k in got if got[k] != want[k]] == []
    # same order as the original state_dict (what a checkpoint written by this project looks like)
    assert list(got) == list(want)


def test_v_config_is_v_parameterized():
    assert build_meta("v2-inference-v.yaml").parameterization == "v"
    assert build_meta("v2-inference.yaml").parameterization == "eps"
