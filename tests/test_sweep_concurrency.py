"""Two sweep jobs started together on one --outdir (ldm/pipelines/sweep.py, docs/cluster.md section 3).

Each round forks two processes that meet at a barrier and then run ``ldm.pipelines.sweep.run_sweep`` on the same
folder with a fake renderer (no model: a few milliseconds per batch, and a pause while each temporary
PNG exists, so that the other job's start-up clean-up has something to find). Same settings: the jobs
share the work, every batch is rendered exactly once in total and the folder ends complete and valid.
Different settings: exactly one job runs, the other is refused with the folder and the difference in the
message, and every file belongs to the winner's settings. In no round does a job fail for any other
reason (e.g. a temporary file deleted under it)."""
import collections
import json
import multiprocessing
import os
import random
import time
import traceback

import numpy as np
import pytest
from PIL import Image

from ldm.pipelines import sweep
from ldm.inference import UsageError

PROMPTS = [f"prompt {i}" for i in range(6)]
PER_PROMPT, BATCH, SEED, SIDE = 2, 2, 7, 8  # 12 images in 6 batches of 2
EXPECTED = sorted(sweep.image_name(p, k) for p in range(len(PROMPTS)) for k in range(PER_PROMPT))
N_BATCHES = len(PROMPTS) * PER_PROMPT // BATCH
ROUNDS_SAME, ROUNDS_RESUME, ROUNDS_DIFFERENT = 10, 4, 8

try:
    FORK = multiprocessing.get_context("fork")
except ValueError:  # pragma: no cover - not on Linux
    FORK = None
pytestmark = pytest.mark.skipif(FORK is None, reason="needs the fork start method")


def pixels(item, settings):
    return np.full((SIDE, SIDE, 3), (item.seed % 200, settings["steps"], item.index), np.uint8)


class SlowSave:
    """A PIL image whose ``save`` (inside save_png, between creating and renaming the temporary file)
    waits a little: the temporary file stays on disk meanwhile."""

    def __init__(self, image, pause):
        self.image, self.pause = image, pause

    def save(self, fh, **kwargs):
        self.image.save(fh, **kwargs)
        time.sleep(self.pause)


class LoggingRender:
    """The fake model: records each rendered batch (its first index) in a file, one line per batch."""

    def __init__(self, settings, log_path, pause):
        self.settings, self.log_path, self.pause = settings, log_path, pause

    def __call__(self, items):
        with open(self.log_path, "a") as fh:
            fh.write(f"{items[0].index // BATCH}\n")
        time.sleep(self.pause)
        return [SlowSave(Image.fromarray(pixels(it, self.settings)), self.pause) for it in items]


def _job(outdir, settings, barrier, result_path, log_path, start_delay, pause):
    sweep.POLL_SECONDS = 0.01
    try:
        barrier.wait(timeout=60)
        time.sleep(start_delay)
        res = sweep.run_sweep(LoggingRender(settings, log_path, pause), PROMPTS, PER_PROMPT, BATCH, SEED, outdir,
                              settings, progress=False, image_size=(SIDE, SIDE))
        result = {"status": "ok", **res}
    except UsageError as err:
        result = {"status": "refused", "message": str(err)}
    except BaseException:  # anything else is a failure of the test
        result = {"status": "error", "message": traceback.format_exc()}
    with open(result_path, "w") as fh:
        json.dump(result, fh)


def run_two(outdir, settings_a, settings_b, rng):
    """Start two jobs together; returns [(result, rendered batches)] for job a and job b."""
    barrier = FORK.Barrier(2)
    delays = [0.0, rng.choice([0.0, 0.0, rng.uniform(0, 0.03), rng.uniform(0, 0.1)])]
    rng.shuffle(delays)
    procs, paths = [], []
    for name, settings, delay in (("a", settings_a, delays[0]), ("b", settings_b, delays[1])):
        paths.append((outdir.parent / f"{outdir.name}-{name}.json", outdir.parent / f"{outdir.name}-{name}.log"))
        procs.append(FORK.Process(target=_job, args=(outdir, settings, barrier, *map(str, paths[-1]), delay,
                                                     rng.choice([0.002, 0.005, 0.01]))))
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0], "a job hung or died"
    out = []
    for result_path, log_path in paths:
        result = json.loads(result_path.read_text())
        assert result["status"] != "error", result["message"]
        rendered = [int(x) for x in log_path.read_text().split()] if log_path.exists() else []
        out.append((result, rendered))
    return out


def check_folder(outdir, settings):
    """Complete, valid, of ``settings`` only, with a matching manifest and nothing left of the jobs."""
    assert sorted(os.listdir(outdir / "samples")) == EXPECTED  # no missing, stray or temporary file
    items = {it.file: it for it in sweep.make_work_list(PROMPTS, PER_PROMPT, SEED)}
    for name in EXPECTED:
        problem, _, _ = sweep.check_image(outdir / "samples" / name, (SIDE, SIDE))
        assert problem is None, (name, problem)
        im = Image.open(outdir / "samples" / name)
        assert json.loads(im.text["parameters"])["steps"] == settings["steps"]
        assert np.array_equal(np.asarray(im), pixels(items[name], settings))
    man = [json.loads(line) for line in (outdir / sweep.MANIFEST_FILE).read_text().splitlines()]
    assert [r["index"] for r in man] == list(range(len(EXPECTED)))
    for r in man:
        assert r["settings"] == settings
        _, digest, _ = sweep.check_image(outdir / r["file"])
        assert r["sha256"] == digest
    assert json.loads((outdir / sweep.SETTINGS_FILE).read_text())["settings"]["steps"] == settings["steps"]
    assert os.listdir(outdir / sweep.CLAIMS_DIR) == [] and os.listdir(outdir / sweep.JOBS_DIR) == []
    assert not [n for n in os.listdir(outdir) if n.startswith(".tmp-")]


def test_same_settings_share_the_work(tmp_path):
    rng = random.Random(13)
    settings = {"steps": 3, "device": "cpu"}
    shared = 0
    for r in range(ROUNDS_SAME):
        outdir = tmp_path / f"same{r}"
        (a, rendered_a), (b, rendered_b) = run_two(outdir, settings, settings, rng)
        assert a["status"] == b["status"] == "ok"
        # every batch rendered exactly once, by one job or the other; every image written once
        assert collections.Counter(rendered_a + rendered_b) == {b_: 1 for b_ in range(N_BATCHES)}
        assert a["generated"] + b["generated"] == len(EXPECTED)
        assert a["batches"] == len(rendered_a) and b["batches"] == len(rendered_b)
        check_folder(outdir, settings)
        shared += bool(rendered_a) and bool(rendered_b)
    assert shared >= 1  # the two jobs really did run at the same time at least once


def test_same_settings_resume_a_damaged_folder_together(tmp_path):
    """A finished sweep, then: one image deleted, one emptied, one truncated, and what a killed job leaves
    (its job file, a claim, a temporary file). Two jobs restarted together re-render each affected batch
    once, and clear the leftovers."""
    rng = random.Random(5)
    settings = {"steps": 3, "device": "cpu"}
    for r in range(ROUNDS_RESUME):
        outdir = tmp_path / f"resume{r}"
        sweep.run_sweep(LoggingRender(settings, tmp_path / "first.log", 0), PROMPTS, PER_PROMPT, BATCH, SEED, outdir,
                        settings, progress=False)
        samples = outdir / "samples"
        (samples / EXPECTED[1]).unlink()  # batch 0
        (samples / EXPECTED[4]).write_bytes(b"")  # batch 2
        data = (samples / EXPECTED[11]).read_bytes()
        (samples / EXPECTED[11]).write_bytes(data[: len(data) // 2])  # batch 5
        dead = "0123456789abcdef"  # a job that was killed: its file is there, nobody holds its lock
        (outdir / sweep.JOBS_DIR / f"{dead}.lock").write_text('{"host": "elsewhere", "pid": 1}\n')
        (outdir / sweep.CLAIMS_DIR / "000002").write_text(json.dumps({"job": dead, "rank": 0}))
        (samples / f".tmp-{dead}-x1y2z3.png").write_bytes(b"\x89PNG half")
        (outdir / f".tmp-{dead}-x1y2z3.jsonl").write_text("{")
        (a, rendered_a), (b, rendered_b) = run_two(outdir, settings, settings, rng)
        assert a["status"] == b["status"] == "ok"
        assert max(a["damaged"], b["damaged"]) == 2  # whoever renders first has checked every file first
        assert collections.Counter(rendered_a + rendered_b) == {0: 1, 2: 1, 5: 1}
        assert a["generated"] + b["generated"] == 3
        check_folder(outdir, settings)


def test_different_settings_one_job_wins(tmp_path):
    rng = random.Random(7)
    winners = collections.Counter()
    for r in range(ROUNDS_DIFFERENT):
        outdir = tmp_path / f"diff{r}"
        s = [{"steps": 3, "device": "cpu"}, {"steps": 4, "device": "cpu"}]
        results = run_two(outdir, s[0], s[1], rng)
        status = [res["status"] for res, _ in results]
        assert sorted(status) == ["ok", "refused"], status
        win = status.index("ok")
        lose = 1 - win
        winners[win] += 1
        result, rendered = results[win]
        assert result["generated"] == len(EXPECTED) and sorted(rendered) == list(range(N_BATCHES))
        message = results[lose][0]["message"]
        before, now = s[win]["steps"], s[lose]["steps"]
        assert str(outdir) in message and f"settings.steps: {before} before, {now} now" in message, message
        assert results[lose][1] == []  # the refused job rendered nothing
        check_folder(outdir, s[win])


def test_without_file_locks_a_single_job_still_works(tmp_path, monkeypatch, capsys):
    """On a file system without flock (ENOLCK) the sweep warns once and runs as one job; what a killed
    job on this host left is still recognised as stale (its pid is gone) and removed."""
    import errno

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(sweep.fcntl, "flock", no_locks)
    settings = {"steps": 3, "device": "cpu"}
    outdir = tmp_path / "nolocks"
    (outdir / "samples").mkdir(parents=True)
    (outdir / sweep.JOBS_DIR).mkdir()
    (outdir / sweep.CLAIMS_DIR).mkdir()
    proc = FORK.Process(target=time.sleep, args=(0,))
    proc.start()
    proc.join()  # a pid that existed on this host and is gone now
    dead = "fedcba9876543210"
    (outdir / sweep.JOBS_DIR / f"{dead}.lock").write_text(json.dumps({"host": os.uname().nodename, "pid": proc.pid}))
    (outdir / sweep.CLAIMS_DIR / "000001").write_text(json.dumps({"job": dead, "rank": 0}))
    (outdir / "samples" / f".tmp-{dead}-abcdef.png").write_bytes(b"")
    render = LoggingRender(settings, tmp_path / "nolocks.log", 0)
    res = sweep.run_sweep(render, PROMPTS, PER_PROMPT, BATCH, SEED, outdir, settings, progress=False,
                          image_size=(SIDE, SIDE))
    assert res["generated"] == len(EXPECTED)
    assert capsys.readouterr().err.count("warning: no file locks in") == 1
    check_folder(outdir, settings)
