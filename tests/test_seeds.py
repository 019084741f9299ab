"""Seeds are 0 ... 2**63 - 1 (0 ... 2**32 - 1 where numpy's legacy RandomState or lightning takes the seed): a seed
outside is refused with a message naming the flag and the range, exit code 2, before a model is loaded (issue #26,
item 8)."""
import argparse

import pytest
import yaml

from conftest import REPO_ROOT, load_script
from ldm.inference import SEED_MAX, UsageError, check_seed, seed_everything

txt2img = load_script("txt2img")
DEMO_CKPT = REPO_ROOT / "checkpoints/demo/shapes32.ckpt"


def _parse_error(parser, argv, capsys):
    with pytest.raises(SystemExit) as info:
        parser.parse_args(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2
    return err


@pytest.mark.parametrize("value", [str(2 ** 63), str(2 ** 64), "-1", str(-2 ** 63), "1e3", "seven"])
def test_txt2img_seed_range(capsys, value):
    parser = txt2img.build_parser()
    err = _parse_error(parser, ["--seed", value], capsys)
    assert "--seed" in err and "0 ... 2**63 - 1" in err
    assert parser.parse_args(["--seed", str(2 ** 63 - 1)]).seed == 2 ** 63 - 1
    assert parser.parse_args(["--seed", "0"]).seed == 0


def test_txt2img_refuses_before_loading(tmp_path, capsys, monkeypatch):
    from ldm.pipelines import txt2img as pipeline
    monkeypatch.setattr(pipeline, "load_model_from_config", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(SystemExit) as info:
        txt2img.main(["--config", str(REPO_ROOT / "configs/demo/shapes32.yaml"), "--ckpt", str(DEMO_CKPT),
                      "--outdir", str(tmp_path / "out"), "--seed", str(2 ** 63)])
    assert info.value.code == 2 and "--seed" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_every_seed_flag_has_its_range(capsys):
    upscale = load_script("upscale")
    err = _parse_error(upscale.build_parser(), ["--image", "x.png", "--seed", str(2 ** 32)], capsys)
    assert "--seed" in err and "0 ... 2**32 - 1" in err  # the SR path seeds numpy's RandomState with it
    assert upscale.build_parser().parse_args(["--image", "x.png", "--seed", str(2 ** 32 - 1)]).seed == 2 ** 32 - 1
    err = _parse_error(upscale.build_img2img_parser(), ["--image", "x.png", "--method", "scalecrafter", "--seed",
                                                        str(2 ** 63)], capsys)
    assert "2**63 - 1" in err
    import main as train_main
    with pytest.raises(SystemExit) as info:
        train_main.parse_args(["--base", "x.yaml", "--seed", str(2 ** 32)])
    assert info.value.code == 2 and "0 ... 2**32 - 1" in capsys.readouterr().err  # lightning seeds numpy
    for name, argv in (("demo", []), ("eval_repetition", []), ("make_random_checkpoint", ["--config", "c", "--out", "o"]),
                       ("eval_fid", ["--gen", "g", "--ref", "r"]),
                       ("prepare_eval_set", ["--metadata", "m", "--outdir", "o"])):
        mod = load_script(name)
        parser = mod.build_parser() if hasattr(mod, "build_parser") else None
        if parser is None:
            with pytest.raises(SystemExit) as info:
                mod.main(argv + ["--seed", "-1"])
            assert info.value.code == 2 and "--seed" in capsys.readouterr().err, name
        else:
            assert "--seed" in _parse_error(parser, argv + ["--seed", "-1"], capsys), name
    rt = load_script("reproduce_table")
    assert "--metric_seed" in _parse_error(rt.build_parser(), ["spec.yaml", "--metric_seed", "-5"], capsys)


def test_seed_checks_in_the_python_api():
    with pytest.raises(UsageError, match=r"--seed 9223372036854775808 is outside .* 0 \.\.\. 2\*\*63 - 1"):
        seed_everything(2 ** 63)
    with pytest.raises(UsageError, match="-1 is outside"):
        seed_everything(-1)
    seed_everything(SEED_MAX)
    assert check_seed(SEED_MAX - 3, count=4) == SEED_MAX - 3
    with pytest.raises(UsageError, match="with the 4 seeds after it: up to 9223372036854775808"):
        check_seed(SEED_MAX - 3, count=5)
    with pytest.raises(UsageError, match="an integer"):
        check_seed(True)


def test_demo_checks_every_seed_it_will_use_before_loading(monkeypatch, tmp_path, capsys):
    demo = load_script("demo")
    monkeypatch.setattr(demo, "load_demo_model", lambda *a, **k: pytest.fail("model loaded"))
    code = demo.main(["--seed", str(SEED_MAX), "--n", "2", "--out", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert code == 2 and "--seed" in err and "seeds after it" in err and not (tmp_path / "d").exists()


@pytest.mark.parametrize("seed", [-1, 2 ** 63])
def test_table_spec_seed_range(tmp_path, capsys, seed):
    spec = yaml.safe_load((REPO_ROOT / "configs/tables/demo.yaml").read_text())
    spec["seed"] = seed
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    code = load_script("reproduce_table").main([str(path), "--out", str(tmp_path / "o"), "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and f"{path}: seed: {seed} is outside the allowed range 0 ... 2**63 - 1" in err, err


def test_seed_arg_is_an_argparse_type():
    from ldm.inference import numpy_seed_arg, seed_arg
    assert seed_arg("12") == 12
    with pytest.raises(argparse.ArgumentTypeError, match="outside"):
        seed_arg(str(2 ** 63))
    with pytest.raises(argparse.ArgumentTypeError, match=r"2\*\*32 - 1"):
        numpy_seed_arg(str(2 ** 32))
