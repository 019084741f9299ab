"""Deterministic, resumable sampling sweeps on one process or many (``torchrun``, any number of nodes).

``scripts/txt2img.py --sweep`` (implied when launched by torchrun) turns a prompt list into a fixed
work list and renders it so that the set of output files does not depend on how many processes share
the work:

* **Work list.** Prompt ``p`` (0-based index of the non-empty line of ``--from-file``, or 0 for
  ``--prompt``) gets ``K`` samples ``k = 0 .. K-1``; image ``g = p * K + k`` is written to
  ``OUTDIR/samples/{p:06d}_{k:03d}.png`` (:func:`image_name`).
* **Seeds.** Image (p, k) has its own seed :func:`derive_seed` ``(seed, p, k)`` (``seed`` = ``--seed``;
  with ``--fixed_code`` p is taken as 0, so every prompt gets the same noise for the same k). A CPU
  ``torch.Generator`` seeded with it draws the image's starting latent and then, with ``eta > 0``, its
  per-step DDIM noise (``DDIMSampler.sample(generator=[...])``, one generator per batch element), so
  the noise of an image depends on nothing else.
* **Batches.** The work list, in index order, is cut into batches of ``--n_samples`` images *before*
  it is shared out, and batch ``b`` is always rendered whole. Every image is therefore computed in the
  same batch, at the same position, whatever the number of processes -- batched kernels may give
  slightly different floats for other batch compositions, so this is what makes 1, 2 or 64 processes
  produce the same files bit for bit (on the same hardware, software and thread count).
* **Sharing.** Rank 0 lists the batches that still have a missing (or damaged) image and broadcasts the
  list; rank ``r`` of ``W`` renders entries ``r, r + W, r + 2W, ...`` of it.
* **Resuming.** An image is complete when its PNG exists and checks out: it decodes fully, has the
  sweep's width and height, and has the sha256 that ``manifest.jsonl`` recorded for it (if it did).
  PNGs are written to a temporary file, fsync'ed and renamed (``ldm.inference.save_png``), so a killed
  job (or a power loss) never leaves a partial one; a damaged file (copied in part, cut short by a full
  disk, ...) is re-rendered, and the log names it. A restarted job re-renders only batches with a
  missing or damaged image and writes only those files. ``OUTDIR/sweep.json`` records the settings that
  determine the pixels; a restart with different settings is refused.
* **Several jobs on one folder.** Short critical sections run under an exclusive ``flock`` of
  ``OUTDIR/.sweep.lock``: the settings check, the clean-up of what killed jobs left, claiming a batch,
  writing the manifest. A job whose settings differ from ``sweep.json`` is refused (:class:`UsageError`,
  exit 2). A second job with the same settings shares the work: a rank renders a batch only after
  claiming it (``OUTDIR/.sweep-claims/NNNNNN``, made under the lock, removed once the batch is written),
  skips batches another live job has claimed, and at the end waits until those are written (or takes
  them over if their job died); so no image is rendered twice and every job ends with a complete sweep.
  Every rank of a job holds a shared ``flock`` on ``OUTDIR/.sweep-jobs/<job id>.lock`` while it runs. A
  job whose file nobody holds has ended; only then are its claims and its temporary files (named
  ``.tmp-<job id>-*``) removed. See docs/cluster.md, also for network file systems.
* **Manifest.** At the end rank 0 rewrites ``OUTDIR/manifest.jsonl`` atomically from the work list and
  the files present: one JSON line per image (index, file, prompt, seed, settings, sha256 of the file),
  in index order, never with duplicates.

No grid is written in sweep mode. See docs/cluster.md.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import io
import json
import os
import re
import secrets
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image

from ldm.inference import UsageError, create_temp_file, fsync_directory, positive_float, save_png

try:
    import fcntl
except ImportError:  # not POSIX: no folder locking (see _flock)
    fcntl = None

SWEEP_FORMAT = "scalecrafter-sweep-v1"
SEED_DERIVATION = ("seed(p, k) = int.from_bytes(sha256(f'scalecrafter-sweep:{seed}:{p}:{k}')[:8], 'little') "
                   "& (2**63 - 1)")
SETTINGS_FILE = "sweep.json"
MANIFEST_FILE = "manifest.jsonl"
KILL_AFTER_ENV = "SCALECRAFTER_SWEEP_KILL_AFTER"  # test hook: SIGKILL this process after N written images
# settings recorded for information only: they do not change the pixels (a restart may change them)
NON_DETERMINING = ("device",)
LOCK_FILE = ".sweep.lock"  # flock'ed exclusively around the short critical sections
JOBS_DIR = ".sweep-jobs"  # <job id>.lock per running job, flock'ed shared by each of its ranks
CLAIMS_DIR = ".sweep-claims"  # NNNNNN (batch number) while a job renders that batch
POLL_SECONDS = 5.0  # how often a job that waits for another job's batches looks again
_TMP_OWNER = re.compile(r"^\.tmp-([0-9a-f]{16})-")  # temporary file names of a job: .tmp-<job id>-...
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the last chunk of every complete PNG


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
def add_sweep_args(parser):
    g = parser.add_argument_group(
        "sweeps (deterministic, resumable, multi-process with torchrun; see docs/cluster.md)")
    g.add_argument("--sweep", action="store_true",
                   help="per-image seeds and file names from (seed, prompt index, sample index), skip images "
                        "already written, write manifest.jsonl; implied under torchrun. Images per prompt: "
                        "n_iter x repeat with --from-file, n_iter x n_samples with --prompt; n_samples is the "
                        "batch size. No grid")
    g.add_argument("--dist_backend", choices=["auto", "nccl", "gloo"], default="auto",
                   help="torch.distributed backend under torchrun (auto: nccl on CUDA, gloo on CPU)")
    g.add_argument("--dist_timeout", type=positive_float, default=720.0,
                   help="minutes a process may wait for the others (model loading, the final barrier)")
    return g


def launched_by_torchrun(env=None) -> bool:
    env = os.environ if env is None else env
    return "RANK" in env and "WORLD_SIZE" in env and "MASTER_ADDR" in env


def rank_device(device: torch.device) -> torch.device:
    """Under torchrun, CUDA work goes to ``cuda:LOCAL_RANK`` (one GPU per process); CPU stays CPU."""
    if device.type != "cuda" or not launched_by_torchrun():
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    n = torch.cuda.device_count()
    if local_rank >= n:
        raise UsageError(f"LOCAL_RANK {local_rank} but this node has {n} CUDA device(s): start at most {n} "
                         "processes per node (torchrun --nproc_per_node)")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


# --------------------------------------------------------------------------------------------
# work list
# --------------------------------------------------------------------------------------------
def derive_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The seed of image (prompt_index, sample_index) of a sweep with base ``seed`` (see SEED_DERIVATION).

    A hash rather than ``seed + index``, so that neighbouring base seeds do not share images."""
    digest = hashlib.sha256(f"scalecrafter-sweep:{int(seed)}:{int(prompt_index)}:{int(sample_index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def image_name(prompt_index: int, sample_index: int) -> str:
    return f"{prompt_index:06d}_{sample_index:03d}.png"


@dataclass(frozen=True)
class WorkItem:
    index: int  # global image index p * K + k
    prompt_index: int
    sample_index: int
    prompt: str
    seed: int
    file: str  # name inside OUTDIR/samples


def make_work_list(prompts: Sequence[str], samples_per_prompt: int, seed: int,
                   fixed_code: bool = False) -> List[WorkItem]:
    if samples_per_prompt < 1:
        raise UsageError("a sweep needs at least one sample per prompt (--n_iter, --repeat, --n_samples >= 1)")
    items = []
    for p, prompt in enumerate(prompts):
        for k in range(samples_per_prompt):
            items.append(WorkItem(p * samples_per_prompt + k, p, k, prompt,
                                  derive_seed(seed, 0 if fixed_code else p, k), image_name(p, k)))
    return items


def make_batches(items: Sequence[WorkItem], batch_size: int) -> List[List[WorkItem]]:
    """Consecutive batches of the global work list: the same for every number of processes."""
    if batch_size < 1:
        raise UsageError("--n_samples (the batch size) must be at least 1")
    return [list(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]


def shard(batch_ids: Sequence[int], rank: int, world_size: int) -> List[int]:
    """The share of rank ``rank``: every ``world_size``-th entry, starting at ``rank``."""
    return list(batch_ids[rank::world_size])


def prompts_digest(prompts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(prompts), ensure_ascii=False).encode()).hexdigest()


def _normalise(obj):
    return json.loads(json.dumps(obj, sort_keys=True))


def fingerprint(settings: Dict, prompts: Sequence[str], samples_per_prompt: int, batch_size: int) -> Dict:
    """What determines the pixels of every image of the sweep (checked when a sweep is resumed)."""
    return _normalise({
        "format": SWEEP_FORMAT, "seed_derivation": SEED_DERIVATION,
        "settings": {k: v for k, v in settings.items() if k not in NON_DETERMINING},
        "num_prompts": len(prompts), "prompts_sha256": prompts_digest(prompts),
        "samples_per_prompt": samples_per_prompt, "batch_size": batch_size,
    })


def _diff(old, new, prefix=""):
    if isinstance(old, dict) or isinstance(new, dict):
        if (old is None or isinstance(old, dict)) and (new is None or isinstance(new, dict)):
            old, new = old or {}, new or {}
            out = []
            for k in sorted(set(old) | set(new)):
                out += _diff(old.get(k), new.get(k), f"{prefix}{k}.")
            return out
    return [] if old == new else [f"{prefix[:-1]}: {old!r} before, {new!r} now"]


def _describe_changes(old: Dict, new: Dict) -> str:
    """What differs between two fingerprints: the files and code first (ldm.pipelines.content), then settings."""
    from ldm.pipelines.content import describe_changes
    o_set, n_set = old.get("settings") or {}, new.get("settings") or {}
    parts = []
    if "content" in n_set and o_set.get("content") != n_set["content"]:
        parts = describe_changes(o_set.get("content"), n_set["content"])
        if "content" not in o_set:
            parts = ["the sweep was started before the versions of its files and code were recorded, so images "
                     "of another checkpoint, config, preset or method code could be mixed in"]
    rest = _diff({**old, "settings": {k: v for k, v in o_set.items() if k != "content"}},
                 {**new, "settings": {k: v for k, v in n_set.items() if k != "content"}})
    parts += rest[:6] + (["..."] if len(rest) > 6 else [])
    return "; ".join(parts)


def _write_atomic(path: Path, text: str, tmp_prefix: str = ".tmp-"):
    """Temp file + fsync + rename + fsync of the folder: the file is the old or the new one, never empty;
    the permissions of a normal new file (0666 minus the umask)."""
    fd, tmp = create_temp_file(path.parent, tmp_prefix, path.suffix)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    fsync_directory(path.parent)


# --------------------------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------------------------
class DistContext:
    """rank / world size and the two collectives a sweep needs; a no-op without torchrun."""

    def __init__(self, device: torch.device, backend: str = "auto", timeout_min: float = 720.0):
        self.enabled = launched_by_torchrun()
        self.rank, self.world_size, self.device = 0, 1, device
        self._owns_group = False
        if not self.enabled:
            return
        import torch.distributed as dist
        self.dist = dist
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl" and device.type != "cuda":
            raise UsageError("--dist_backend nccl needs CUDA devices; use gloo (or auto) on CPU")
        self.backend = backend
        if not dist.is_initialized():
            kwargs = {"device_id": device} if backend == "nccl" else {}
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_min), **kwargs)
            self._owns_group = True
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def broadcast(self, obj):
        """``obj`` of rank 0, on every rank."""
        if not self.enabled:
            return obj
        box = [obj if self.rank == 0 else None]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self):
        if self.enabled:
            if self.backend == "nccl":
                self.dist.barrier(device_ids=[self.device.index])
            else:
                self.dist.barrier()

    def close(self):
        if self.enabled and self._owns_group and self.dist.is_initialized():
            self.dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# several jobs on one folder: locks, job registry, batch claims
# --------------------------------------------------------------------------------------------
_NO_LOCK_ERRNOS = {errno.ENOLCK, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", -1)}
_warned_no_locks = set()


def _flock(fd: int, op: str, folder: Path) -> bool:
    """``fcntl.flock(fd, LOCK_<op>)``; False where the file system (or the OS) has no such locks, with a
    warning once per folder. Raises BlockingIOError for a non-blocking request that would block."""
    reason = None
    if fcntl is None:
        reason = "this OS has no fcntl.flock"
    else:
        flags = 0
        for part in op.split("|"):
            flags |= getattr(fcntl, f"LOCK_{part}")
        try:
            fcntl.flock(fd, flags)
            return True
        except BlockingIOError:
            raise
        except OSError as err:
            if err.errno not in _NO_LOCK_ERRNOS:
                raise
            reason = err.strerror or str(err)
    if str(folder) not in _warned_no_locks:
        _warned_no_locks.add(str(folder))
        print(f"[sweep] warning: no file locks in {folder} ({reason}): jobs sharing this --outdir are not "
              "kept apart; run one job per --outdir at a time (see docs/cluster.md)", file=sys.stderr, flush=True)
    return False


def _open_flags(*extra) -> int:
    flags = getattr(os, "O_CLOEXEC", 0)
    for f in extra:
        flags |= f
    return flags


@contextlib.contextmanager
def folder_lock(outdir: Path):
    """Exclusive lock of ``OUTDIR/.sweep.lock`` (every job, every rank) for the short critical sections."""
    fd = os.open(Path(outdir) / LOCK_FILE, _open_flags(os.O_RDONLY, os.O_CREAT), 0o666)  # flock needs no write
    try:
        _flock(fd, "EX", Path(outdir))
        yield
    finally:
        os.close(fd)  # releases the lock


def _pid_running(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError, TypeError):
        return isinstance(pid, int)
    return True


def _job_path(outdir: Path, job: str) -> Path:
    return outdir / JOBS_DIR / f"{job}.lock"


def _job_info(outdir: Path, job: str) -> Dict:
    try:
        return json.loads(_job_path(outdir, job).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _describe_job(info: Dict) -> str:
    if not info:
        return "a job that has not said where it runs"
    return f"host {info.get('host', '?')}, pid {info.get('pid', '?')}, started {info.get('started', '?')}"


def _job_alive(outdir: Path, job: Optional[str], own_job: str) -> bool:
    """Whether a rank of job ``job`` still runs: someone holds the flock of its job file. Without flock
    support: its process is alive on this host (a job on another host then counts as ended)."""
    if job is None:
        return False
    if job == own_job:
        return True
    try:
        fd = os.open(_job_path(outdir, job), _open_flags(os.O_RDONLY))
    except FileNotFoundError:
        return False
    try:
        try:
            if _flock(fd, "EX|NB", outdir):
                return False  # nobody holds it: every rank of that job has exited
        except BlockingIOError:
            return True
        info = _job_info(outdir, job)
        return info.get("host") == socket.gethostname() and _pid_running(info.get("pid"))
    finally:
        os.close(fd)


class _JobFile:
    """This job's entry in ``OUTDIR/.sweep-jobs``: a shared flock held by each of its ranks while it runs."""

    def __init__(self, outdir: Path, job: str):
        self.outdir, self.job, self.fd = outdir, job, None

    def create(self, world_size: int):  # rank 0, under folder_lock
        (self.outdir / JOBS_DIR).mkdir(exist_ok=True)
        info = {"host": socket.gethostname(), "pid": os.getpid(), "world_size": world_size,
                "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        self.fd = os.open(_job_path(self.outdir, self.job), _open_flags(os.O_RDWR, os.O_CREAT, os.O_EXCL), 0o666)
        _flock(self.fd, "SH", self.outdir)
        os.write(self.fd, (json.dumps(info) + "\n").encode())

    def attach(self):  # the other ranks, after rank 0 created it
        self.fd = os.open(_job_path(self.outdir, self.job), _open_flags(os.O_RDONLY))
        _flock(self.fd, "SH", self.outdir)

    def close(self, remove: bool = False):
        if remove:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(_job_path(self.outdir, self.job))
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _claim_owner(path: Path) -> Optional[str]:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("job")
    except (OSError, ValueError, AttributeError):
        return None


def _claim(outdir: Path, batch: int, job: str, rank: int) -> Optional[str]:
    """Claim batch ``batch`` for this job: None when it is ours now, else the id of the live job that has it.
    A claim of a job that has ended is taken over."""
    path = outdir / CLAIMS_DIR / f"{batch:06d}"
    with folder_lock(outdir):
        for _ in range(3):
            try:
                fd = os.open(path, _open_flags(os.O_WRONLY, os.O_CREAT, os.O_EXCL), 0o666)
            except FileExistsError:
                owner = _claim_owner(path)
                if owner == job:
                    return None
                if owner is not None and _job_alive(outdir, owner, job):
                    return owner
                with contextlib.suppress(FileNotFoundError):  # its job has ended (or it is unreadable)
                    os.unlink(path)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(json.dumps({"job": job, "rank": rank}) + "\n")
            return None
    return _claim_owner(path) or "?"


def _release(outdir: Path, batch: int, job: str):
    path = outdir / CLAIMS_DIR / f"{batch:06d}"
    with folder_lock(outdir):
        if _claim_owner(path) == job:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def _live_jobs(outdir: Path, own_job: str) -> Dict[str, Dict]:
    """The other jobs in ``.sweep-jobs`` that still run: id -> what they wrote about themselves."""
    jobs_dir = outdir / JOBS_DIR
    names = os.listdir(jobs_dir) if jobs_dir.is_dir() else []
    return {n[:-5]: _job_info(outdir, n[:-5]) for n in sorted(names)
            if n.endswith(".lock") and n[:-5] != own_job and _job_alive(outdir, n[:-5], own_job)}


def _clean_up(outdir: Path, sample_dir: Path, own_job: str, live: Dict[str, Dict]):
    """Under folder_lock: remove what jobs that have ended left behind (job files, claims, temporary files).

    A temporary file is removed only when the job named in it has ended; one without a job id (an older
    version of this code) only when no other job runs."""
    jobs_dir, claims_dir = outdir / JOBS_DIR, outdir / CLAIMS_DIR
    for name in os.listdir(jobs_dir) if jobs_dir.is_dir() else []:
        if name.endswith(".lock") and name[:-5] != own_job and name[:-5] not in live:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(jobs_dir / name)
    for name in os.listdir(claims_dir) if claims_dir.is_dir() else []:
        owner = _claim_owner(claims_dir / name)
        if owner != own_job and owner not in live:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(claims_dir / name)
    for folder, suffixes in ((sample_dir, (".png",)), (outdir, (".json", ".jsonl"))):
        for name in os.listdir(folder):
            if not (name.startswith(".tmp-") and name.endswith(suffixes)):
                continue
            m = _TMP_OWNER.match(name)
            owner = m.group(1) if m else None
            if owner == own_job or owner in live or (owner is None and live):
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(folder / name)


# --------------------------------------------------------------------------------------------
# checking the images already there
# --------------------------------------------------------------------------------------------
def _signature(st: os.stat_result) -> Tuple[int, int, int]:
    """Identifies one version of a file: a re-written (renamed-over) file has another one."""
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def check_image(path, size: Optional[Tuple[int, int]] = None, sha256: Optional[str] = None):
    """``(problem, sha256 hex, signature)`` of the file at ``path``; problem is None for a good image.

    Good: not empty, a complete PNG (an IEND chunk at the end, chunk CRCs valid), decodes fully with PIL
    (``load()``), ``size`` = (width, height) if given, the ``sha256`` given (if any). Raises
    FileNotFoundError if there is no such file."""
    with open(path, "rb") as fh:
        sig = _signature(os.fstat(fh.fileno()))
        data = fh.read()
    digest = hashlib.sha256(data).hexdigest()
    if not data:
        return "empty file", digest, sig
    if data[:8] == b"\x89PNG\r\n\x1a\n" and not data.endswith(_PNG_END):
        return f"truncated PNG ({len(data)} bytes, no IEND chunk at the end)", digest, sig
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()  # chunk structure and CRCs
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # every pixel
            got = im.size
    except Exception as err:  # PIL raises many types for broken files
        return f"does not decode ({type(err).__name__}: {err})", digest, sig
    if size is not None and tuple(got) != tuple(size):
        return f"is {got[0]}x{got[1]}, not {size[0]}x{size[1]}", digest, sig
    if sha256 and digest != sha256:
        return "sha256 differs from the manifest's", digest, sig
    return None, digest, sig


def _manifest_hashes(outdir: Path) -> Dict[str, str]:
    """file name in samples/ -> sha256, from the lines of ``manifest.jsonl`` that have one (older
    manifests have none: their files are checked without a hash)."""
    path = outdir / MANIFEST_FILE
    hashes = {}
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return hashes
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("sha256"), str) and isinstance(rec.get("file"), str):
            hashes[os.path.basename(rec["file"])] = rec["sha256"]
    return hashes


def _image_size(settings: Dict, image_size) -> Optional[Tuple[int, int]]:
    if image_size is not None:
        return (int(image_size[0]), int(image_size[1]))
    w, h = settings.get("W"), settings.get("H")
    if isinstance(w, int) and isinstance(h, int) and not isinstance(w, bool) and not isinstance(h, bool):
        return (w, h)
    return None


# --------------------------------------------------------------------------------------------
# the sweep
# --------------------------------------------------------------------------------------------
def _plan(outdir: Path, batches: List[List[WorkItem]], fp: Dict, job: str, job_file: _JobFile, world_size: int,
          size: Optional[Tuple[int, int]]) -> Dict:
    """Rank 0: check/record the settings and register the job (under the folder lock), clear what ended
    jobs left, then check the images already there and list the batches to render."""
    sample_dir = outdir / "samples"
    sample_dir.mkdir(parents=True, exist_ok=True)
    settings_file = outdir / SETTINGS_FILE
    notes = []
    with folder_lock(outdir):
        live = _live_jobs(outdir, job)
        if settings_file.is_file():
            old = json.loads(settings_file.read_text(encoding="utf-8"))
            changes = _diff(old, fp)
            if changes:
                shown = _describe_changes(old, fp)
                running = "".join(f"; a job is rendering it now ({_describe_job(info)})" for info in live.values())
                raise UsageError(f"{outdir} holds a sweep made with other settings ({shown}){running}. "
                                 "Resume it with the original settings and files, or give a new --outdir (or delete "
                                 f"{settings_file} and its samples to start over)")
        else:
            _write_atomic(settings_file, json.dumps(fp, indent=1, sort_keys=True) + "\n", f".tmp-{job}-")
        job_file.create(world_size)
        (outdir / CLAIMS_DIR).mkdir(exist_ok=True)
        _clean_up(outdir, sample_dir, job, live)
    for info in live.values():
        notes.append(f"another job with the same settings is working in {outdir} ({_describe_job(info)}): "
                     "the batches are shared (each is rendered by the job that claims it first)")
    # checking the files needs no lock: they are only ever replaced whole (renamed over)
    names = {n for n in os.listdir(sample_dir) if not n.startswith(".tmp-")}
    expected = {it.file for b in batches for it in b}
    foreign = sorted(n for n in names if n.lower().endswith(".png") and n not in expected)
    if foreign:
        notes.append(f"{len(foreign)} PNG file(s) in {sample_dir} are not part of this sweep (e.g. {foreign[0]}); "
                     "keep each sweep in its own --outdir so that evaluations see only its images")
    hashes = _manifest_hashes(outdir)
    good, damaged = {}, {}
    for items in batches:
        for it in items:
            if it.file not in names:
                continue
            try:
                problem, digest, sig = check_image(sample_dir / it.file, size, hashes.get(it.file))
            except FileNotFoundError:
                continue
            if problem:
                damaged[it.file] = (problem, sig)
            else:
                good[it.file] = (sig, digest)
    todo = [b for b, items in enumerate(batches) if any(it.file not in good for it in items)]
    return {"todo": todo, "complete": len(good), "notes": notes, "damaged": damaged, "good": good}


def _manifest_lines(items: Sequence[WorkItem], settings: Dict, base_seed: int, sample_dir: Path,
                    known: Optional[Dict] = None, damaged: Optional[Dict] = None) -> List[str]:
    """One line per image present (and not the damaged file found at the start), with its sha256 (taken
    from ``known`` when the file is the one checked at the start, else computed)."""
    known, damaged = known or {}, damaged or {}
    lines = []
    for it in items:
        try:
            with open(sample_dir / it.file, "rb") as fh:
                sig = _signature(os.fstat(fh.fileno()))
                if it.file in damaged and tuple(damaged[it.file][1]) == sig:
                    continue  # still the damaged file
                if it.file in known and tuple(known[it.file][0]) == sig:
                    digest = known[it.file][1]
                else:
                    digest = hashlib.sha256(fh.read()).hexdigest()
        except FileNotFoundError:
            continue
        lines.append(json.dumps({"index": it.index, "file": f"samples/{it.file}", "prompt": it.prompt,
                                 "prompt_index": it.prompt_index, "sample_index": it.sample_index,
                                 "seed": it.seed, "base_seed": base_seed, "settings": settings, "sha256": digest},
                                sort_keys=True, ensure_ascii=False))
    return lines


def png_metadata(item: WorkItem, settings: Dict, samples_per_prompt: int) -> Dict:
    return {"prompt": item.prompt, "seed": str(item.seed),
            "parameters": {**settings, "sweep": {"index": item.index, "prompt_index": item.prompt_index,
                                                 "sample_index": item.sample_index,
                                                 "samples_per_prompt": samples_per_prompt,
                                                 "seed_derivation": SWEEP_FORMAT}}}


# the counts of the last sweep this process finished (run_sweep's result): the table runner's run records take the
# images a process wrote from here (another job sharing the folder writes images too); None until one finishes
last_result: Optional[Dict] = None


def run_sweep(render: Callable[[List[WorkItem]], List], prompts: Sequence[str], samples_per_prompt: int,
              batch_size: int, seed: int, outdir, settings: Dict, dist: Optional[DistContext] = None,
              fixed_code: bool = False, progress: bool = True, image_size: Optional[Tuple[int, int]] = None) -> Dict:
    """Render the sweep's missing images; ``render(items)`` returns one PIL image per item, in order.

    ``image_size`` = (width, height) of every image (default: ``settings["W"], settings["H"]`` when given),
    checked for the images already there. Returns counts for this rank: ``generated`` images written,
    ``batches`` rendered, ``skipped`` (images complete and intact before the start, whole sweep),
    ``damaged`` (images there before the start that failed the check, whole sweep), ``total`` images."""
    from tqdm import tqdm
    dist = dist or DistContext(torch.device("cpu"))
    rank, world = dist.rank, dist.world_size
    outdir = Path(outdir)
    sample_dir = outdir / "samples"
    items = make_work_list(prompts, samples_per_prompt, seed, fixed_code)
    batches = make_batches(items, batch_size)
    fp = fingerprint(settings, prompts, samples_per_prompt, batch_size)
    size = _image_size(settings, image_size)

    def log(msg, every_rank=False):
        if rank == 0 or every_rank:
            print(f"[sweep rank {rank}/{world}] {msg}" if world > 1 else f"[sweep] {msg}", flush=True)

    plan, local = None, {}
    job_file = None
    if rank == 0:
        job = secrets.token_hex(8)  # this job's id (16 hex digits), in its job file, claims and temp file names
        job_file = _JobFile(outdir, job)
        try:
            local = _plan(outdir, batches, fp, job, job_file, world, size)
            plan = {k: local[k] for k in ("todo", "complete", "notes", "damaged")}
            plan["job"] = job
        except UsageError as err:
            plan = {"error": str(err)}
        except BaseException:
            job_file.close(remove=True)
            raise
    try:
        plan = dist.broadcast(plan)
        if "error" in plan:
            raise UsageError(plan["error"])
        job = plan["job"]
        if rank != 0:
            job_file = _JobFile(outdir, job)
            job_file.attach()
        for note in plan["notes"]:
            log(f"note: {note}")
        damaged = plan["damaged"]
        if damaged:
            shown = ", ".join(f"{name} ({problem})" for name, (problem, _) in sorted(damaged.items())[:10])
            log(f"re-rendering {len(damaged)} damaged image{'s' if len(damaged) != 1 else ''}: {shown}"
                + (", ..." if len(damaged) > 10 else ""))
        log(f"{len(prompts)} prompt(s) x {samples_per_prompt} sample(s) = {len(items)} images in {len(batches)} "
            f"batch(es) of <= {batch_size}; {plan['complete']} already complete (skipped), {len(plan['todo'])} "
            f"batch(es) to render on {world} process(es) -> {sample_dir}")
        generated, rendered = _render_share(render, plan, batches, rank, world, outdir, job, settings,
                                            samples_per_prompt, log, progress and rank == 0, tqdm)
        dist.barrier()
        if rank == 0:
            with folder_lock(outdir):
                lines = _manifest_lines(items, settings, seed, sample_dir, local.get("good"), plan["damaged"])
                _write_atomic(outdir / MANIFEST_FILE, "".join(line + "\n" for line in lines), f".tmp-{job}-")
            missing_total = len(items) - len(lines)
            log(f"manifest: {outdir / MANIFEST_FILE} ({len(lines)} of {len(items)} images"
                + (f"; {missing_total} MISSING" if missing_total else "; complete") + ")")
    finally:
        if job_file is not None:
            job_file.close(remove=rank == 0)
    global last_result
    last_result = {"generated": generated, "batches": rendered, "skipped": plan["complete"],
                   "damaged": len(plan["damaged"]), "total": len(items)}
    return dict(last_result)


def _render_share(render, plan, batches, rank, world, outdir, job, settings, samples_per_prompt, log,
                  show_progress, tqdm):
    """This rank's share of the plan: claim each batch, render it if it still needs it, release it; then
    wait for the batches of the share that another job had claimed."""
    sample_dir = outdir / "samples"
    damaged = plan["damaged"]
    todo = plan["todo"]
    kill_after = int(os.environ.get(KILL_AFTER_ENV, "0") or 0)
    generated = rendered = 0

    def needs(it):
        try:
            st = os.stat(sample_dir / it.file)
        except FileNotFoundError:
            return True
        return it.file in damaged and tuple(damaged[it.file][1]) == _signature(st)

    def do_batch(b):
        nonlocal generated, rendered
        batch = batches[b]
        missing = [i for i, it in enumerate(batch) if needs(it)]
        if not missing:  # finished meanwhile (by another job on the same folder)
            return
        images = render(batch)  # always the whole batch: the same floats as an uninterrupted run
        if len(images) != len(batch):
            raise RuntimeError(f"render returned {len(images)} images for a batch of {len(batch)}")
        rendered += 1
        for i in missing:
            save_png(images[i], sample_dir / batch[i].file, png_metadata(batch[i], settings, samples_per_prompt),
                     tmp_prefix=f".tmp-{job}-")
            generated += 1
            if kill_after and generated >= kill_after:
                sys.stdout.flush()
                os.kill(os.getpid(), signal.SIGKILL)

    mine = shard(todo, rank, world)
    busy = {}  # batch -> the job that had claimed it
    t0 = time.time()
    for b in tqdm(mine, desc=f"sweep rank {rank}" if world > 1 else "sweep", disable=not show_progress):
        owner = _claim(outdir, b, job, rank)
        if owner is not None:
            busy[b] = owner
            continue
        try:
            do_batch(b)
        finally:
            _release(outdir, b, job)
    if busy:
        owners = sorted({_describe_job(_job_info(outdir, o)) for o in busy.values()})
        log(f"waiting for {len(busy)} batch(es) that another job is rendering ({'; '.join(owners)})", every_rank=True)
    while busy:
        time.sleep(POLL_SECONDS)
        for b in sorted(busy):
            owner = _claim(outdir, b, job, rank)
            if owner is not None:
                continue
            del busy[b]
            try:
                do_batch(b)  # nothing to do if the other job finished it; rendered here if it died
            finally:
                _release(outdir, b, job)
    dt = time.time() - t0
    log(f"wrote {generated} image(s) in {rendered} batch(es) in {dt:.1f}s"
        + (f" ({dt / generated:.2f}s/image)" if generated else ""), every_rank=True)
    return generated, rendered
