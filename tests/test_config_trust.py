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


# ---------------------------------------------------------------------------------------------------------------
# Bypasses of the check (issue #26, item 1): the check sees the config as it will be built (interpolations
# resolved), refuses functions and non-model classes even inside ldm.*, and nothing a config names switches trust on.
# ---------------------------------------------------------------------------------------------------------------
SHAPES = REPO_ROOT / "configs/demo/shapes32.yaml"
DEMO_CKPT = REPO_ROOT / "checkpoints/demo/shapes32.ckpt"
TINY_X4 = REPO_ROOT / "configs/tiny/tiny-x4-upscaler.yaml"


def _payload(marker):
    return {"target": "os.system", "params": {"command": f"id > {marker}"}}


def _evil_copy(src, dest, marker, where=("model", "params", "first_stage_config")):
    """``src`` with the issue's repro: a top-level ``payload`` (os.system) and, at ``where``, a target that is the
    package's own ``instantiate_from_config``, handed ``${payload}`` and ``trust: true``."""
    cfg = OmegaConf.merge({"payload": _payload(marker)}, OmegaConf.load(src))  # at the top, as in the issue
    node = cfg
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = {"target": "ldm.util.instantiate_from_config",
                       "params": {"config": "${payload}", "trust": True}}
    OmegaConf.save(cfg, dest)  # the interpolation is written as the string ${payload}
    assert "${payload}" in dest.read_text()
    return dest


def _assert_refused(code, err, marker, *not_written):
    assert code == 2, err
    assert "Traceback" not in err and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert "'os.system'" in err and "--trust_config" in err
    assert not marker.exists()
    for path in not_written:
        assert not path.exists(), path


def test_issue_repro_txt2img(tmp_path, capsys):
    marker = tmp_path / "marker.txt"
    config = _evil_copy(SHAPES, tmp_path / "evil.yaml", marker)
    out = tmp_path / "out"
    code = txt2img.main(["--config", str(config), "--ckpt", str(DEMO_CKPT), "--outdir", str(out), "--steps", "2",
                         "--H", "32", "--W", "32", "--prompt", "a red circle"])
    _assert_refused(code, capsys.readouterr().err, marker, out)


def test_issue_repro_demo_and_make_random_checkpoint(tmp_path, capsys):
    marker = tmp_path / "marker.txt"
    config = _evil_copy(SHAPES, tmp_path / "evil.yaml", marker)
    demo = load_script("demo")
    out = tmp_path / "demo"
    code = demo.main(["--config", str(config), "--ckpt", str(DEMO_CKPT), "--out", str(out), "--n", "1"])
    _assert_refused(code, capsys.readouterr().err, marker, out)
    ckpt = tmp_path / "x.ckpt"
    code = make_ckpt.main(["--config", str(config), "--out", str(ckpt)])
    _assert_refused(code, capsys.readouterr().err, marker, ckpt)
    # the Python API: the same check (the issue's payload is reached through the top level too)
    with pytest.raises(UntrustedConfigError, match="os.system"):
        make_ckpt.make_random_state_dict(OmegaConf.load(config))
    with pytest.raises(UntrustedConfigError, match="os.system"):
        load_model_from_config(OmegaConf.load(config), DEMO_CKPT)
    assert not marker.exists()


def test_issue_repro_upscale(tmp_path, capsys):
    import zipfile
    marker = tmp_path / "marker.txt"
    config = _evil_copy(TINY_X4, tmp_path / "evil-x4.yaml", marker)
    ckpt = tmp_path / "x4.ckpt"
    with zipfile.ZipFile(ckpt, "w") as z:  # looks like a checkpoint; never read: the config is refused first
        z.writestr("archive/data.pkl", b"")
    from PIL import Image
    Image.new("RGB", (16, 16)).save(tmp_path / "in.png")
    out = tmp_path / "out"
    code = load_script("upscale").main(["--image", str(tmp_path / "in.png"), "--config", str(config), "--ckpt",
                                        str(ckpt), "--outdir", str(out)])
    _assert_refused(code, capsys.readouterr().err, marker, out)


def test_issue_repro_table_runner(tmp_path, capsys):
    import yaml
    marker = tmp_path / "marker.txt"
    config = _evil_copy(SHAPES, tmp_path / "evil.yaml", marker)
    spec = {"name": "evil", "models": {"demo": {"config": str(config), "ckpt": str(DEMO_CKPT)}},
            "prompts": {"builtin": "shapes"}, "images": 2, "seed": 5,
            "sampler": {"steps": 2, "eta": 1.0, "scale": 3.0, "batch_size": 2, "precision": "full"},
            "columns": [{"id": "fid_b", "metric": "fid", "reference": "base"}],
            "rows": [{"id": "direct", "method": "direct", "size": [64, 64]}]}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    code = load_script("reproduce_table").main([str(path), "--out", str(out), "--threads", "1"])
    _assert_refused(code, capsys.readouterr().err, marker, out)


def _check(cfg):
    check_config_targets(OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg)


@pytest.mark.parametrize("target,why", [
    ("ldm.util.instantiate_from_config", "a function"),
    ("ldm.util.get_obj_from_str", "a function"),
    ("ldm.util.trusted_configs", "a function"),
    ("ldm.checkpoint.load_model_from_config", "a function"),
    ("ldm.util.no_weight_init", "no model"),          # a class of the package, but no model, dataset or schedule
    ("ldm.inference.Path", "pathlib"),                # a library object imported into a package module
    ("ldm.util.importlib", "outside the package"),    # a module
    ("ldm.no_such_module.Thing", "cannot be found"),
])
def test_only_model_classes_of_the_package_pass(target, why):
    with pytest.raises(UntrustedConfigError, match=why):
        _check({"model": {"target": target}})
    with pytest.raises(UntrustedConfigError):  # also when built directly (Python API, no check before)
        instantiate_from_config({"target": target})


def test_interpolations_are_resolved_before_the_check(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    # a reference to another part of the file
    with pytest.raises(UntrustedConfigError, match=r"'os\.system'.*at config\.model\.params\.x\.target"):
        _check({"model": {"target": "ldm.models.autoencoder.IdentityFirstStage",
                          "params": {"x": "${hidden}"}}, "hidden": _payload(marker)})
    # a target assembled from pieces, or read from the environment
    with pytest.raises(UntrustedConfigError, match=r"'os\.system'"):
        _check({"a": "os", "model": {"target": "${a}.system"}})
    monkeypatch.setenv("LDM_TEST_TARGET", "os.system")
    with pytest.raises(UntrustedConfigError, match=r"'os\.system'"):
        _check({"model": {"target": "${oc.env:LDM_TEST_TARGET}"}})
    # a resolver registered by some code the config names: its result is what gets checked
    import warnings
    with warnings.catch_warnings():  # some OmegaConf versions deprecate the name
        warnings.simplefilter("ignore")
        OmegaConf.register_new_resolver("ldm_test_target", lambda: "os.system", replace=True)
    try:
        with pytest.raises(UntrustedConfigError, match=r"'os\.system'"):
            _check({"model": {"target": "${ldm_test_target:}"}})
    finally:
        OmegaConf.clear_resolver("ldm_test_target")
    # an escaped interpolation survives resolution as text and would be resolved again when built: refused
    with pytest.raises(UntrustedConfigError, match="still holds an interpolation"):
        _check(OmegaConf.create({"p": 1, "model": {"params": {"c": "\\${p}"}}}))
    assert not marker.exists()


@pytest.mark.parametrize("cfg,match", [
    ({"model": {"_target_": "os.system"}}, r"os\.system.*_target_"),            # Hydra's key
    ({"model": {"class_path": "os.system"}}, r"os\.system.*class_path"),       # Lightning CLI's key
    ({"model": {"params": {"layers": [{"a": 1}, [{"target": "os.system"}]]}}}, r"layers\[1\]\[0\]\.target"),
    ({"model": {"target": ["os", "system"]}}, "not a dotted name"),
    ({"model": {"target": "ldm.models.autoencoder.IdentityFirstStage", "params": {"trust": True}}},
     "cannot switch trust on"),
    ({"trust": True, "model": {"target": "ldm.models.autoencoder.IdentityFirstStage"}}, "cannot switch trust on"),
])
def test_other_spellings_of_a_target_and_trust(cfg, match):
    with pytest.raises(UntrustedConfigError, match=match):
        _check(cfg)
    check_config_targets(OmegaConf.create(cfg), trust=True)  # the caller's trust still covers all of them


def test_a_trust_param_does_not_reach_a_constructor():
    with pytest.raises(UntrustedConfigError, match="cannot switch trust on"):
        instantiate_from_config({"target": "ldm.models.autoencoder.IdentityFirstStage", "params": {"trust": True}})


def test_checked_config_is_what_gets_built(tmp_path):
    """Interpolations that name allowed targets still work: the model is built from the resolved copy."""
    from ldm.util import checked_config, load_config_file
    cfg = OmegaConf.load(SHAPES)
    cfg.first_stage = "ldm.models.autoencoder.IdentityFirstStage"
    cfg.model.params.first_stage_config.target = "${first_stage}"
    path = tmp_path / "interp.yaml"
    OmegaConf.save(cfg, path)
    loaded = load_config_file(path)
    assert loaded.model.params.first_stage_config.target == "ldm.models.autoencoder.IdentityFirstStage"
    assert "${" not in OmegaConf.to_yaml(loaded)
    model = load_model_from_config(OmegaConf.load(path), DEMO_CKPT)
    assert type(model.first_stage_model).__name__ == "IdentityFirstStage"
    assert checked_config({"a": 1, "b": "${a}"}).b == 1
