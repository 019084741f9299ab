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
* **Sharing.** Rank 0 lists the batches that still have a missing image and broadcasts the list;
  rank ``r`` of ``W`` renders entries ``r, r + W, r + 2W, ...`` of it.
* **Resuming.** An image is complete when its PNG exists: PNGs are written to a temporary file and
  renamed (``ldm.inference.save_png``), so a killed job never leaves a partial one. A restarted job
  re-renders only batches with a missing image and writes only the missing files. ``OUTDIR/sweep.json``
  records the settings that determine the pixels; a restart with different settings is refused.
* **Manifest.** At the end rank 0 rewrites ``OUTDIR/manifest.jsonl`` atomically from the work list and
  the files present: one JSON line per image (index, file, prompt, seed, settings), in index order,
  never with duplicates.

No grid is written in sweep mode. See docs/cluster.md.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ldm.inference import UsageError, save_png

SWEEP_FORMAT = "scalecrafter-sweep-v1"
SEED_DERIVATION = ("seed(p, k) = int.from_bytes(sha256(f'scalecrafter-sweep:{seed}:{p}:{k}')[:8], 'little') "
                   "& (2**63 - 1)")
SETTINGS_FILE = "sweep.json"
MANIFEST_FILE = "manifest.jsonl"
KILL_AFTER_ENV = "SCALECRAFTER_SWEEP_KILL_AFTER"  # test hook: SIGKILL this process after N written images
# settings recorded for information only: they do not change the pixels (a restart may change them)
NON_DETERMINING = ("device",)


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
    g.add_argument("--dist_timeout", type=float, default=720.0,
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
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _diff(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix[:-1]}: {old!r} before, {new!r} now"]


def _write_atomic(path: Path, text: str):
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
# the sweep
# --------------------------------------------------------------------------------------------
def _plan(outdir: Path, batches: List[List[WorkItem]], fp: Dict) -> Dict:
    """Rank 0: check/record the settings, clear temporary files of killed runs, find unfinished batches."""
    sample_dir = outdir / "samples"
    sample_dir.mkdir(parents=True, exist_ok=True)
    settings_file = outdir / SETTINGS_FILE
    notes = []
    if settings_file.is_file():
        old = json.loads(settings_file.read_text(encoding="utf-8"))
        changes = _diff(old, fp)
        if changes:
            shown = "; ".join(changes[:6]) + ("; ..." if len(changes) > 6 else "")
            raise UsageError(f"{outdir} holds a sweep made with other settings ({shown}). Resume it with the "
                             f"original settings, or give a new --outdir (or delete {settings_file} and its "
                             "samples to start over)")
    else:
        _write_atomic(settings_file, json.dumps(fp, indent=1, sort_keys=True) + "\n")
    names = set()
    for name in os.listdir(sample_dir):
        if name.startswith(".tmp-"):  # left by a killed process between writing and renaming
            try:
                os.unlink(sample_dir / name)
            except FileNotFoundError:
                pass
        else:
            names.add(name)
    expected = {it.file for b in batches for it in b}
    foreign = sorted(n for n in names if n.lower().endswith(".png") and n not in expected)
    if foreign:
        notes.append(f"{len(foreign)} PNG file(s) in {sample_dir} are not part of this sweep (e.g. {foreign[0]}); "
                     "keep each sweep in its own --outdir so that evaluations see only its images")
    todo = [b for b, items in enumerate(batches) if any(it.file not in names for it in items)]
    complete = sum(it.file in names for items in batches for it in items)
    return {"todo": todo, "complete": complete, "notes": notes}


def _manifest_lines(items: Sequence[WorkItem], settings: Dict, base_seed: int, sample_dir: Path) -> List[str]:
    present = set(os.listdir(sample_dir))
    lines = []
    for it in items:
        if it.file in present:
            lines.append(json.dumps({"index": it.index, "file": f"samples/{it.file}", "prompt": it.prompt,
                                     "prompt_index": it.prompt_index, "sample_index": it.sample_index,
                                     "seed": it.seed, "base_seed": base_seed, "settings": settings},
                                    sort_keys=True, ensure_ascii=False))
    return lines


def png_metadata(item: WorkItem, settings: Dict, samples_per_prompt: int) -> Dict:
    return {"prompt": item.prompt, "seed": str(item.seed),
            "parameters": {**settings, "sweep": {"index": item.index, "prompt_index": item.prompt_index,
                                                 "sample_index": item.sample_index,
                                                 "samples_per_prompt": samples_per_prompt,
                                                 "seed_derivation": SWEEP_FORMAT}}}


def run_sweep(render: Callable[[List[WorkItem]], List], prompts: Sequence[str], samples_per_prompt: int,
              batch_size: int, seed: int, outdir, settings: Dict, dist: Optional[DistContext] = None,
              fixed_code: bool = False, progress: bool = True) -> Dict:
    """Render the sweep's missing images; ``render(items)`` returns one PIL image per item, in order.

    Returns counts for this rank: ``generated`` images written, ``batches`` rendered, ``skipped``
    (images complete before the start, whole sweep), ``total`` images of the sweep."""
    from tqdm import tqdm
    dist = dist or DistContext(torch.device("cpu"))
    rank, world = dist.rank, dist.world_size
    outdir = Path(outdir)
    sample_dir = outdir / "samples"
    items = make_work_list(prompts, samples_per_prompt, seed, fixed_code)
    batches = make_batches(items, batch_size)
    fp = fingerprint(settings, prompts, samples_per_prompt, batch_size)

    def log(msg, every_rank=False):
        if rank == 0 or every_rank:
            print(f"[sweep rank {rank}/{world}] {msg}" if world > 1 else f"[sweep] {msg}", flush=True)

    plan = None
    if rank == 0:
        try:
            plan = _plan(outdir, batches, fp)
        except UsageError as err:
            plan = {"error": str(err)}
    plan = dist.broadcast(plan)
    if "error" in plan:
        raise UsageError(plan["error"])
    for note in plan["notes"]:
        log(f"note: {note}")
    todo = plan["todo"]
    log(f"{len(prompts)} prompt(s) x {samples_per_prompt} sample(s) = {len(items)} images in {len(batches)} "
        f"batch(es) of <= {batch_size}; {plan['complete']} already complete (skipped), "
        f"{len(todo)} batch(es) to render on {world} process(es) -> {outdir / 'samples'}")
    mine = shard(todo, rank, world)
    kill_after = int(os.environ.get(KILL_AFTER_ENV, "0") or 0)
    generated = 0
    t0 = time.time()
    for b in tqdm(mine, desc=f"sweep rank {rank}" if world > 1 else "sweep", disable=not progress or rank != 0):
        batch = batches[b]
        missing = [i for i, it in enumerate(batch) if not (sample_dir / it.file).is_file()]
        if not missing:  # finished meanwhile (another job on the same folder); nothing to do
            continue
        images = render(batch)  # always the whole batch: the same floats as an uninterrupted run
        if len(images) != len(batch):
            raise RuntimeError(f"render returned {len(images)} images for a batch of {len(batch)}")
        for i in missing:
            save_png(images[i], sample_dir / batch[i].file, png_metadata(batch[i], settings, samples_per_prompt))
            generated += 1
            if kill_after and generated >= kill_after:
                sys.stdout.flush()
                os.kill(os.getpid(), signal.SIGKILL)
    dt = time.time() - t0
    log(f"wrote {generated} image(s) in {len(mine)} batch(es) in {dt:.1f}s"
        + (f" ({dt / generated:.2f}s/image)" if generated else ""), every_rank=True)
    dist.barrier()
    if rank == 0:
        lines = _manifest_lines(items, settings, seed, sample_dir)
        _write_atomic(outdir / MANIFEST_FILE, "".join(line + "\n" for line in lines))
        missing_total = len(items) - len(lines)
        log(f"manifest: {outdir / MANIFEST_FILE} ({len(lines)} of {len(items)} images"
            + (f"; {missing_total} MISSING" if missing_total else "; complete") + ")")
    return {"generated": generated, "batches": len(mine), "skipped": plan["complete"], "total": len(items)}
