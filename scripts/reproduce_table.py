#!/usr/bin/env python
"""Reproduce a paper table from its spec: plan the sampling jobs, run them as resumable sweeps, evaluate, write it.

    python scripts/reproduce_table.py configs/tables/demo.yaml                  # the demo table, 2-core CPU
    python scripts/reproduce_table.py configs/tables/scalecrafter_sd21.yaml --dry-run   # jobs, images, GPU hours
    python scripts/reproduce_table.py configs/tables/scalecrafter_sd21.yaml --rows '1024x1024/*' --workers 8
    python scripts/reproduce_table.py configs/tables/freescale_table1.yaml --slurm slurm/freescale   # SLURM arrays

A spec (``configs/tables/*.yaml``; format in ``ldm/evaluation/tables/spec.py`` and docs/evaluation.md) names rows
(``--method`` of ``scripts/txt2img.py`` + preset + model) and columns (metric + reference set). Every row of
a table samples the same prompts with the same seed and sampler settings. The script

1. plans one sampling job per distinct ``txt2img.py --sweep`` command: rows that sample the same images
   share a job, and the base-resolution reference samples are one job per model and prompt set;
2. runs the jobs that are not complete, each a ``txt2img.py --sweep`` (in this process; ``--workers N``:
   under ``torchrun`` with N processes; ``--launcher CMD``: any launcher; ``--isolate``: one subprocess per
   job). Re-running after an interruption skips finished jobs, and a sweep renders only its missing images;
3. evaluates every cell with ``ldm.evaluation`` (features computed once per folder, with the feature cache
   of ``scripts/eval_fid.py``) and writes ``OUT/table.md``, ``table.csv`` and ``table.json`` with N,
   settings, machine, time per image and peak memory per row.

Paper specs record the published value of every cell that was found (``sources:``, ``published:``); the
written table shows each reproduced cell beside the published one (and their ratio) and the rank order of the
rows on each metric, published vs ours.

``--dry-run`` lists the jobs, their image counts and a GPU-hour estimate, each figure with its basis and source
(measured runs in OUT, else the paper's own time, else the spec's ``timing`` entries: a time or a measured ratio
to direct sampling). ``--with-optional`` adds the spec's optional rows (variants beside the paper's protocol).
``--slurm DIR`` writes SLURM array job scripts (one task per sampling job, then the evaluation) instead of
running anything.

A spec cannot lower safety: ``--trust_config`` and ``--unsafe_load`` come from this command line only (passed to
every job; ``--dry-run`` says which were given). Jobs are keyed by the content of their files and code
(``ldm/pipelines/content.py``): a replaced checkpoint or an edited preset is sampled again, and the log says why.
Ctrl-C, SIGTERM or SIGHUP stop every job process this runner started, and a job stops when its runner is killed.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from ldm.evaluation import tables  # noqa: E402
from ldm.evaluation.metrics import EvalError  # noqa: E402
from ldm.inference import UsageError, seed_arg  # noqa: E402

STOP_AFTER_ENV = "SCALECRAFTER_TABLE_STOP_AFTER"  # test hook: stop after N sampling jobs ran in this invocation
RUN_ID_ENV = "SCALECRAFTER_TABLE_RUN_ID"           # shared by the processes of one launch (torchrun ranks)
RUNNER_ENV = "SCALECRAFTER_TABLE_RUNNER"           # host:pid of the runner that started a job process
JOB_FILE = tables.JOB_FILE
STOP_GRACE_S = 20.0   # how long a stopped job may take to end (its run record) before it is killed
WATCH_S = 1.0         # how often a job process looks whether its runner is still there


class TableInterrupted(Exception):
    """Stopped on purpose (the STOP_AFTER test hook) or by Ctrl-C; a re-run resumes."""


def log(msg):
    print(f"[table] {msg}", flush=True)


# --------------------------------------------------------------------------------------------------
# the txt2img pipeline (ldm/pipelines/txt2img.py: its option parser, its main()) and the method registry
# --------------------------------------------------------------------------------------------------
def txt2img():
    from ldm.pipelines import txt2img as pipeline
    return pipeline


@functools.lru_cache(maxsize=1)
def job_parser():
    """scripts/txt2img.py's parser as the table jobs use it: whole option names only (``--see`` is not ``--seed``),
    and errors (or a help request) raise ValueError instead of exiting."""
    parser = txt2img().build_parser()
    parser.allow_abbrev = False

    def error(message):
        raise ValueError(message)

    def leave(status=0, message=None):
        raise ValueError("a help request is not a sampling option" if not status else (message or "invalid options"))

    parser.error, parser.exit = error, leave
    return parser


@functools.lru_cache(maxsize=1)
def option_names():
    """Every option string of scripts/txt2img.py (``--seed``, ``--no-hidiff_raunet``, ...)."""
    return frozenset(s for a in job_parser()._actions for s in a.option_strings)


def option_check(flags):
    """ValueError when scripts/txt2img.py would not accept ``flags`` as whole option names."""
    _, extra = job_parser().parse_known_args(list(flags))
    if extra:
        near = sorted(n for n in option_names() if any(n.startswith(e.split("=", 1)[0]) for e in extra
                                                        if e.startswith("--") and len(e) > 2))
        raise ValueError(f"scripts/txt2img.py does not take {' '.join(extra)}"
                         + (f" (options are matched by their whole name; did you mean {', '.join(near[:6])}?)"
                            if near else ""))


def check_jobs(p: tables.Plan):
    """Each job's txt2img.py command as txt2img checks it before loading anything (``plan_run``: the config, the
    steps against the model's timesteps, the size against the latent factor, the method's settings), so that a
    spec that cannot run fails here and in --dry-run, not when its job starts. An error raises SpecError naming
    the rows of the job; returns (missing files as lines: a dry run lists them, a run stops; warnings as notes)."""
    from ldm.checkpoint import CheckpointError
    pipeline, parser = txt2img(), job_parser()
    missing, notes = [], []
    for job in p.jobs:
        where = (f"{p.spec.path}: " + (f"row {', '.join(repr(r) for r in job.rows)}" if job.rows else
                                       f"table {job.table!r}: base-resolution reference") + f" (job {job.id})")
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            try:
                pipeline.plan_run(parser.parse_args(job.argv))
            except CheckpointError as err:
                missing.append(f"{where}: {str(err).splitlines()[0]}")
            except ValueError as err:  # UsageError, the methods' settings errors, the parser's
                raise tables.SpecError(f"{where}: {err}") from None
        for w in seen:
            line = f"{where}: {w.message}"
            if line not in notes:
                notes.append(line)
    return missing, notes


def methods_names():
    from ldm import methods
    return methods.names()


def preset_flags():
    """{method: the txt2img option that takes its preset} from the method registry."""
    from ldm import methods
    return methods.preset_flags()


# --------------------------------------------------------------------------------------------------
# one job (also the entry point of every process a launcher starts: --run-job FILE)
# --------------------------------------------------------------------------------------------------
def _vm_hwm_bytes():
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def run_job(job_file) -> int:
    """Run one sampling job (``txt2img.main``) in this process and append its run record: wall time, images
    written, device, peak memory. Under torchrun every rank calls this; rank 0 counts the images and, when
    the sweep is complete, writes the job's completion marker."""
    import resource

    import torch
    watch_runner()
    info = json.loads(Path(job_file).read_text())
    try:  # whole option names only (txt2img's own parser would also take abbreviations)
        option_check(info["argv"])
    except ValueError as err:
        print(f"error: {job_file}: {err}", file=sys.stderr)
        return 2
    outdir = Path(info["outdir"])
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    threads = os.environ.get("SCALECRAFTER_TABLE_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    expected = info["files"]
    samples = outdir / "samples"

    def present():
        have = set(os.listdir(samples)) if samples.is_dir() else set()
        return sum(1 for f in expected if f in have)

    before = present() if rank == 0 else 0
    cuda = torch.cuda.is_available() and info.get("device", "auto") != "cpu"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    hwm_reset = _reset_hwm()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    from ldm.pipelines import sweep
    sweep.last_result = None
    t0 = time.time()
    rc = txt2img().main(list(info["argv"]))
    wall = time.time() - t0
    own = sweep.last_result  # what this process wrote (None when its sweep did not finish)
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    used_cuda = cuda and torch.cuda.is_initialized() and torch.cuda.max_memory_allocated() > 0
    if used_cuda:
        peak, kind = torch.cuda.max_memory_allocated(), "cuda_max_allocated"
        device_name = torch.cuda.get_device_name(torch.cuda.current_device())
    else:
        hwm = _vm_hwm_bytes() if hwm_reset else None
        peak, kind = (hwm, "rss_hwm") if hwm else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                                                   "ru_maxrss")
        device_name = tables.machine_description("cpu").split(",")[0] + " (CPU)"
    after = present() if rank == 0 else 0
    if own is not None:  # the images this process wrote, not those another job sharing the folder wrote meanwhile
        generated, generated_by = int(own["generated"]), "process"
    else:
        generated, generated_by = (max(after - before, 0) if rank == 0 else None), "folder"
    record = {"run": os.environ.get(RUN_ID_ENV) or secrets.token_hex(6), "rank": rank, "world_size": world,
              "rc": rc, "wall_s": wall, "cpu_s": cpu, "generated": generated, "generated_by": generated_by,
              "started_unix": t0, "present": after if rank == 0 else None, "peak_memory_bytes": peak,
              "peak_memory_kind": kind,
              "device_name": device_name, "machine": tables.machine_description("cuda" if used_cuda else "cpu"),
              "host": socket.gethostname(), "threads": torch.get_num_threads(), "finished": tables.now_utc()}
    with open(outdir / tables.RUNS_FILE, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
    if rank == 0 and rc == 0 and after == len(expected):
        tables.write_text_atomic(outdir / tables.COMPLETE_FILE, json.dumps(
            {"key": info["key"], "content": info.get("content"), "images": len(expected),
             "finished": tables.now_utc()}, indent=1) + "\n")
    return rc


def write_job_file(job: tables.Job) -> Path:
    job.outdir.mkdir(parents=True, exist_ok=True)
    path = job.outdir / JOB_FILE
    data = {"id": job.id, "argv": job.argv, "outdir": str(job.outdir), "key": job.key, "content": job.content,
            "identity": tables.identity(job.key), "files": tables.expected_files(job),
            "device": job.argv[job.argv.index("--device") + 1],
            "rows": job.rows, "role": job.role,
            "command": "python scripts/txt2img.py " + " ".join(shlex.quote(a) for a in job.argv)}
    tables.write_text_atomic(path, json.dumps(data, indent=1) + "\n")
    return path


def job_command(job: tables.Job, args):
    """(command, environment) of a sampling job in its own process(es); command None: in this process."""
    job_file = write_job_file(job)
    env = dict(os.environ)
    env[RUN_ID_ENV] = secrets.token_hex(6)
    if args.threads:
        env["SCALECRAFTER_TABLE_THREADS"] = str(args.threads)
        env["OMP_NUM_THREADS"] = str(args.threads)
    if args.workers and args.workers > 1:
        prefix = ["torchrun", "--standalone", "--nproc_per_node", str(args.workers)]
    elif args.launcher:
        prefix = shlex.split(args.launcher)
    elif args.isolate or (args.parallel or 1) > 1:
        prefix = [sys.executable]
    else:
        return None, env, job_file
    return prefix + [str(REPO_ROOT / "scripts" / "reproduce_table.py"), "--run-job", str(job_file)], env, job_file


class JobProcesses:
    """The job processes this runner started. Each starts in its own session, so that its process group holds
    the job and what it starts (a launcher's processes), and :meth:`stop` ends them all: on an error, on Ctrl-C
    and on SIGTERM/SIGHUP (:func:`signals_interrupt`). A job process also ends when this runner is killed
    outright (SIGKILL): it watches for it (:func:`watch_runner`)."""

    def __init__(self):
        self.running = {}

    def start(self, cmd, env, job) -> subprocess.Popen:
        env = dict(env, **{RUNNER_ENV: f"{socket.gethostname()}:{os.getpid()}"})
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, start_new_session=True)
        self.running[proc] = job
        return proc

    def finished(self):
        """(process, job) of the processes that ended, no longer tracked."""
        done = [(proc, job) for proc, job in self.running.items() if proc.poll() is not None]
        for proc, _ in done:
            del self.running[proc]
        return done

    def stop(self, grace: float = STOP_GRACE_S):
        """SIGTERM to the process group of every running job (a job stops as on Ctrl-C: its sweep keeps every
        finished image and a re-run resumes), SIGKILL to those still there after ``grace`` seconds."""
        procs = [proc for proc in self.running if proc.poll() is None]
        for proc in procs:
            _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.time() + grace
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait()
        for proc in list(self.running):  # what they started in their group, if still there
            _signal_group(proc.pid, signal.SIGKILL)
        self.running.clear()


def _signal_group(pgid, sig):
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _process_alive(pid) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (ended, not yet reaped) has ended
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def watch_runner():
    """In a job process started by a runner (RUNNER_ENV): end this process when the runner is gone (killed
    outright, so that it could not stop its jobs). The main thread gets SIGTERM (a KeyboardInterrupt: the job
    ends as on Ctrl-C); if it has not ended after STOP_GRACE_S, the process exits."""
    import threading
    host, _, pid = os.environ.get(RUNNER_ENV, "").rpartition(":")
    if not pid.isdigit() or host != socket.gethostname():  # no runner, or one on another machine (a launcher's)
        return
    runner = int(pid)

    def watch():
        while _process_alive(runner):
            time.sleep(WATCH_S)
        print(f"[table] the runner (process {runner}) is gone: stopping this job", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(STOP_GRACE_S)
        os._exit(143)

    threading.Thread(target=watch, name="watch-runner", daemon=True).start()


@contextlib.contextmanager
def signals_interrupt():
    """SIGTERM and SIGHUP raise KeyboardInterrupt (as Ctrl-C does) while the block runs, so that the clean-up of
    an interruption runs: job processes stopped, run records written. The previous handlers are restored."""
    if not threading_main():  # handlers can only be set in the main thread
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        previous[sig] = signal.signal(sig, interrupt)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def threading_main() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def launch(job: tables.Job, args) -> int:
    cmd, env, job_file = job_command(job, args)
    if cmd is None:  # in this process
        os.environ[RUN_ID_ENV] = env[RUN_ID_ENV]
        try:
            return run_job(job_file)
        finally:
            os.environ.pop(RUN_ID_ENV, None)
    log("$ " + " ".join(shlex.quote(c) for c in cmd))
    procs = JobProcesses()
    proc = procs.start(cmd, env, job)
    try:
        return proc.wait()
    finally:
        procs.stop()  # only if still running: Ctrl-C, SIGTERM


def _finished(job: tables.Job, rc: int):
    if rc == 130:
        raise TableInterrupted(f"sampling job {job.id} was interrupted; run the same command again to resume")
    if rc != 0:
        raise RuntimeError(f"sampling job {job.id} ({job.describe()}) failed with exit status {rc}; the command is "
                           f"in {job.outdir / JOB_FILE}. Fix the cause and run the same command again: finished "
                           "jobs and images are kept")
    if not tables.job_complete(job):
        raise RuntimeError(f"sampling job {job.id} ended without all {job.n_images} images "
                           f"({tables.images_present(job)} present) in {job.samples}")


def resampled_because(job: tables.Job):
    """Why a job that was sampled before (an earlier version of it in OUT) is sampled again, or None."""
    from ldm.pipelines.content import describe_changes
    earlier = tables.earlier_versions(job)
    if not earlier:
        return None
    folder, content = earlier[0]
    changes = describe_changes(content, job.content) or ["its folder holds another version"]
    return (f"since {folder.name} was sampled, " + "; ".join(changes) + f". Its images stay in {folder} (delete it "
            "to free the space)")


def run_jobs(p: tables.Plan, args) -> list:
    done = [j for j in p.jobs if tables.job_complete(j)]
    todo = [j for j in p.jobs if j not in done]
    for j in done:
        log(f"job {j.id}: complete ({j.n_images} images), skipped")
    for j in todo:
        why = resampled_because(j)
        if why:
            log(f"job {j.id}: sampled again: {why}")
    stop_after = int(os.environ.get(STOP_AFTER_ENV, "0") or 0)
    executed = []

    def announce(i, job):
        have = tables.images_present(job)
        log(f"job {i}/{len(todo)} {job.id}: {job.describe()}, {job.n_images - have} of {job.n_images} images to "
            f"render (rows: {', '.join(job.rows) or 'base reference'})")

    if (args.parallel or 1) > 1:  # several jobs at once, each in its own process; the longest first
        # a job without an estimate could be the longest: it goes first
        cost = {e["job"].id: (e["seconds_per_image"] or float("inf")) * e["remaining"] for e in tables.estimate(p)}
        pending = sorted(enumerate(todo, 1), key=lambda ij: -cost.get(ij[1].id, 0.0))
        procs, errors = JobProcesses(), []
        try:
            while pending or procs.running:
                while pending and len(procs.running) < args.parallel and not errors and \
                        not (stop_after and len(executed) + len(procs.running) >= stop_after):
                    i, job = pending.pop(0)
                    announce(i, job)
                    cmd, env, _ = job_command(job, args)
                    procs.start(cmd, env, job)
                if not procs.running:
                    break
                time.sleep(0.5)
                for proc, job in procs.finished():
                    try:
                        _finished(job, proc.returncode)
                        executed.append(job.id)
                    except (RuntimeError, TableInterrupted) as err:
                        errors.append(err)
        finally:
            procs.stop()  # Ctrl-C, SIGTERM or an error here: the other jobs stop too (and resume next time)
        if errors:
            raise errors[0]
        if stop_after and pending:
            raise TableInterrupted(f"stopped after {len(executed)} job(s) ({STOP_AFTER_ENV}={stop_after}); run again "
                                   "to resume")
        return executed
    for i, job in enumerate(todo, 1):
        announce(i, job)
        _finished(job, launch(job, args))
        executed.append(job.id)
        if stop_after and len(executed) >= stop_after:
            raise TableInterrupted(f"stopped after {len(executed)} job(s) ({STOP_AFTER_ENV}={stop_after}); run again "
                                   "to resume")
    return executed


# --------------------------------------------------------------------------------------------------
# dry run and SLURM
# --------------------------------------------------------------------------------------------------
def print_dry_run(p: tables.Plan, warnings_out, args, full_spec=None, missing_files=()):
    est = tables.estimate(p)
    spec = p.spec
    n_rows = sum(len(t.rows) for t in spec.tables)
    n_base = sum(1 for j in p.jobs if j.role == tables.BASE)
    print(f"{spec.path}: {spec.title}")
    print(f"{len(spec.tables)} table(s), {n_rows} row(s), {len(p.jobs)} sampling job(s) ({n_base} base-resolution "
          f"reference job(s) shared by the rows of their table and model); seed {spec.seed}; "
          + ("; ".join(f"table {t.id}: {spec.describe_sampler(t)}" for t in spec.tables) if spec.samplers_differ()
             else spec.describe_sampler()))
    print(describe_safety(args))
    print()
    print("| job | used by | size | method | images | done | s / image | hours left | basis | estimate |")
    print("|---|---|---|---|---:|---:|---:|---:|---|---|")
    sources = {}
    for e in est:
        j = e["job"]
        used = ", ".join(j.rows + ([f"base reference ({j.table})"] if j.role == tables.BASE else []))
        sec = "?" if e["seconds_per_image"] is None else f"{e['seconds_per_image']:.3g}"
        hours = "?" if e["hours"] is None else f"{e['hours']:.2f}"
        method = j.method + (" " + Path(j.preset).name if j.preset else "") + (" " + " ".join(j.options)
                                                                              if j.options else "")
        ref = sources.setdefault((e["source"], e["device"]), len(sources) + 1)
        basis = tables.BASIS_LABELS.get(e["basis"], "?")
        print(f"| {j.id} | {used} | {j.W}x{j.H} | {method} | {e['images']} | {e['present']} | {sec} | {hours} | "
              f"{basis} | [{ref}] |")
    print()
    for (source, device), ref in sources.items():
        print(f"[{ref}] {source} (device: {device})")
    total_img = sum(e["images"] for e in est)
    left_img = sum(e["remaining"] for e in est)
    by_dev = {}
    for e in est:
        if e["hours"] is not None:
            by_dev[e["device"]] = by_dev.get(e["device"], 0.0) + e["hours"]
    unknown = [e["job"].id for e in est if e["hours"] is None and e["remaining"]]
    print()
    print(f"images: {total_img} in all, {left_img} still to sample")
    for dev, h in by_dev.items():
        print(f"estimate: {h:.2f} hours ({h * 3600:.0f} s) on {dev}"
              + (" (GPU-hours: one GPU, or the sum over the GPUs of a torchrun job)" if "cpu" not in dev.lower()
                 else ""))
    if (args.parallel or 1) > 1 and by_dev:
        longest = max((e["hours"] or 0.0) for e in est)
        total = sum(by_dev.values())
        print(f"with --parallel {args.parallel}: about {max(total / args.parallel, longest):.2f} hours elapsed "
              f"(the jobs' sum over {args.parallel} processes, at least the longest job: {longest:.2f} hours)")
    if unknown:
        print(f"no estimate for {len(unknown)} job(s): {', '.join(unknown)}")
    left_out = [r for r in full_spec.rows() if r.optional and r.qid not in {x.qid for x in spec.rows()}] \
        if full_spec is not None else []
    if left_out:
        print(f"optional rows not planned ({len(left_out)}; name one with --rows, or all with --with-optional): "
              + ", ".join(f"{r.qid} ({r.name})" for r in left_out))
    print()
    print("published values:")
    for t in spec.tables:
        pub = t.published or {}
        if pub.get("source"):
            src = spec.sources[pub["source"]]
            n = sum(1 for r in t.rows for c in t.columns if r.published and not r.published.get("absent")
                    and r.published.get(c.id) is not None)
            print(f"  {t.id}: {src['cite']} (read from {src['read_from']}): {n} cell(s) of "
                  f"{len(t.rows) * len(t.columns)}")
        elif pub.get("not_found"):
            print(f"  {t.id}: not found: {pub['not_found']}")
        else:
            print(f"  {t.id}: none (not a paper table)")
    print()
    print("references and features:")
    seen = set()
    for t in spec.tables:
        for c in t.columns:
            if c.reference and c.reference != tables.BASE and (t.id, c.reference) not in seen:
                seen.add((t.id, c.reference))
                r = t.references[c.reference]
                cols = ", ".join(x.id for x in t.columns if x.reference == c.reference)
                if r.kind == "folder":
                    folder = tables._rel(r.folder)
                    state = f"{len(os.listdir(folder))} files" if folder.is_dir() else "MISSING"
                    print(f"  table {t.id} ({cols}): real images in {r.folder}: {state}"
                          + (f"; {r.description}" if r.description and not folder.is_dir() else ""))
                else:
                    print(f"  table {t.id} ({cols}): {r.dataset['n']} images of ldm.data.shapes, rendered here")
    extractors = sorted({c.metric.extractor for t in spec.tables for c in t.columns})
    folders = set()
    for t in spec.tables:
        for row in t.rows:
            folders.add(str(p.row_job[row.qid].samples))
            for c in t.columns:
                if c.reference:
                    folders.add(str(p.reference_folder(t, row, c.reference)))
    print(f"  feature extractors: {', '.join(extractors)}; {len(folders)} folder(s), each extracted once "
          "(cached across runs)")
    if "inception" in extractors:
        from ldm.evaluation.inception import InceptionWeightsError, resolve_weights_path
        try:
            print(f"  Inception weights: {resolve_weights_path((spec.features.get('inception') or {}).get('weights'))}")
        except InceptionWeightsError:
            print("  Inception weights: NOT FOUND (pt_inception-2015-12-05-6726825d.pth; see docs/evaluation.md)")
    problems = list(missing_files)
    for name, m in spec.models.items():
        if any(j.model.name == name for j in p.jobs) and not tables._rel(m.ckpt).is_file():
            problems.append(f"checkpoint {m.ckpt} ({name}) not found (checkpoints/README.md)")
    for tid, (path, prompts) in p.prompt_files.items():
        if prompts is None:
            t = next(t for t in spec.tables if t.id == tid)
            try:
                t.prompt_list()
            except tables.SpecError as err:
                problems.append(str(err))
    again = [f"{j.id}: {why}" for j in p.jobs if not tables.job_complete(j) for why in [resampled_because(j)] if why]
    for title, lines in (("missing before a run:", problems),
                         ("sampled again (its files or code changed since an earlier run in OUT):", again),
                         ("notes:", list(warnings_out))):
        if lines:
            print()
            print(title)
            for line in lines:
                print(f"  - {line}")


SBATCH_SAMPLE = """#!/usr/bin/env bash
#SBATCH --job-name={name}-sample
#SBATCH --array=0-{last}
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={gpus}
#SBATCH --cpus-per-task={cpus}
#SBATCH --time={time}
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
#SBATCH --output={slurm_dir}/slurm-%x-%A_%a.out
#
# One array task per sampling job of {spec} (written by scripts/reproduce_table.py --slurm; the job
# list is {slurm_dir}/jobs.txt). Each task runs its job as a txt2img.py --sweep under torchrun on the GPUs
# of one node; a requeued or resubmitted task resumes (finished images are kept). Adapt the #SBATCH lines
# (partition, account, GPUs) to your cluster; GPUS_PER_NODE overrides the process count.
set -euo pipefail
cd "${{SLURM_SUBMIT_DIR:-{repo}}}"
JOB=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {slurm_dir}/jobs.txt)
NPROC=${{GPUS_PER_NODE:-${{SLURM_GPUS_ON_NODE:-{gpus}}}}}
export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-1}}
export {run_env}="${{SLURM_ARRAY_JOB_ID:-0}}_${{SLURM_ARRAY_TASK_ID:-0}}_${{SLURM_RESTART_COUNT:-0}}"
echo "[table] array task ${{SLURM_ARRAY_TASK_ID:-?}}: $JOB on $NPROC process(es)"
${{TORCHRUN:-torchrun}} --standalone --nproc_per_node "$NPROC" scripts/reproduce_table.py --run-job "$JOB" &
PID=$!
trap 'echo "[table] time limit close: requeueing ${{SLURM_ARRAY_JOB_ID:-?}}_${{SLURM_ARRAY_TASK_ID:-?}}"; scontrol requeue "${{SLURM_ARRAY_JOB_ID:-0}}_${{SLURM_ARRAY_TASK_ID:-0}}"' USR1
while true; do
  status=0
  wait "$PID" || status=$?
  kill -0 "$PID" 2>/dev/null || break
done
exit "$status"
"""

SBATCH_EVAL = """#!/usr/bin/env bash
#SBATCH --job-name={name}-evaluate
#SBATCH --nodes=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=8:00:00
#SBATCH --output={slurm_dir}/slurm-%x-%j.out
#
# The evaluation of {spec} once every sampling task is done (submit.sh makes it depend on the array):
# features once per folder (cached), the metrics, OUT/table.md, table.csv, table.json.
set -euo pipefail
cd "${{SLURM_SUBMIT_DIR:-{repo}}}"
python scripts/reproduce_table.py {eval_args}
"""

SUBMIT = """#!/usr/bin/env bash
# Submit the sampling array of {spec} and its evaluation (runs once every array task has succeeded).
set -euo pipefail
cd "$(dirname "$0")"
cd "{repo}"
a=$(sbatch --parsable {slurm_dir}/sample.sbatch)
e=$(sbatch --parsable --dependency=afterok:${{a%%;*}} {slurm_dir}/evaluate.sbatch)
echo "sampling array: $a ({n} task(s)); evaluation: $e"
"""


def write_slurm(p: tables.Plan, args):
    d = Path(args.slurm)
    d.mkdir(parents=True, exist_ok=True)
    tables.materialize_prompts(p)
    tables.render_dataset_references(p, log=log)
    todo = [j for j in p.jobs if not tables.job_complete(j)]
    files = [str(write_job_file(j)) for j in todo]
    tables.write_text_atomic(d / "jobs.txt", "".join(f + "\n" for f in files))
    common = dict(name=tables._slug(p.spec.name), spec=p.spec.path, slurm_dir=d.resolve(), repo=REPO_ROOT)
    eval_args = [str(p.spec.path), "--out", str(p.out.resolve()), "--evaluate-only"]
    if args.rows:
        eval_args += ["--rows"] + list(args.rows)
    if args.columns:
        eval_args += ["--columns"] + list(args.columns)
    if args.cache_dir:
        eval_args += ["--cache_dir", str(args.cache_dir)]
    if todo:
        tables.write_text_atomic(d / "sample.sbatch", SBATCH_SAMPLE.format(
            last=len(todo) - 1, gpus=args.slurm_gpus, cpus=8 * args.slurm_gpus, time=args.slurm_time,
            run_env=RUN_ID_ENV, **common))
    tables.write_text_atomic(d / "evaluate.sbatch", SBATCH_EVAL.format(
        eval_args=" ".join(shlex.quote(a) for a in eval_args), **common))
    if todo:
        tables.write_text_atomic(d / "submit.sh", SUBMIT.format(n=len(todo), **common))
        os.chmod(d / "submit.sh", 0o755)
    else:
        tables.write_text_atomic(d / "submit.sh", f"#!/usr/bin/env bash\n# every sampling job is complete\n"
                                                   f"cd \"{REPO_ROOT}\"\nsbatch {d.resolve()}/evaluate.sbatch\n")
    log(f"wrote {d}/jobs.txt ({len(todo)} sampling job(s); {len(p.jobs) - len(todo)} complete), sample.sbatch, "
        f"evaluate.sbatch, submit.sh: bash {d}/submit.sh")


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------
def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", nargs="?", help="the table spec (configs/tables/*.yaml)")
    p.add_argument("--rows", nargs="+", default=None, metavar="ROW",
                   help="only these rows: ids or table/id, fnmatch patterns ('1024x1024/*')")
    p.add_argument("--columns", nargs="+", default=None, metavar="COL", help="only these columns (ids, patterns)")
    p.add_argument("--with-optional", dest="with_optional", action="store_true",
                   help="also the spec's optional rows (variants beside the paper's protocol, e.g. the release presets)")
    p.add_argument("--dry-run", dest="dry_run", action="store_true",
                   help="list the sampling jobs, image counts and a GPU-hour estimate; run nothing")
    p.add_argument("--slurm", default=None, metavar="DIR",
                   help="write SLURM array job scripts (sampling + evaluation) into DIR instead of running")
    p.add_argument("--slurm_gpus", type=int, default=8, help="--slurm: GPUs (torchrun processes) per array task")
    p.add_argument("--slurm_time", default="24:00:00", help="--slurm: time limit per array task (tasks requeue)")
    p.add_argument("--out", default=None, help="output folder (default outputs/tables/<spec name>)")
    p.add_argument("--workers", type=int, default=None,
                   help="run each sampling job under torchrun --standalone --nproc_per_node N (one process per GPU)")
    p.add_argument("--launcher", default=None,
                   help="run each sampling job as CMD scripts/reproduce_table.py --run-job FILE, e.g. "
                        "\"torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint host:29500\"")
    p.add_argument("--isolate", action="store_true", help="run each sampling job in its own Python process")
    p.add_argument("--parallel", type=int, default=None, metavar="N",
                   help="run N sampling jobs at once, each in its own process (on a CPU: with --threads = cores / N)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="sampling and feature device")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--evaluate-only", dest="evaluate_only", action="store_true",
                   help="sample nothing; evaluate (every job must be complete)")
    p.add_argument("--cache_dir", default=None,
                   help="feature cache (default: $SCALECRAFTER_EVAL_CACHE or ~/.cache/scalecrafter_eval)")
    p.add_argument("--no_cache", action="store_true", help="neither read nor write the feature cache")
    p.add_argument("--kid_subsets", type=int, default=100, help="KID subsets")
    p.add_argument("--kid_subset_size", type=int, default=1000, help="KID subset size (reduced to the set size)")
    p.add_argument("--metric_seed", type=seed_arg, default=0, help="seed of the KID subsets")
    p.add_argument("--write-docs", dest="write_docs", default=None, metavar="MD",
                   help="also write the table into MD between <!-- table:NAME --> markers (e.g. docs/tables.md)")
    s = p.add_argument_group("safety (only here: a table spec cannot set these; given, every job gets them)")
    s.add_argument("--trust_config", action="store_true",
                   help="let the models' configs build classes outside this package (only for configs you trust)")
    s.add_argument("--unsafe_load", action="store_true",
                   help="allow checkpoints that need unsafe unpickling (only for files you trust)")
    p.add_argument("--run-job", dest="run_job", default=None, help=argparse.SUPPRESS)
    return p


def safety_flags(args):
    """The flags that lower safety, from this command line only (passed to every job)."""
    return [f for f in tables.SAFETY_FLAGS if getattr(args, f.lstrip("-"))]


def describe_safety(args) -> str:
    given = safety_flags(args)
    if not given:
        return ("safety: configs may build only this package's classes and checkpoints load without unpickling code "
                "(a table spec cannot change this; --trust_config / --unsafe_load on this command line would)")
    return (f"safety: {' '.join(given)} given on this command line: every job gets "
            + ("it" if len(given) == 1 else "them") + " ("
            + "; ".join(f"{f}: {tables.SAFETY_FLAGS[f]}" for f in given) + ")")


def on_gpu(args) -> bool:
    """Whether this run samples and extracts features on a GPU (--device, or auto with one present)."""
    import torch
    return args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())


def apply_cpu_run(spec: tables.Spec, args):
    """The spec's ``cpu_run`` (e.g. the demo's two one-thread jobs at a time on a 2-core CPU): the defaults of
    --parallel and --threads when the jobs sample on a CPU and the command line sets neither."""
    if not spec.cpu_run or args.parallel or args.threads or args.workers or args.launcher or args.slurm \
            or on_gpu(args):
        return
    args.parallel, args.threads = spec.cpu_run.get("parallel"), spec.cpu_run.get("threads")
    given = " ".join(f"--{k} {v}" for k, v in (("parallel", args.parallel), ("threads", args.threads)) if v)
    log(f"sampling on a CPU: {given} from the spec's cpu_run (give --parallel or --threads to choose otherwise)")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    with signals_interrupt():
        if args.run_job:
            try:
                return run_job(args.run_job)
            except KeyboardInterrupt as err:  # before or after the sampling (which ends with its own message)
                print(f"interrupted ({err or 'Ctrl-C'})", file=sys.stderr)
                return 130
        return run_table(args, argv)


def run_table(args, argv) -> int:
    if (args.parallel or 1) > 1 and (args.workers or args.launcher):
        build_parser().error("--parallel runs several jobs as plain processes; it does not combine with --workers or "
                             "--launcher (those spread one job over several processes)")
    if not args.spec:
        build_parser().error("give a table spec (configs/tables/*.yaml)")
    t_start = time.time()
    try:
        spec = tables.load_spec(args.spec)
        apply_cpu_run(spec, args)
        if args.threads:
            import torch
            torch.set_num_threads(args.threads)
        sel = tables.select(spec, args.rows, args.columns, args.with_optional)
        notes = tables.check_spec(spec, methods_names(), option_check, sel.rows(), preset_flags(), option_names())
        sel = tables.select(spec, args.rows, args.columns, args.with_optional)  # rows now carry their presets' sizes
        out = Path(args.out or REPO_ROOT / "outputs" / "tables" / tables._slug(spec.name))
        p = tables.plan(sel, out, device=args.device, safety=safety_flags(args))
        job_missing, job_notes = check_jobs(p)
        notes = list(notes) + job_notes
        if args.dry_run:
            print_dry_run(p, notes, args, spec, job_missing)
            return 0
        for line in notes:
            log(f"note: {line}")
        if safety_flags(args):
            log(describe_safety(args))
        if job_missing and not args.evaluate_only and not args.slurm:
            raise tables.SpecError("; ".join(job_missing))
        if args.slurm:
            write_slurm(p, args)
            return 0
        missing = [f"{m.ckpt} ({n})" for n, m in spec.models.items()
                   if any(j.model.name == n for j in p.jobs) and not tables._rel(m.ckpt).is_file()]
        if missing and not args.evaluate_only:
            raise tables.SpecError(f"checkpoint(s) not found: {', '.join(missing)} (see checkpoints/README.md)")
        tables.materialize_prompts(p)
        missing_refs = sorted({f"{r.folder}" + (f" ({r.description})" if r.description else "")
                               for t in sel.tables for c in t.columns if c.reference and c.reference != tables.BASE
                               for r in [t.references[c.reference]]
                               if r.kind == "folder" and not tables._rel(r.folder).is_dir()})
        if missing_refs:
            raise tables.SpecError("reference image folder(s) not found: " + "; ".join(missing_refs))
        if any(c.metric.extractor == "inception" for t in sel.tables for c in t.columns):
            from ldm.evaluation.inception import InceptionWeightsError
            try:  # before hours of sampling, not after
                tables.FeatureStore(spec.features).extractor("inception").identity()
            except InceptionWeightsError as err:
                raise tables.SpecError(str(err)) from None
        tables.render_dataset_references(p, log=log)
        executed = []
        if args.evaluate_only:
            incomplete = [j for j in p.jobs if not tables.job_complete(j)]
            if incomplete:
                raise EvalError(f"--evaluate-only: {len(incomplete)} sampling job(s) are not complete: "
                                + ", ".join(f"{j.id} ({tables.images_present(j)}/{j.n_images})" for j in incomplete))
        else:
            executed = run_jobs(p, args)
        t_eval = time.time()
        store = tables.FeatureStore(spec.features, cache_dir=args.cache_dir, use_cache=not args.no_cache,
                                    device=None if args.device == "auto" else args.device)
        results = tables.evaluate(p, store, kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size,
                                  seed=args.metric_seed, log=log)
        wall = time.time() - t_start
        command = "python scripts/reproduce_table.py " + " ".join(
            shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
        meta = {"command": command, "date": tables.now_utc(), "wall_s": wall,
                "machine": tables.machine_description("cuda" if on_gpu(args) else "cpu")}
        md = tables.render_markdown(p, results, meta)
        out.mkdir(parents=True, exist_ok=True)
        tables.write_text_atomic(out / "table.md", md)
        records = tables.table_rows(p, results)
        tables.write_csv(records, out / "table.csv")
        doc = {"spec": str(spec.path), "name": spec.name, "title": spec.title, "paper": spec.paper, "notes": spec.notes,
               "selection": {"rows": args.rows, "columns": args.columns}, **meta,
               "evaluation_s": time.time() - t_eval, "seed": spec.seed, "sampler": spec.sampler,
               "common_options": spec.common_options,
               "tables": [{"id": t.id, "title": t.title, "images": t.images, "prompts": t.prompts, "sampler": t.sampler,
                           "prompt_file": str(p.prompt_files[t.id][0]),
                           "columns": [{"id": c.id, "name": c.name, "metric": c.metric.name,
                                        "reference": c.reference,
                                        "reference_folder": None if not c.reference else sorted({
                                            str(p.reference_folder(t, r, c.reference)) for r in t.rows})}
                                       for c in t.columns],
                           "rows": [r for r in records if r["table"] == t.id]} for t in sel.tables],
               "cells": results["cells"], "warnings": results["warnings"], "spec_notes": notes,
               "published": {t.id: tables.published_comparison(p, results, t) for t in sel.tables},
               "sources": spec.sources,
               "jobs": [{"id": j.id, "role": j.role, "rows": j.rows, "images": j.n_images,
                         "command": "python scripts/txt2img.py " + " ".join(shlex.quote(a) for a in j.argv),
                         "stats": tables.job_stats(j), "run_now": j.id in executed} for j in p.jobs],
               "features": {"extractors": {n: store.extractor(n).identity() for n in sorted(
                   {c.metric.extractor for t in sel.tables for c in t.columns})},
                   "cache_dir": None if args.no_cache else str(store.cache_dir),
                   "computed": store.computed, "cache_hits": store.cache_hits}}
        tables.write_text_atomic(out / "table.json", json.dumps(doc, indent=1, default=str) + "\n")
        if args.write_docs:
            tables.replace_block(Path(args.write_docs), spec.name, tables.render_markdown(p, results, meta, "##"))
        print(md)
        log(f"wrote {out / 'table.md'}, table.csv, table.json ({len(executed)} sampling job(s) run now, "
            f"{len(p.jobs) - len(executed)} already complete; {wall / 60:.1f} min)")
        return 0
    except (tables.SpecError, EvalError, UsageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # a sampling job failed (its own message is above)
        print(f"error: {err}", file=sys.stderr)
        return 1
    except TableInterrupted as err:
        print(f"interrupted: {err}", file=sys.stderr)
        return 130
    except KeyboardInterrupt as err:
        print(f"interrupted ({err or 'Ctrl-C'}): sampling jobs stopped; run the same command again to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
