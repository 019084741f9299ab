"""Malformed YAML (configs, presets, table specs) is a one-line error naming the file (and the line), with exit code
2, before anything is loaded or written (issue #26, item 8)."""
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import REPO_ROOT, load_script
from ldm.util import ConfigError, load_config_file, load_yaml_preset, read_yaml, read_yaml_mapping

txt2img = load_script("txt2img")
DEMO_CKPT = REPO_ROOT / "checkpoints/demo/shapes32.ckpt"


def _one_line(msg):
    assert "\n" not in str(msg).strip() and "Traceback" not in str(msg), msg
    return str(msg)


# ---------------------------------------------------------------------------------------------------------------
# the one reader
# ---------------------------------------------------------------------------------------------------------------
BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdef", "bcdefg"))


@pytest.mark.parametrize("text,wants", [
    (b"model:\n  target: x\n  params: [1, 2\n", ["line 4", "column 1"]),        # unclosed flow sequence
    (b"model:\n  target: a\n    b: c\n", ["line 3", "mapping values are not allowed"]),
    (b"model:\n  params:\n    a: 1\n    b: 2\n    a: 3\n", ["line 5", "duplicate key 'a'", "first at line 3"]),
    (b"a: 1\nb: 2\na: 1\n", ["line 3", "duplicate key 'a'", "first at line 1"]),  # even with the same value
    (b"model: !!python/object/apply:os.system [id]\n", ["line 1", "!!python/object/apply:os.system", "not allowed"]),
    (b"model: !!python/name:os.system ''\n", ["!!python/name:os.system", "not allowed"]),
    (b"a: &x [1, *x]\n", ["line 1", "recursive alias"]),
    (BOMB.encode(), ["more than", "aliases"]),
    (b"model:\n  target: \xff\xfe\x00binary\n", ["line 2", "byte 0xff at offset 17", "not UTF-8"]),
    (bytes(range(256)), ["not UTF-8"]),
    (b"a: 1\x00\n", ["line 1", "special characters are not allowed"]),
])
def test_broken_yaml_is_one_line_naming_file_and_line(tmp_path, text, wants):
    path = tmp_path / "bad.yaml"
    path.write_bytes(text)
    with pytest.raises(ConfigError) as info:
        read_yaml(path)
    msg = _one_line(info.value)
    assert msg.startswith(f"{path}: ")
    for want in wants:
        assert want in msg, msg


@pytest.mark.parametrize("text,kind", [("- 1\n- 2\n", "a list"), ("just text\n", "a string"), ("3\n", "a number")])
def test_top_level_must_be_a_mapping(tmp_path, text, kind):
    path = tmp_path / "x.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"top level is {kind}.*mapping"):
        read_yaml_mapping(path, "config")
    (tmp_path / "empty.yaml").write_text("# nothing\n")
    assert read_yaml_mapping(tmp_path / "empty.yaml") == {}


def test_the_strict_reader_reads_every_shipped_file_as_before():
    """The same data as OmegaConf.load (configs, presets) and yaml.safe_load (table specs) for every YAML file in
    the repository: floats such as 1e-4, dates as text, merges."""
    files = sorted((REPO_ROOT / "configs").rglob("*.yaml")) + sorted((REPO_ROOT / "tests").rglob("*.yaml"))
    assert len(files) > 40
    for path in files:
        before = yaml.safe_load(path.read_text()) if "tables" in path.parts else \
            OmegaConf.to_container(OmegaConf.load(path))
        assert read_yaml(path) == before, path
    doc = "lr: 1e-4\nb: 1.0e-3\nd: 2024-01-02\nbase: &b {x: 1, y: 2}\nderived:\n  <<: *b\n  y: 3\n"
    data = yaml.load(doc, Loader=type(  # the reader's loader on a string
        "L", (__import__("ldm.util", fromlist=["_StrictYamlLoader"])._StrictYamlLoader,), {}))
    assert data == {"lr": 1e-4, "b": 1e-3, "d": "2024-01-02", "base": {"x": 1, "y": 2}, "derived": {"x": 1, "y": 3}}


# ---------------------------------------------------------------------------------------------------------------
# through the scripts: one `error:` line, exit 2, nothing written
# ---------------------------------------------------------------------------------------------------------------
BAD_FILES = {
    "syntax.yaml": b"model:\n  target: [\n",
    "dup.yaml": b"model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n  target: x\n",
    "tag.yaml": b"model: !!python/object/apply:os.system [id]\n",
    "list.yaml": b"- model\n",
    "binary.yaml": bytes(range(128, 256)),
    "nomodel.yaml": b"height: 64\nwidth: 64\n",
    "modelint.yaml": b"model: 3\n",
}


@pytest.fixture
def bad_files(tmp_path):
    out = {}
    for name, data in BAD_FILES.items():
        (tmp_path / name).write_bytes(data)
        out[name] = tmp_path / name
    return out


def _txt2img_error(capsys, tmp_path, *args):
    out = tmp_path / "out"
    code = txt2img.main(["--ckpt", str(DEMO_CKPT), "--outdir", str(out), "--prompt", "x", *map(str, args)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not out.exists()
    return err


@pytest.mark.parametrize("name,want", [("syntax.yaml", "line 3"), ("dup.yaml", "duplicate key 'target'"),
                                       ("tag.yaml", "!!python/object/apply:os.system"), ("list.yaml", "a list"),
                                       ("binary.yaml", "not UTF-8"), ("nomodel.yaml", "no model: section"),
                                       ("modelint.yaml", "model: is a number")])
def test_txt2img_config(bad_files, tmp_path, capsys, name, want):
    err = _txt2img_error(capsys, tmp_path, "--config", bad_files[name])
    assert f"--config {bad_files[name]}: " in err and want in err


@pytest.mark.parametrize("method,flag", [("scalecrafter", "--scalecrafter_config"), ("freescale", "--freescale_config"),
                                         ("fouriscale", "--fouri_config")])
@pytest.mark.parametrize("name", ["syntax.yaml", "dup.yaml", "tag.yaml", "list.yaml", "binary.yaml"])
def test_txt2img_presets(bad_files, tmp_path, capsys, method, flag, name):
    err = _txt2img_error(capsys, tmp_path, "--config", REPO_ROOT / "configs/demo/shapes32.yaml", "--method", method,
                         flag, bad_files[name])
    assert str(bad_files[name]) in err


@pytest.mark.parametrize("line,key,want", [
    ("base: 0", "base", "a positive integer"), ("height: -64", "height", "a positive integer"),
    ("steps: 2.5", "steps", "a positive integer"), ("eta: 2", "eta", "in [0, 1]"),
    ("stages: [[32], [64, 64]]", "stages", "pairs"), ("restart_step: -1", "restart_step", "integer >= 0"),
    ("fast_mode: 1", "fast_mode", "true or false"), ("height: true", "height", "a positive integer"),
])
def test_preset_values_of_the_wrong_type_or_range(tmp_path, line, key, want):
    from ldm.methods.freescale.presets import PRESET_KEYS, PresetError
    good = (REPO_ROOT / "configs/freescale/demo_64x64.yaml").read_text()
    lines = [ln for ln in good.splitlines() if not ln.startswith(f"{key}:")]
    path = tmp_path / "p.yaml"
    path.write_text("\n".join(lines + [line]) + "\n")
    with pytest.raises(PresetError) as info:
        load_yaml_preset(path, PRESET_KEYS, "FreeScale", "configs/freescale/", PresetError)
    assert _one_line(info.value).startswith(f"{path}: {key}: ") and want in str(info.value)
    assert load_yaml_preset(REPO_ROOT / "configs/freescale/demo_64x64.yaml", PRESET_KEYS, "FreeScale", "x")["base"] == 32


def test_freescale_base_0_through_txt2img(tmp_path, capsys):
    preset = tmp_path / "fs.yaml"
    preset.write_text((REPO_ROOT / "configs/freescale/demo_64x64.yaml").read_text().replace("base: 32", "base: 0"))
    err = _txt2img_error(capsys, tmp_path, "--config", REPO_ROOT / "configs/demo/shapes32.yaml", "--method",
                         "freescale", "--freescale_config", preset)
    assert f"{preset}: base: 0 is not a positive integer" in err


@pytest.mark.parametrize("name,want", [("dup.yaml", "duplicate key"), ("list.yaml", "a list"),
                                       ("tag.yaml", "not allowed"), ("syntax.yaml", "line 3")])
def test_table_spec(bad_files, tmp_path, capsys, name, want):
    out = tmp_path / "tab"
    code = load_script("reproduce_table").main([str(bad_files[name]), "--out", str(out), "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: {bad_files[name]}: ") and want in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_trainer_names_the_file(bad_files, tmp_path):
    import main as train_main
    for name in ("dup.yaml", "tag.yaml", "list.yaml"):
        with pytest.raises(SystemExit) as info:
            train_main.main(["--base", str(bad_files[name]), "-t", "--logdir", str(tmp_path / "logs")])
        assert str(bad_files[name]) in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "logs").exists()


def test_load_config_file_flag_prefix(bad_files):
    with pytest.raises(ConfigError, match=rf"^--sr_config {bad_files['dup.yaml']}: line 3"):
        load_config_file(bad_files["dup.yaml"], flag="--sr_config")
    with pytest.raises(ConfigError, match="no such file"):
        load_config_file(Path(bad_files["dup.yaml"]).with_name("missing.yaml"))
