#!/usr/bin/env python
"""Where one image's time and memory go, phase by phase, on either side of tools/compare_releases.py (CPU).

    python tools/phase_profile.py ours -- TXT2IMG ARGS...        # this repository's pipeline (scripts/txt2img.py)
    RELEASE_ENV/bin/python tools/phase_profile.py release -- RELEASE_RUNNER ARGS...   # tools/release_runner.py

Each phase is a wrapped call: text encoding, every ``sampler.run`` (one per cascade stage), the cascade's
upscale (decode, bicubic, encode) and its parts, every decode and encode, the PNG conversion and writing (ours);
the prompt encoding, every ``vae.encode`` / ``vae.decode`` (and diffusers' tiled variants inside them) and the
post-processing (the release, whose sampling loops are one function: the rest of its call). Per phase: CPU
seconds (``time.process_time``), wall seconds, resident memory at entry and exit and the peak resident memory
during the phase (VmHWM, reset at every phase boundary through ``/proc/self/clear_refs``), in GiB. Nested phases
are indented; a parent's numbers include its children's. Linux only (``/proc``).
"""
import functools
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

STACK, ROWS = [], []


def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 2 ** 20


def _fold_and_reset():
    peak = _status("VmHWM:")
    for p in STACK:
        p["peak"] = max(p["peak"], peak)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


class Phase:
    def __init__(self, name):
        self.name = name

    def __enter__(self):
        _fold_and_reset()
        p = {"name": self.name, "depth": len(STACK), "rss0": _status("VmRSS:"), "peak": 0.0,
             "c0": time.process_time(), "t0": time.perf_counter()}
        STACK.append(p)
        ROWS.append(p)

    def __exit__(self, *exc):
        _fold_and_reset()
        p = STACK.pop()
        p.update(cpu=time.process_time() - p["c0"], wall=time.perf_counter() - p["t0"], rss1=_status("VmRSS:"))


def wrap(obj, attr, name):
    """Make ``obj.attr`` a phase (``name``: a string, or ``name(args, kwargs)``)."""
    f = getattr(obj, attr)

    @functools.wraps(f)
    def phased(*a, **k):
        with Phase(name(a, k) if callable(name) else name):
            return f(*a, **k)
    setattr(obj, attr, phased)


def hw(a, k):
    return "%dx%d" % tuple(a[0].shape[-2:])


def report():
    print(f"{'phase':46s} {'CPU s':>8s} {'wall s':>8s} {'RSS in':>7s} {'peak':>7s} {'RSS out':>7s}  (GiB)")
    for p in ROWS:
        if "cpu" in p:
            print(f"{'  ' * p['depth'] + p['name']:46s} {p['cpu']:8.2f} {p['wall']:8.2f} {p['rss0']:7.2f} "
                  f"{p['peak']:7.2f} {p['rss1']:7.2f}")


def ours(argv):
    import torch
    sys.path.insert(0, str(REPO_ROOT))
    torch.set_num_threads(1)
    import ldm.methods.cascade as cascade
    import ldm.pipelines.txt2img as t2i
    from ldm.checkpoint import load_model_from_config
    state = {"stage": 0}

    def loader(*a, **k):
        model = load_model_from_config(*a, **k)
        if "model" not in state:  # the base model
            state["model"] = model
            wrap(model, "get_learned_conditioning", "text encoding")
            wrap(model, "decode_first_stage", lambda a, k: "decode " + hw(a, k))
            wrap(model.first_stage_model, "encode", lambda a, k: "vae.encode " + hw(a, k))
            state["run"] = Phase("the run after loading")
            state["run"].__enter__()
        return model

    def wrap_sampler(sampler):
        def name(a, k):
            state["stage"] += 1
            return f"sampler.run {state['stage']}"
        wrap(sampler, "run", name)
        return sampler

    wrap(cascade.Cascade, "upscale", "upscale (decode, bicubic, encode)")
    wrap(cascade, "encode_image", "encode_image")
    for name in ("check_decoded", "to_pil", "save_png"):
        wrap(t2i, name, name)
    t2i.run(t2i.build_parser().parse_args(argv), loader=loader, wrap_sampler=wrap_sampler)
    state["run"].__exit__(None, None, None)


def release(argv):
    sys.path.insert(0, str(REPO_ROOT / "tools"))
    import release_runner
    build = release_runner.build

    def phased_build(args, device, dtype):
        pipe, call = build(args, device, dtype)
        for name in ("encode", "decode", "tiled_encode", "tiled_decode"):
            wrap(pipe.vae, name, lambda a, k, name=name: f"vae.{name} " + hw(a, k))
        wrap(pipe, "encode_prompt", "text encoding")
        wrap(pipe.image_processor, "postprocess", "postprocess")

        def phased_call():
            with Phase("the pipeline call"):
                return call()
        return pipe, phased_call
    release_runner.build = phased_build
    release_runner.main(argv)


def main():
    side, rest = sys.argv[1], sys.argv[2:]
    rest = rest[1:] if rest[:1] == ["--"] else rest
    if side not in ("ours", "release"):
        raise SystemExit("usage: phase_profile.py ours|release -- ARGS...")
    try:
        (ours if side == "ours" else release)(rest)
    finally:
        report()


if __name__ == "__main__":
    main()
