"""Sampling jobs of a selected spec (:func:`plan`: one job per distinct ``txt2img.py --sweep`` command), their
completion markers, the prompt files and rendered references they need, and the run records the job runner
writes (time per image, peak memory)."""
from __future__ import annotations

import datetime
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .spec import BASE, PRESET_FLAGS, sampler_flags, REPO_ROOT, SAFETY_FLAGS, Model, Row, Spec, SpecError, Table, _rel, _slug


# --------------------------------------------------------------------------------------------------
# jobs
# --------------------------------------------------------------------------------------------------
@dataclass
class Job:
    id: str
    table: str
    model: Model
    H: int
    W: int
    method: str
    preset: Optional[str]
    options: List[str]
    role: str                      # "row" | "base"
    prompts_file: Path
    n_images: int
    argv: List[str]                # scripts/txt2img.py arguments, --outdir included
    outdir: Path
    rows: List[str] = field(default_factory=list)
    key: Dict = field(default_factory=dict)      # what the job samples (paths, settings): its identity
    content: Dict = field(default_factory=dict)  # the versions of its files and code (ldm.pipelines.content)

    @property
    def samples(self) -> Path:
        return self.outdir / "samples"

    def describe(self) -> str:
        what = "base-resolution reference" if self.role == BASE else self.method
        return f"{self.model.name} {self.W}x{self.H} {what}" + (f" ({Path(self.preset).name})" if self.preset else "")


@dataclass
class Plan:
    spec: Spec
    out: Path
    jobs: List[Job]
    row_job: Dict[str, Job]
    base_job: Dict[Tuple[str, str], Job]       # (table id, model name) -> job
    prompt_files: Dict[str, Tuple[Path, List[str]]]
    dataset_refs: Dict[Tuple[str, str], Path]  # (table id, reference name) -> folder
    safety: List[str] = field(default_factory=list)  # --trust_config / --unsafe_load of the user's command line

    def reference_folder(self, table: Table, row: Row, ref: str) -> Path:
        if ref == BASE:
            return self.base_job[(table.id, row.model)].samples
        r = table.references[ref]
        if r.kind == "dataset":
            return self.dataset_refs[(table.id, ref)]
        return _rel(r.folder)


def base_size(spec: Spec, model: Model, trust: bool = False) -> Tuple[int, int]:
    """(H, W) of the model's base-resolution samples: ``base_size`` in the spec, else the config's latent
    size times the first-stage factor (512 for SD 1.x/2.x-base, 1024 for SDXL, 32 for the demo model).
    ``trust``: --trust_config of the user's command line (never the spec's)."""
    if model.base_size:
        return model.base_size
    from ldm.util import ConfigError, load_config_file
    try:  # read and checked as txt2img.py will (a config it would refuse stops the plan, before any sampling)
        cfg = load_config_file(_rel(model.config), trust=trust)
    except ConfigError as err:
        raise SpecError(f"models.{model.name}: {err}") from None
    params = cfg.model.params
    fs = params.first_stage_config
    f = 2 ** (len(fs.params.ddconfig.ch_mult) - 1) if "ddconfig" in fs.get("params", {}) else 1
    side = int(params.get("image_size", 64)) * f
    return (side, side)


def _job_id(job_key: Dict, slug: str) -> str:
    digest = hashlib.sha256(json.dumps(job_key, sort_keys=True).encode()).hexdigest()[:10]
    return f"{_slug(slug)}-{digest}"


def identity(key: Dict) -> str:
    """sha256 of a job's key (what it samples, whatever the versions of its files and code)."""
    return hashlib.sha256(json.dumps(_normalise(key), sort_keys=True).encode()).hexdigest()


class _ContentKeys:
    """The content key of each job's txt2img command (:func:`ldm.pipelines.content.content_keys`), from the
    command as txt2img parses it: the checkpoint, config, preset and the files it names, files named by options,
    the method's code."""

    def __init__(self):
        from ldm.pipelines.txt2img import build_parser
        self.parser = build_parser()
        self.parser.allow_abbrev = False

        def error(message):
            raise SpecError(f"a job's command: {message}")

        self.parser.error = error

    def __call__(self, method: str, argv: List[str]) -> Dict:
        from ldm import methods
        from ldm.pipelines.content import content_keys
        opt, _ = self.parser.parse_known_args(argv)
        return content_keys(opt, methods.method_class(method), base=REPO_ROOT)


def plan(spec: Spec, out, device: str = "auto", prompts_cache: Optional[Dict] = None,
         safety: Sequence[str] = ()) -> Plan:
    """Sampling jobs of the selected rows (deduplicated) and the references they need. Nothing is written.
    ``safety``: the flags that lower safety given on the user's command line (``--trust_config``,
    ``--unsafe_load``): every job gets them; they do not change the images, so they are not part of a job's key."""
    out = Path(out)
    safety = list(safety)
    bad = [f for f in safety if f not in SAFETY_FLAGS]
    if bad:
        raise ValueError(f"plan(safety=...): {bad} are not safety flags ({sorted(SAFETY_FLAGS)})")
    jobs: Dict[str, Job] = {}
    row_job, base_job, prompt_files, dataset_refs = {}, {}, {}, {}
    content_of = _ContentKeys()
    for t in spec.tables:
        s = t.sampler  # the spec's sampler, or the table's own
        try:
            prompts = t.prompt_list()
        except SpecError:
            prompts = None  # the dry run still plans (and reports the missing file); running stops before sampling
        pdigest = hashlib.sha256(json.dumps(prompts if prompts is not None else [str(t.prompts), t.images])
                                 .encode()).hexdigest()
        pfile = out / "prompts" / f"{_slug(t.id)}-{pdigest[:10]}.txt"
        prompt_files[t.id] = (pfile, prompts)

        def add(role, model, H, W, method, preset, options, row=None, preset_flag=None):
            m = spec.models[model]
            key = {"config": m.config, "ckpt": m.ckpt, "H": H, "W": W, "method": method, "preset": preset,
                   "options": list(spec.common_options) + list(options), "seed": spec.seed, "sampler": s,
                   "prompts_sha256": pdigest, "images": t.images}
            slug = f"{model}-{W}x{H}-" + ("base" if role == BASE else method + (f"-{Path(preset).stem}" if preset else ""))
            digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
            if digest not in jobs:  # the same sampling for another row (or the base reference): the same job
                argv = ["--sweep", "--from-file", str(pfile), "--config", str(_rel(m.config)), "--ckpt",
                        str(_rel(m.ckpt)), "--H", str(H), "--W", str(W), "--method", method,
                        "--steps", str(s["steps"]), *sampler_flags(s), "--scale", repr(float(s["scale"])),
                        "--seed", str(spec.seed), "--n_samples", str(s["batch_size"]), "--n_iter", "1",
                        "--precision", s["precision"], "--negative_prompt", s["negative_prompt"],
                        "--device", device]
                if preset:
                    argv += [preset_flag or PRESET_FLAGS.get(method, f"--{method}_config"), str(_rel(preset))]
                argv += list(spec.common_options) + list(options) + safety
                # the folder of a job is that of one version of its files and code: another version is another job
                # (a replaced checkpoint, an edited preset never reuses the images of the old one)
                content = content_of(method, argv)
                jid = _job_id({"key": key, "content": content}, slug)
                jdir = out / "jobs" / jid
                argv += ["--outdir", str(jdir)]
                jobs[digest] = Job(jid, t.id, m, H, W, method, preset, list(options), role, pfile, t.images, argv,
                                   jdir, key=key, content=content)
            if row is not None:
                jobs[digest].rows.append(row.qid)
            return jobs[digest]

        if BASE in {c.reference for c in t.columns}:  # first, so that a row sampling the same is this job too
            for model in dict.fromkeys(r.model for r in t.rows):
                bh, bw = base_size(spec, spec.models[model], trust="--trust_config" in safety)
                base_job[(t.id, model)] = add(BASE, model, bh, bw, "direct", None, [])
        for row in t.rows:
            row_job[row.qid] = add("row", row.model, row.H, row.W, row.method, row.preset, row.options, row,
                                   row.preset_flag)
        for c in t.columns:
            if c.reference and c.reference != BASE:
                r = t.references[c.reference]
                if r.kind == "dataset":
                    ds = r.dataset
                    dataset_refs[(t.id, r.name)] = (out / "references" / f"{ds['dataset']}{ds['size']}-n{ds['n']}-"
                                                    f"seed{ds['seed']}-code{_dataset_code()[:8]}")
    return Plan(spec, out, list(jobs.values()), row_job, base_job, prompt_files, dataset_refs, safety)


def expected_files(job: Job) -> List[str]:
    from ldm.pipelines.sweep import image_name
    return [image_name(p, 0) for p in range(job.n_images)]


def images_present(job: Job) -> int:
    if not job.samples.is_dir():
        return 0
    have = set(os.listdir(job.samples))
    return sum(1 for f in expected_files(job) if f in have)


COMPLETE_FILE = "complete.json"
RUNS_FILE = "runs.jsonl"


def job_complete(job: Job) -> bool:
    """A finished job: its completion marker (written after a successful sweep) is there and so is every
    image of its work list. Anything less re-runs the sweep, which renders only what is missing."""
    marker = job.outdir / COMPLETE_FILE
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except ValueError:
        return False
    return info.get("key") == _normalise(job.key) and info.get("content") == _normalise(job.content) and \
        images_present(job) == job.n_images


def _dataset_code() -> str:
    """The code version of the rendered references (ldm/data/shapes.py): a change renders them again."""
    import ldm.data.shapes
    from ldm.pipelines.content import module_digest
    return module_digest(ldm.data.shapes.__file__)


JOB_FILE = "job.json"


def earlier_versions(job: Job) -> List[Tuple[Path, Optional[Dict]]]:
    """The folders in the job's output folder of the same job (the same key) made from other versions of its
    files or code: (folder, its content key, None if it was made before content keys were recorded), the latest
    first."""
    found = []
    prefix = job.id.rsplit("-", 1)[0] + "-"
    want = identity(job.key)
    jobs_dir = job.outdir.parent
    if not jobs_dir.is_dir():
        return found
    for d in jobs_dir.iterdir():
        if d == job.outdir or not d.name.startswith(prefix) or not (d / JOB_FILE).is_file():
            continue
        try:
            info = json.loads((d / JOB_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(info, dict) and isinstance(info.get("key"), dict) and identity(info["key"]) == want:
            found.append((d.stat().st_mtime, d, info.get("content")))
    return [(d, c) for _, d, c in sorted(found, key=lambda x: -x[0])]


def _normalise(obj):
    return json.loads(json.dumps(obj, sort_keys=True))


def write_text_atomic(path: Path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def materialize_prompts(p: Plan):
    """Write each table's prompt file (the first N prompts, one per line) if it is not there already."""
    for tid, (path, prompts) in p.prompt_files.items():
        if prompts is None:
            t = next(t for t in p.spec.tables if t.id == tid)
            t.prompt_list()  # raises the SpecError that explains what is missing
        text = "".join(pr + "\n" for pr in prompts)
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            write_text_atomic(path, text)


def render_dataset_references(p: Plan, log=print):
    """Render the ``dataset: shapes`` references (training-distribution images, drawn here) once."""
    from PIL import Image

    from ldm.data.shapes import ShapesDataset
    for (tid, name), folder in p.dataset_refs.items():
        ref = next(t for t in p.spec.tables if t.id == tid).references[name]
        ds = ref.dataset
        names = [f"{i:06d}.png" for i in range(ds["n"])]
        if folder.is_dir() and set(names) <= set(os.listdir(folder)):
            continue
        folder.mkdir(parents=True, exist_ok=True)
        data = ShapesDataset(size=ds["size"], length=ds["n"], seed=ds["seed"])
        for i, n in enumerate(names):
            if not (folder / n).is_file():
                img = data.render(i)[0]
                tmp = folder / f".{n}.tmp.png"
                Image.fromarray(img).save(tmp)
                os.replace(tmp, folder / n)
        log(f"rendered reference {name}: {ds['n']} images of ldm.data.shapes at {ds['size']}x{ds['size']} "
            f"(seed {ds['seed']}) -> {folder}")


# --------------------------------------------------------------------------------------------------
# run records (written by the job runner), time per image and peak memory
# --------------------------------------------------------------------------------------------------
def read_runs(job: Job) -> List[Dict]:
    path = job.outdir / RUNS_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def job_stats(job: Job) -> Dict:
    """Time per image (device-seconds: wall time of the sampling command x its processes, over the images it
    wrote) and peak memory (largest over runs and processes) from the job's run records.

    Only runs that finished (every process with exit status 0) make ``seconds_per_image``: the records of an
    interrupted run (a stop, Ctrl-C, an error) are never summed with those of the run that completes the job
    after it (the stopped run's time went partly into images it did not finish). Their own figure, for the dry
    run's estimate of a job that has not finished, is ``interrupted_seconds_per_image``. The images a run wrote are
    what its processes wrote (``generated_by: process``); older records count the images that appeared in the
    folder during the run (rank 0)."""
    runs = read_runs(job)
    by_run: Dict[str, List[Dict]] = {}
    for r in runs:
        by_run.setdefault(r.get("run", "?"), []).append(r)
    cpu = 0.0
    timed = {True: [0.0, 0], False: [0.0, 0]}  # finished?: [device-seconds, images]
    interrupted = 0
    peak, kind, devices, machines = None, None, set(), set()
    for recs in by_run.values():
        finished = all(r.get("rc") == 0 for r in recs)
        interrupted += not finished
        if all(r.get("generated_by") == "process" for r in recs):
            gen = sum(int(r.get("generated") or 0) for r in recs)
        else:
            gen = max(int(r.get("generated") or 0) for r in recs)
        cpu += sum(float(r.get("cpu_s") or 0.0) for r in recs)
        if gen > 0:
            timed[finished][0] += sum(float(r.get("wall_s", 0.0)) for r in recs)
            timed[finished][1] += gen
        for r in recs:
            if r.get("peak_memory_bytes") is not None and (peak is None or r["peak_memory_bytes"] > peak):
                peak, kind = r["peak_memory_bytes"], r.get("peak_memory_kind")
            if r.get("device_name"):
                devices.add(r["device_name"])
            if r.get("machine"):
                machines.add(r["machine"])
    (seconds, generated), (i_seconds, i_generated) = timed[True], timed[False]
    return {"seconds_per_image": seconds / generated if generated else None, "images_timed": int(generated),
            "device_seconds": seconds + i_seconds, "cpu_seconds": cpu, "peak_memory_bytes": peak,
            "peak_memory_kind": kind, "devices": sorted(devices), "machines": sorted(machines), "runs": len(by_run),
            "runs_interrupted": interrupted,
            "interrupted_seconds_per_image": i_seconds / i_generated if i_generated else None,
            "images_timed_interrupted": int(i_generated)}


def machine_description(device: str = "cpu") -> str:
    from ldm.reports import machine_description as describe
    return describe(device)


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
