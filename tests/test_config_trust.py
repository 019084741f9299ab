"""Configs are code: ``instantiate_from_config`` builds only this package's classes (and the few library classes the
shipped configs use) unless the caller trusts the config (``--trust_config`` / ``trust=True``)."""
from collections import OrderedDict
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import REPO_ROOT, load_script
from ldm.checkpoint import load_model_from_config
from ldm.modules.encoders.modules import FrozenOpenCLIPEmbedder
from ldm.util import (ALLOWED_TARGETS, UntrustedConfigError, check_config_targets, instantiate_from_config,
                      trusted_configs)

TINY_SD2 = REPO_ROOT / "configs/tiny/tiny-sd2.yaml"

txt2img = load_script("txt2img")
make_ckpt = load_script("make_random_checkpoint")


class CustomOpenCLIP(FrozenOpenCLIPEmbedder):
    """A user's own encoder class outside the package (same weights layout as the SD 2.x one)."""


CUSTOM_TARGET = f"{__name__}.CustomOpenCLIP"


def test_every_shipped_config_passes_without_trust():
    yamls = sorted((REPO_ROOT / "configs").rglob("*.yaml"))
    assert len(yamls) > 10
    targets = set()
    for path in yamls:
        cfg = OmegaConf.load(path)
        check_config_targets(cfg)  # raises if a shipped config needed --trust_config
        targets |= {line.split("target:", 1)[1].strip() for line in path.read_text().splitlines()
                    if line.strip().startswith("target:")}
    assert {t for t in targets if not t.startswith("ldm.")} <= ALLOWED_TARGETS


def test_foreign_target_is_refused_before_it_is_imported_or_called(tmp_path):
    marker = tmp_path / "pwned"
    cfg = {"target": "os.system", "params": {"command": f"touch {marker}"}}
    with pytest.raises(UntrustedConfigError, match=r"'os\.system'.*--trust_config.*trust=True"):
        instantiate_from_config(cfg)
    assert not marker.exists()
    with pytest.raises(UntrustedConfigError, match="collections.OrderedDict"):
        instantiate_from_config({"target": "collections.OrderedDict", "params": {"a": 1}})
    assert instantiate_from_config({"target": "collections.OrderedDict", "params": {"a": 1}},
                                   trust=True) == OrderedDict(a=1)
    with trusted_configs():
        assert instantiate_from_config({"target": "collections.OrderedDict"}) == OrderedDict()
    with pytest.raises(UntrustedConfigError):  # the context ended
        instantiate_from_config({"target": "collections.OrderedDict"})


def test_package_prefix_cannot_reach_a_library_object():
    # ldm.inference imports pathlib.Path: the name starts with "ldm." but the object is not the package's
    with pytest.raises(UntrustedConfigError, match="ldm.inference.Path.*pathlib"):
        instantiate_from_config({"target": "ldm.inference.Path", "params": {}})
    assert type(instantiate_from_config({"target": "torch.nn.Identity"})).__name__ == "Identity"


def test_nested_configs_honour_trust():
    cfg = {"target": "ldm.models.diffusion.ddpm.DiffusionWrapper",
           "params": {"conditioning_key": None,
                      "diff_model_config": {"target": "torch.nn.Linear",
                                            "params": {"in_features": 2, "out_features": 3}}}}
    with pytest.raises(UntrustedConfigError, match="torch.nn.Linear"):
        instantiate_from_config(cfg)
    with pytest.raises(UntrustedConfigError, match="torch.nn.Linear"):
        check_config_targets(OmegaConf.create({"model": cfg}))
    wrapper = instantiate_from_config(cfg, trust=True)
    assert wrapper.diffusion_model.weight.shape == (3, 2)


@pytest.fixture(scope="module")
def custom(tmp_path_factory):
    d = tmp_path_factory.mktemp("custom")
    cfg = OmegaConf.load(TINY_SD2)
    cfg.model.params.cond_stage_config.target = CUSTOM_TARGET
    config = d / "custom.yaml"
    OmegaConf.save(cfg, config)
    ckpt = make_ckpt.save_checkpoint(make_ckpt.make_random_state_dict(OmegaConf.load(TINY_SD2), seed=3),
                                     d / "tiny.ckpt")
    return config, ckpt


def test_load_model_from_config_trust_flag(custom):
    config, ckpt = custom
    cfg = OmegaConf.load(config)
    with pytest.raises(UntrustedConfigError, match=CUSTOM_TARGET):
        load_model_from_config(cfg, ckpt)
    model = load_model_from_config(cfg, ckpt, trust=True)
    assert type(model.cond_stage_model) is CustomOpenCLIP


def test_txt2img_refuses_foreign_target_unless_trust_config(custom, tmp_path, capsys):
    config, ckpt = custom
    out_dir = tmp_path / "out"
    args = ["--config", config, "--ckpt", ckpt, "--outdir", out_dir, "--steps", "2", "--H", "64", "--W", "64"]
    code = txt2img.main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in err
    assert err.startswith(f"error: --config {config}: ") and CUSTOM_TARGET in err and "--trust_config" in err
    assert "Loaded" not in out and not out_dir.exists()
    assert txt2img.main([str(a) for a in args] + ["--trust_config"]) == 0
    assert (out_dir / "samples" / "00000.png").is_file()


def test_os_system_config_does_not_run(tmp_path, capsys):
    marker = tmp_path / "pwned"
    cfg = OmegaConf.load(TINY_SD2)
    cfg.model.params.first_stage_config = {"target": "os.system", "params": {"command": f"touch {marker}"}}
    config = tmp_path / "evil.yaml"
    OmegaConf.save(cfg, config)
    ckpt = tmp_path / "x.ckpt"
    ckpt.write_bytes(b"PK\x03\x04")  # never read: the config is refused first
    code = txt2img.main(["--config", str(config), "--ckpt", str(ckpt), "--outdir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "'os.system'" in err and "--trust_config" in err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_trainer_refuses_foreign_data_target(tmp_path):
    import main as train_main
    marker = tmp_path / "pwned"
    override = tmp_path / "override.yaml"
    override.write_text(f"data:\n  target: os.system\n  params:\n    command: touch {marker}\n")
    base = [str(REPO_ROOT / "configs/demo/shapes32.yaml"), str(override)]
    with pytest.raises(SystemExit, match=r"os\.system.*--trust_config"):
        train_main.main(["--base", *base, "-t", "--logdir", str(tmp_path / "logs"), "--max_steps", "1"])
    assert not marker.exists() and not (tmp_path / "logs").exists()


def test_scripts_with_a_config_accept_trust_config():
    for name in ("txt2img", "demo"):
        parser = load_script(name).build_parser()
        assert parser.parse_args(["--trust_config"]).trust_config is True
    assert Path(REPO_ROOT / "main.py").read_text().count("--trust_config") >= 1
