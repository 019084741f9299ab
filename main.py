#!/usr/bin/env python
"""Training entry point (LDM style) for the small demo model, on pytorch-lightning.

    python main.py --base configs/demo/shapes32.yaml -t                      # train (defaults from the YAML)
    python main.py --base configs/demo/shapes32.yaml -t --max_steps 3000 --max_minutes 60 --logdir logs
    python main.py --base configs/demo/shapes32.yaml -t --resume logs/shapes32/checkpoints/last.ckpt
    python main.py --base configs/demo/shapes32.yaml --export logs/shapes32/checkpoints/last.ckpt \
        --out checkpoints/demo/shapes32.ckpt                                  # EMA weights, fp16, for release

The model is the config's ``LatentDiffusion`` itself (mixed with ``pl.LightningModule``, as in the
original code base), so checkpoints are in the original format: ``{"state_dict": ..., "global_step": ...}``
with the EMA weights under ``model_ema.<name without dots>`` (LitEma naming), which
``ldm.checkpoint`` swaps in when sampling. Training checkpoints also carry the optimizer state
(``optimizer_states``) so that ``--resume`` continues exactly where a run stopped.

Training: the simple ε loss, AdamW with linear warm-up, EMA of the UNet and text-encoder weights, and
captions replaced by ``""`` with probability ``ucg_rate`` so that the model also learns the
unconditional prediction used by classifier-free guidance. Progress is printed every
``log_every_n_steps`` steps (plain lines, suitable for ``nohup ... > train.log``).
"""
import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

REPO_ROOT = Path(__file__).resolve().parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import pytorch_lightning as pl  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from ldm.models.diffusion.ddpm import SCHEDULE_BUFFERS, LatentDiffusion  # noqa: E402
from ldm.inference import UsageError, numpy_seed_arg  # noqa: E402
from ldm.util import (check_config_target, checked_config, get_obj_from_str, read_yaml_mapping,  # noqa: E402
                      instantiate_from_config, trusted_configs)


# ----------------------------------------------------------------------------------------------
# EMA with the original LitEma state-dict naming


class LitEma(nn.Module):
    """Exponential moving average of parameters, stored as buffers named ``<param name without dots>``.

    ``modules`` maps a prefix to a module; the prefix is prepended to the parameter names before the
    dots are removed. For ``{"": diffusion_wrapper}`` this is exactly the original LitEma layout
    (``diffusion_modelinput_blocks00weight``). Like the original, the decay warms up as
    ``min(decay, (1 + n) / (10 + n))``.
    """

    def __init__(self, modules, decay=0.999):
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError("EMA decay must be in (0, 1)")
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer("num_updates", torch.tensor(0, dtype=torch.int64))
        self.names = {}  # full param name -> buffer name
        for prefix, module in modules.items():
            for name, p in module.named_parameters():
                if not p.requires_grad:
                    continue
                full = f"{prefix}.{name}" if prefix else name
                buf = full.replace(".", "")
                self.names[full] = buf
                self.register_buffer(buf, p.detach().clone())
        self._modules_ref = modules  # plain dict: not registered as submodules

    def _params(self):
        for prefix, module in self._modules_ref.items():
            for name, p in module.named_parameters():
                full = f"{prefix}.{name}" if prefix else name
                if full in self.names:
                    yield self.names[full], p

    @torch.no_grad()
    def update(self):
        self.num_updates += 1
        n = float(self.num_updates)
        decay = min(float(self.decay), (1.0 + n) / (10.0 + n))
        for buf, p in self._params():
            getattr(self, buf).lerp_(p.detach().to(getattr(self, buf).dtype), 1.0 - decay)

    @torch.no_grad()
    def reset_to_current(self):
        self.num_updates.zero_()
        for buf, p in self._params():
            getattr(self, buf).copy_(p.detach())

    @torch.no_grad()
    def copy_to(self):
        for buf, p in self._params():
            p.copy_(getattr(self, buf))


# ----------------------------------------------------------------------------------------------
# the LightningModule


class TrainableLatentDiffusion(LatentDiffusion, pl.LightningModule):
    """``LatentDiffusion`` plus what training needs; its state dict is the original layout + ``model_ema.*``.

    ``model_ema`` averages the UNet (under the original names, so any loader applies it) and the
    trainable text encoder (under ``cond_stage_model...``; ``--export`` bakes both into the weights).
    """

    def __init__(self, learning_rate=5e-4, weight_decay=0.01, warmup_steps=200, ema_decay=0.999, ucg_rate=0.1,
                 step_offset=0, **ldm_params):
        super().__init__(**ldm_params)
        self.learning_rate = float(learning_rate)
        self.weight_decay = float(weight_decay)
        self.warmup_steps = int(warmup_steps)
        self.ucg_rate = float(ucg_rate)
        self.step_offset = int(step_offset)
        ema_parts = {"": self.model}
        if self.cond_stage_trainable and self.cond_stage_model is not None:
            ema_parts["cond_stage_model"] = self.cond_stage_model
        self.model_ema = LitEma(ema_parts, decay=ema_decay)
        self.resume_optimizer_state = None
        self.loss_history = []

    # the original's batch conventions: images are channels-last in [-1, 1], captions a list of str
    def get_input(self, batch):
        x = batch[self.first_stage_key]
        if x.dim() == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
            x = x.permute(0, 3, 1, 2)
        x = x.to(memory_format=torch.contiguous_format).float()
        z = self.get_first_stage_encoding(self.encode_first_stage(x))
        captions = list(batch[self.cond_stage_key])
        if self.ucg_rate > 0:
            drop = torch.rand(len(captions)) < self.ucg_rate
            captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        return z, captions

    def training_step(self, batch, batch_idx):
        z, captions = self.get_input(batch)
        cond = self.get_learned_conditioning(captions)
        loss = self.training_loss(z, cond)
        self.loss_history.append(float(loss.detach()))
        self.log("train/loss", loss, prog_bar=False, logger=False)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.model_ema.update()

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.cond_stage_trainable and self.cond_stage_model is not None:
            params += [p for p in self.cond_stage_model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.learning_rate, weight_decay=self.weight_decay)
        if self.resume_optimizer_state is not None:
            opt.load_state_dict(self.resume_optimizer_state)
            self.resume_optimizer_state = None
        warm, offset = max(self.warmup_steps, 1), self.step_offset
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + offset + 1) / warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    @property
    def total_step(self):
        return self.step_offset + self.global_step

    def original_checkpoint(self, with_optimizer=True):
        sd = {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}
        out = {"state_dict": sd, "global_step": self.total_step, "epoch": self.current_epoch}
        if with_optimizer and self.trainer is not None and self.trainer.optimizers:
            out["optimizer_states"] = [self.trainer.optimizers[0].state_dict()]
        return out


class ProgressAndCheckpoints(pl.Callback):
    """Plain progress lines and original-format checkpoints every ``every`` steps (and at the end)."""

    def __init__(self, ckpt_dir, every=500, log_every=50, max_steps=None):
        self.ckpt_dir = Path(ckpt_dir)
        self.every = int(every)
        self.log_every = int(log_every)
        self.max_steps = max_steps
        self.t0 = None
        self.last_saved = None

    def on_train_start(self, trainer, pl_module):
        self.t0 = time.time()
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        print(f"training from step {pl_module.total_step} to {self.max_steps}; checkpoints in {self.ckpt_dir}",
              flush=True)

    def save(self, pl_module):
        step = pl_module.total_step
        if step == self.last_saved:
            return
        ckpt = pl_module.original_checkpoint()
        path = self.ckpt_dir / f"step-{step:06d}.ckpt"
        tmp = path.with_suffix(".tmp")
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
        torch.save(ckpt, self.ckpt_dir / "last.ckpt.tmp")
        os.replace(self.ckpt_dir / "last.ckpt.tmp", self.ckpt_dir / "last.ckpt")
        self.last_saved = step
        print(f"saved {path}", flush=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = pl_module.total_step
        done = trainer.global_step
        if step % self.log_every == 0 or done == 1:
            hist = pl_module.loss_history[-self.log_every:]
            elapsed = time.time() - self.t0
            rate = done / max(elapsed, 1e-9)
            left = (self.max_steps - step) / rate if (self.max_steps and rate > 0) else float("nan")
            lr = trainer.optimizers[0].param_groups[0]["lr"]
            print(f"step {step}/{self.max_steps} loss {sum(hist) / max(len(hist), 1):.4f} lr {lr:.2e} "
                  f"{rate:.2f} it/s elapsed {elapsed / 60:.1f} min, ~{left / 60:.1f} min left", flush=True)
        if step % self.every == 0:
            self.save(pl_module)

    def on_train_end(self, trainer, pl_module):
        self.save(pl_module)
        print(f"finished at step {pl_module.total_step} after {(time.time() - self.t0) / 60:.1f} min", flush=True)


# ----------------------------------------------------------------------------------------------


def build_model(config, step_offset=0):
    """The config's model as a trainable LightningModule (the target must be LatentDiffusion)."""
    check_config_target(config.model.target)
    target = get_obj_from_str(config.model.target)
    if not issubclass(target, LatentDiffusion):
        raise SystemExit(f"main.py trains LatentDiffusion models; the config's target is {config.model.target}")
    light = config.get("lightning", {}) or {}
    params = OmegaConf.to_container(config.model.params, resolve=True)
    return TrainableLatentDiffusion(
        learning_rate=config.model.get("base_learning_rate", 5e-4),
        weight_decay=light.get("weight_decay", 0.01), warmup_steps=light.get("warmup_steps", 200),
        ema_decay=light.get("ema_decay", 0.999), ucg_rate=light.get("ucg_rate", 0.1), step_offset=step_offset,
        **params)


def build_dataloader(config, seed_offset=0, batch_size=None):
    data = config.data
    params = dict(OmegaConf.to_container(data.get("params", {}), resolve=True))
    if seed_offset and "seed" in params:
        params["seed"] = int(params["seed"]) + int(seed_offset)  # fresh samples after a resume
    dataset = instantiate_from_config({"target": data.target, "params": params})
    workers = int(data.get("num_workers", 0))
    return torch.utils.data.DataLoader(dataset, batch_size=int(batch_size or data.get("batch_size", 64)),
                                       shuffle=False, num_workers=workers, drop_last=True,
                                       persistent_workers=workers > 0)


def warm_start(model, src):
    """Copy the tensors of a training checkpoint whose name and shape match (EMA copies and the noise
    schedule excluded); the rest keeps its fresh initialisation. The EMA restarts from the result."""
    sd = torch.load(src, map_location="cpu", weights_only=True)["state_dict"]
    own = model.state_dict()
    take = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape
            and not k.startswith("model_ema.") and k not in SCHEDULE_BUFFERS}
    fresh = sorted(k for k in own if k not in take and not k.startswith("model_ema.") and k not in SCHEDULE_BUFFERS)
    model.load_state_dict(take, strict=False)
    model.model_ema.reset_to_current()
    print(f"warm start from {src}: {len(take)} tensors copied, {len(fresh)} freshly initialised"
          + (f" ({', '.join(fresh[:6])}{', ...' if len(fresh) > 6 else ''})" if fresh else ""))


def export(config, src, out, dtype=torch.float16):
    """Release file: EMA weights baked into the ordinary keys (UNet and text encoder), no optimizer,
    no model_ema.* copies; weights stored as ``dtype`` (the schedule buffers stay float32)."""
    obj = torch.load(src, map_location="cpu", weights_only=True)
    sd = obj["state_dict"]
    model = build_model(config)
    model.load_state_dict(sd, strict=True)
    n_ema = len(model.model_ema.names)
    model.model_ema.copy_to()
    plain = LatentDiffusion.state_dict(model)  # includes model_ema.* (a submodule); dropped below
    keep = {}
    for k, v in plain.items():
        if k.startswith("model_ema."):
            continue
        v = v.detach().cpu()
        if v.is_floating_point() and (k.startswith("model.") or k.startswith("cond_stage_model.")):
            v = v.to(dtype)
        keep[k] = v.clone()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": keep, "global_step": int(obj.get("global_step", 0))}, out)
    size = Path(out).stat().st_size / 2 ** 20
    print(f"exported {src} (step {obj.get('global_step')}, {n_ema} EMA tensors applied) -> {out} "
          f"({len(keep)} tensors, {size:.1f} MiB)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train the demo LatentDiffusion model (LDM-style main.py).")
    p.add_argument("--base", nargs="+", required=True, help="config YAML(s), merged left to right")
    p.add_argument("-t", "--train", action="store_true", help="train")
    p.add_argument("--logdir", default="logs", help="where runs are written (logs/<name>/checkpoints/...)")
    p.add_argument("--name", default=None, help="run name (default: the config's file name)")
    p.add_argument("--resume", default=None, help="a training checkpoint (original format) to continue from")
    p.add_argument("--init_from", default=None, metavar="CKPT",
                   help="warm start: copy every tensor whose name and shape match from this training checkpoint, "
                        "start at step 0 with a fresh optimizer and EMA (for a changed architecture)")
    p.add_argument("--reset_ema", action="store_true",
                   help="with --resume: restart the EMA from the resumed weights (e.g. after changing the schedule)")
    p.add_argument("--max_steps", type=int, default=None, help="total optimisation steps (default: config)")
    p.add_argument("--max_minutes", type=float, default=None, help="stop after this wall-clock time")
    p.add_argument("--batch_size", type=int, default=None, help="override data.batch_size")
    p.add_argument("--save_every", type=int, default=None, help="checkpoint every N steps (default: config)")
    p.add_argument("--log_every", type=int, default=None, help="progress line every N steps (default: config)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1; more threads are slower on a busy 2-core machine)")
    p.add_argument("--accelerator", default="auto", help="pytorch-lightning accelerator (auto, cpu, gpu)")
    p.add_argument("--seed", type=numpy_seed_arg, default=23,
                   help="global seed (initialisation, noise, caption dropout; 0 ... 2**32 - 1, as lightning seeds numpy)")
    p.add_argument("--export", default=None, metavar="CKPT", help="write a release file from a training checkpoint")
    p.add_argument("--out", default=None, help="output path for --export")
    p.add_argument("--trust_config", action="store_true",
                   help="allow config targets outside this package (ldm.*, torch.nn.Identity): building a config "
                        "calls every class or function it names, so only for configs you trust")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        # each file read strictly (one-line errors naming it), then merged, resolved and checked as a whole
        config = OmegaConf.merge(*[read_yaml_mapping(b, "config") for b in args.base])
    except UsageError as err:
        raise SystemExit(f"error: {err}") from None
    try:
        config = checked_config(config, trust=args.trust_config)
    except UsageError as err:
        raise SystemExit(f"{' + '.join(args.base)}: {err}") from None
    with trusted_configs(args.trust_config):
        return train_or_export(args, config)


def train_or_export(args, config):
    if args.export:
        if not args.out:
            raise SystemExit("--export needs --out")
        export(config, args.export, args.out)
        return 0
    if not args.train:
        raise SystemExit("nothing to do: pass -t to train or --export CKPT --out FILE")
    torch.set_num_threads(args.threads or 1)
    pl.seed_everything(args.seed, verbose=False)
    light = config.get("lightning", {}) or {}
    trainer_cfg = dict(OmegaConf.to_container(light.get("trainer", {}) or {}, resolve=True))
    max_steps = int(args.max_steps or trainer_cfg.pop("max_steps", 1000))
    trainer_cfg.pop("max_steps", None)

    start, resume = 0, None
    if args.resume:
        resume = torch.load(args.resume, map_location="cpu", weights_only=True)
        start = int(resume.get("global_step", 0))
        if start >= max_steps:
            print(f"{args.resume} is already at step {start} >= max_steps {max_steps}; nothing to do")
            return 0
    model = build_model(config, step_offset=start)
    if resume is not None:
        sd = dict(resume["state_dict"])
        # the noise schedule comes from the config (it may have been changed for a fine-tuning run)
        changed = [k for k in SCHEDULE_BUFFERS if k in sd and not torch.allclose(
            sd[k].float(), getattr(model, k).float(), rtol=1e-5, atol=1e-8)]
        for k in SCHEDULE_BUFFERS:
            sd.pop(k, None)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        missing = [k for k in missing if k not in SCHEDULE_BUFFERS]
        if missing or unexpected:
            raise SystemExit(f"{args.resume} does not match the config: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        if changed:
            print(f"note: the config's noise schedule differs from the checkpoint's; training continues "
                  f"with the config's ({config.model.params.get('beta_schedule', 'linear')})")
        if args.reset_ema:
            model.model_ema.reset_to_current()
            print("EMA restarted from the current weights")
        if resume.get("optimizer_states"):
            model.resume_optimizer_state = resume["optimizer_states"][0]
        print(f"resumed from {args.resume} at step {start}")
    if args.init_from:
        if resume is not None:
            raise SystemExit("--init_from and --resume exclude each other")
        warm_start(model, args.init_from)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{config.model.target}: {n_params / 1e6:.2f} M trainable parameters, "
          f"{torch.get_num_threads()} CPU thread(s)", flush=True)

    name = args.name or Path(args.base[-1]).stem
    logdir = Path(args.logdir) / name
    logdir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(config, logdir / "config.yaml")
    callback = ProgressAndCheckpoints(logdir / "checkpoints",
                                      every=args.save_every or light.get("save_every_n_steps", 500),
                                      log_every=args.log_every or light.get("log_every_n_steps", 50),
                                      max_steps=max_steps)
    trainer_kwargs = dict(accelerator=args.accelerator, devices=1, max_steps=max_steps - start, max_epochs=-1,
                          logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, num_sanity_val_steps=0, callbacks=[callback],
                          default_root_dir=str(logdir))
    if args.max_minutes:
        trainer_kwargs["max_time"] = {"minutes": float(args.max_minutes)}
    trainer_kwargs.update(trainer_cfg)
    trainer = pl.Trainer(**trainer_kwargs)
    loader = build_dataloader(config, seed_offset=start, batch_size=args.batch_size)
    t0 = time.time()
    trainer.fit(model, loader)
    print(f"wall time {(time.time() - t0) / 60:.1f} min; last checkpoint {callback.ckpt_dir / 'last.ckpt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
