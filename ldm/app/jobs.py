"""Runs in background threads: jobs, progress with stage names, cancellation, the model cache.

Shared state, and why it is safe:

* ``ModelCache``: models keyed by (config file, checkpoint file, their sizes and times, device, loading options),
  loaded under the cache's lock (two tabs asking for the same model load it once), least recently used evicted.
* ``Runner.run_lock``: one run at a time in the process. A run seeds the process-wide RNG (as the command line
  does, so the app's images are the command line's), installs per-call hooks on the cached model's modules
  (``ldm/unet_hooks/processors.py`` refuses a second processor on a module) and uses the one device; runs
  queued behind it wait, cancellable, and say so.
* ``Runner.jobs``: each job belongs to the session (one per browser tab) that submitted it; another session's
  job is not found. Jobs hold their own results; nothing else is shared between sessions.

A job is cancelled at the next sampler step (or while it waits in line): the step callback raises
:class:`Cancelled`, which unwinds the pipeline's hook scopes like any error, so the cached model is left as loaded.
"""
import io
import secrets
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections import OrderedDict
from pathlib import Path

from ldm.errors import InputWarning, UsageError
from ldm.inference import png_info

KEEP_JOBS_PER_SESSION = 24  # finished jobs (and their images) kept per session; older ones are dropped
KEEP_JOBS = 200             # and in all


class Cancelled(Exception):
    """The user cancelled the job."""


# -- InputWarnings of a run go to its job (thread-local sink; other warnings are shown as usual) ----------------

_local = threading.local()


def _show(message, category, filename, lineno, file=None, line=None):
    sink = getattr(_local, "sink", None)
    if sink is not None and issubclass(category, InputWarning):
        sink.append(str(message))
        return
    _show.previous(message, category, filename, lineno, file, line)


_show.previous = warnings.showwarning


class collect_warnings:
    """``with collect_warnings() as caught:`` InputWarnings raised in this thread are appended to ``caught``."""

    def __enter__(self):
        if warnings.showwarning is not _show:  # (re)install: a test harness may have replaced it
            _show.previous = warnings.showwarning
            warnings.showwarning = _show
        warnings.filterwarnings("always", category=InputWarning)
        self.caught, self.outer = [], getattr(_local, "sink", None)
        _local.sink = self.caught
        return self.caught

    def __exit__(self, *exc):
        _local.sink = self.outer
        return False


# -- the model cache ------------------------------------------------------------------------------------------

class ModelCache:
    """Loaded models by (config, checkpoint, device, loading options); ``load`` has the pipelines' loader
    signature (``loader(config, ckpt, **kw)``)."""

    def __init__(self, capacity=2, load_fn=None):
        from ldm.checkpoint import load_model_from_config
        self.capacity = capacity
        self.load_fn = load_fn or load_model_from_config
        self._lock = threading.Lock()
        self._models = OrderedDict()
        self.loads = 0  # how many times a model was actually loaded

    @staticmethod
    def _file_key(path):
        path = Path(path).resolve()
        st = path.stat()
        return str(path), st.st_size, st.st_mtime_ns

    def key(self, config, ckpt, device=None, allow_unsafe=False, use_ema=True, config_name=None, trust=False,
            weights_dtype=None):
        if config_name and Path(config_name).is_file():
            config_key = self._file_key(config_name)
        else:
            from omegaconf import OmegaConf
            config_key = OmegaConf.to_yaml(config)
        return (config_key, self._file_key(ckpt), str(device), bool(allow_unsafe), bool(use_ema), bool(trust),
                str(weights_dtype))

    def load(self, config, ckpt, device=None, allow_unsafe=False, use_ema=True, config_name=None, trust=False,
             weights_dtype=None):
        key = self.key(config, ckpt, device, allow_unsafe, use_ema, config_name, trust, weights_dtype)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            model = self.load_fn(config, ckpt, device=device, allow_unsafe=allow_unsafe, use_ema=use_ema,
                                 config_name=config_name, trust=trust,
                                 **({"weights_dtype": weights_dtype} if weights_dtype is not None else {}))
            self.loads += 1
            self._models[key] = model
            while len(self._models) > self.capacity:
                self._models.popitem(last=False)
            return model

    def __len__(self):
        return len(self._models)


# -- jobs --------------------------------------------------------------------------------------------------

def png_bytes(img, metadata):
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=png_info(metadata))
    return buf.getvalue()


class Result:
    """One image of a job: its PNG (with the command line's metadata), size and earlier stages' PNGs."""

    def __init__(self, img, meta, stages=()):
        self.meta = meta
        self.size = img.size
        self.png = png_bytes(img, meta)
        self.stages = [png_bytes(s, {**meta, "stage": k}) for k, s in enumerate(stages, start=1)]


class Job:
    def __init__(self, session, kind, model, argv, title, stage_names):
        self.id = secrets.token_urlsafe(16)  # unguessable: the images' URLs carry it
        self.session, self.kind, self.model, self.argv, self.title = session, kind, model, argv, title
        self.stage_names = list(stage_names)
        self.created = time.time()
        self.state = "queued"        # queued | loading | running | done | error | cancelled
        self.stage = "waiting for the run before it"
        self.progress = 0.0
        self.stages_done = []
        self.error = None
        self.warnings = []
        self.results = []
        self.elapsed = None
        self.cancel_event = threading.Event()
        self.cleanup = None          # called when the job ends (temporary files)
        self._lock = threading.Lock()

    def update(self, **kw):
        with self._lock:
            for k, v in kw.items():
                setattr(self, k, v)

    @property
    def finished(self):
        return self.state in ("done", "error", "cancelled")

    def check_cancel(self):
        if self.cancel_event.is_set():
            raise Cancelled()

    def snapshot(self):
        with self._lock:
            return {
                "id": self.id, "kind": self.kind, "title": self.title, "model": self.model.id, "state": self.state,
                "stage": self.stage, "progress": round(self.progress, 4), "stages": list(self.stage_names),
                "stages_done": list(self.stages_done), "error": self.error, "warnings": list(self.warnings),
                "elapsed": self.elapsed, "argv": list(self.argv),
                "results": [{"index": n, "width": r.size[0], "height": r.size[1], "metadata": r.meta,
                             "stages": len(r.stages)} for n, r in enumerate(self.results)],
            }


class Progress:
    """The sampler's step callback of a job: cancellation, progress and the current stage's name.

    A job runs ``len(stage_names)`` sampler runs per batch, ``batches`` batches; a run starts at any step (a
    cascade's later stages restart part-way), so a step index not above the last one begins the next run.
    ``sampler`` (the pipeline's ``wrap_sampler`` seam) learns the sampler's real number of steps (DDIM's schedule
    can have one step more than asked)."""

    def __init__(self, job, batches, steps):
        self.job, self.batches, self.steps = job, max(1, batches), steps
        self.names = job.stage_names or ["sampling"]
        self.run, self.start, self.last, self.closed = -1, 0, None, False

    def sampler(self, sampler):
        self.steps = len(sampler.timesteps(self.steps))
        return sampler

    def label(self, run):
        name = self.names[run % len(self.names)]
        return name if self.batches == 1 else f"{name} (batch {run // len(self.names) + 1}/{self.batches})"

    def __call__(self, i):
        job = self.job
        job.check_cancel()
        i = int(i)
        done = list(job.stages_done)
        if self.last is None or i <= self.last:
            if self.run >= 0 and not self.closed:
                done.append(self.label(self.run))
            self.run, self.start, self.closed = self.run + 1, i, False
        self.last = i
        steps = max(self.steps, i + 1)
        total = len(self.names) * self.batches
        within = (i - self.start + 1) / max(1, steps - self.start)
        progress = min(1.0, (self.run + within) / total)
        stage = self.label(self.run) + f" — step {i + 1}/{steps}"
        if i + 1 >= steps and not self.closed:  # the run's last step
            done.append(self.label(self.run))
            self.closed = True
        if progress >= 1.0:
            stage = "decoding"
        job.update(state="running", progress=progress, stage=stage, stages_done=done)


def stage_names_txt2img(method_cls, settings):
    from ldm.methods.cascade import CascadeMethod
    if issubclass(method_cls, CascadeMethod):
        stages = method_cls.stages_of(settings)
        return [f"stage {k}/{len(stages)}: {h}×{w}" for k, (h, w) in enumerate(stages, start=1)]
    h, w = settings.sample_size or settings.size
    return [f"{method_cls.label or method_cls.name}: {h}×{w}"]


def stage_names_img2img(method_cls, plan):
    if plan["stages"] is not None:
        n, entry = len(method_cls.stages_of(plan["settings"])), plan["entry"]
        if plan["t_enc"] == 0:
            return []
        return [f"stage {entry + k + 1}/{n}: {h}×{w}" for k, (h, w) in enumerate(plan["stages"]) if k > 0]
    h, w = plan["size"]
    return [f"{method_cls.label or method_cls.name} img2img: {h}×{w}"] if plan["t_enc"] else []


class Runner:
    """The jobs of all sessions, run one at a time in background threads."""

    def __init__(self, catalog, device="auto", cache=None, keep=KEEP_JOBS_PER_SESSION, log=None):
        self.catalog, self.device = catalog, device
        self.cache = cache if cache is not None else ModelCache()
        self.keep = keep
        self.log = log or sys.stderr
        self.run_lock = threading.Lock()
        self._lock = threading.Lock()
        self._jobs = OrderedDict()  # id -> Job

    # -- the sessions' job tables ---------------------------------------------------------------------------

    def job(self, session, job_id):
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None or job.session != session:
            raise KeyError(job_id)
        return job

    def job_by_id(self, job_id):
        """A job by its (unguessable) id alone: the image URLs."""
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise KeyError(job_id)
        return job

    def jobs_of(self, session):
        with self._lock:
            return [j for j in self._jobs.values() if j.session == session]

    def cancel(self, session, job_id):
        job = self.job(session, job_id)
        job.cancel_event.set()
        if job.state == "queued":
            job.update(stage="cancelling")
        return job

    def _add(self, job):
        with self._lock:
            self._jobs[job.id] = job
            mine = [j for j in self._jobs.values() if j.session == job.session and j.finished]
            for old in mine[:max(0, len(mine) - self.keep)]:
                del self._jobs[old.id]
            ended = [j for j in self._jobs.values() if j.finished]
            for old in ended[:max(0, len(ended) - KEEP_JOBS)]:
                del self._jobs[old.id]

    # -- submitting ---------------------------------------------------------------------------------------

    def submit_txt2img(self, session, form):
        """A generation job from the page's form (UsageError, before anything runs, for bad input)."""
        from ldm.app import forms
        from ldm.pipelines import txt2img
        with collect_warnings() as caught:
            model, argv, opt = forms.parse_txt2img(form, self.catalog, self.device)
            plan = txt2img.plan_run(opt)
            _, data = txt2img.prompt_batches(opt)
        method_cls, settings = plan[3], plan[4]
        h, w = settings.size
        job = Job(session, "txt2img", model, argv, f"{method_cls.label or method_cls.name} {h}×{w}",
                  stage_names_txt2img(method_cls, settings))
        job.warnings = caught

        def work(progress):
            return [Result(img, meta, stages) for img, meta, stages in
                    txt2img.generate(opt, loader=self.cache.load, callback=progress, plan=plan,
                                                       wrap_sampler=progress.sampler)]
        return self._start(job, work, batches=opt.n_iter * len(data), steps=opt.steps)

    def submit_img2img(self, session, form):
        """An upscale job of one of this session's images (``source``: job id, ``index``)."""
        from ldm.app import forms
        from ldm.pipelines import upscale
        try:
            source = self.job(session, str(form.get("source", "")))
            result = source.results[int(form.get("index", 0))]
        except (KeyError, IndexError, ValueError):
            raise UsageError("the image to upscale is no longer here (generate it again)") from None
        folder = tempfile.TemporaryDirectory(prefix="ldm-app-")
        try:
            path = Path(folder.name) / f"{source.id[:8]}-{int(form.get('index', 0))}.png"
            path.write_bytes(result.png)
            with collect_warnings() as caught:
                argv, opt, parser = forms.parse_img2img(form, self.catalog, source.model, path, self.device)
                planned = upscale.plan_img2img(opt, parser)
        except BaseException:
            folder.cleanup()
            raise
        method_cls, plan = planned[3], planned[4][0]
        h, w = plan["size"]
        (ih, iw), label = plan["input_size"], method_cls.label or method_cls.name
        job = Job(session, "img2img", source.model, argv, f"upscale {ih}×{iw} → {h}×{w}, {label}",
                  stage_names_img2img(method_cls, plan))
        job.warnings = caught
        job.cleanup = folder.cleanup

        def work(progress):
            runs = upscale.img2img_runs(opt, planned, loader=self.cache.load, callback=progress,
                                        wrap_sampler=progress.sampler)
            return [Result(img, meta) for results in runs for img, meta in results]
        return self._start(job, work, batches=1, steps=opt.steps)

    def _start(self, job, work, batches, steps):
        self._add(job)
        threading.Thread(target=self._run, args=(job, work, Progress(job, batches, steps)), daemon=True,
                         name=f"job-{job.id[:6]}").start()
        return job

    def _run(self, job, work, progress):
        t0 = time.time()
        locked = False
        try:
            while not self.run_lock.acquire(timeout=0.05):
                job.check_cancel()
            locked = True
            job.check_cancel()
            job.update(state="loading", stage="loading the model")
            with collect_warnings() as caught:
                try:
                    results = work(progress)
                finally:
                    job.update(warnings=job.warnings + caught)
            job.update(results=results, state="done", stage="done", progress=1.0)
        except Cancelled:
            job.update(state="cancelled", stage="cancelled", error=None)
        except UsageError as err:
            job.update(state="error", stage="error", error=str(err))
        except Exception as err:  # noqa: BLE001 - shown as a message; the traceback goes to the server's log
            from ldm.checkpoint import CheckpointError
            if isinstance(err, CheckpointError):
                job.update(state="error", stage="error", error=str(err))
            else:
                print(f"job {job.id} ({' '.join(job.argv)}) failed:", file=self.log)
                traceback.print_exc(file=self.log)
                job.update(state="error", stage="error",
                           error=f"internal error ({type(err).__name__}: {err}); the server's log has the details")
        finally:
            if locked:
                self.run_lock.release()
            if job.cleanup is not None:
                job.cleanup()
            job.update(elapsed=round(time.time() - t0, 2))
