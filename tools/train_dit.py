#!/usr/bin/env python
"""Train a class-conditional DiT (or, with --net unet, a class-conditional ResUNet) with the DDPM objective, on pixels or on a shipped VAE's latents.

    python tools/train_dit.py --vae fmnist-vae --patch_size 1 --size XS --minutes 62 --out runs/fmnist-dit
    python tools/train_dit.py --net unet --channels 128 --vae fmnist-vae --minutes 45 --out runs/fmnist-cfg

It is `diffcourse_train` with a `diffcourse.dit.DiT` in place of the UNet and the labels passed to
the model (each dropped to the null label with probability `--class_dropout` while training, for
classifier-free guidance: the DiT drops them in its label embedder, the UNet through
`diffcourse.guidance.CFGLoss`). The run folder holds the same checkpoints and record, so
`diffcourse_sample --ckpt` and `tools/export_ldm.py` (or `diffcourse_export` for a pixel model) take it.
Checkpoints are written every `--ckpt_minutes`; `--resume` continues a stopped run from its latest.
"""
import argparse, inspect, json, time
from pathlib import Path

import numpy as np
import torch

from diffcourse.core import seed_everything
from diffcourse.ddpm import DiffusionLoss
from diffcourse.data import get_dataloader
from diffcourse.dit import DiT
from diffcourse.learner import Learner, EMACB, CheckpointCB, speed_cbs, speed_settings, measure_speed, fastest_setting
from diffcourse.pretrained import build_schedule, load as load_pretrained
from diffcourse.latent import load_latents, vae_entry
from diffcourse.cli import TimeBudgetCB, SampleGridCB, load_images, model_spec
from diffcourse.pretrained import build_model
from diffcourse.guidance import CFGLoss


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--dataset', default='fmnist'); ap.add_argument('--vae', default=None)
    ap.add_argument('--size', default='XS'); ap.add_argument('--patch_size', type=int, default=4)
    ap.add_argument('--block', default='adaln_zero'); ap.add_argument('--class_dropout', type=float, default=0.1)
    ap.add_argument('--minutes', type=float, required=True); ap.add_argument('--out', default='runs/dit')
    ap.add_argument('--batch_size', type=int, default=32); ap.add_argument('--lr', type=float, default=1e-3)
    ap.add_argument('--seed', type=int, default=0); ap.add_argument('--schedule', default='cosine'); ap.add_argument('--T', type=int, default=1000)
    ap.add_argument('--ema', type=float, default=0.999); ap.add_argument('--ckpt_minutes', type=float, default=5)
    ap.add_argument('--threads', type=int, default=1); ap.add_argument('--speed', default='auto')
    ap.add_argument('--net', default='dit', choices=('dit', 'unet')); ap.add_argument('--channels', default='128')
    ap.add_argument('--model_kwargs', default=None, help='more ResUNet arguments as JSON (--net unet)')
    ap.add_argument('--resume', action='store_true')
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    if a.vae: pre_vae = load_pretrained(a.vae); data = load_latents(pre_vae, a.dataset)
    else: pre_vae, data = None, load_images(a.dataset)
    shape = tuple(data.images.shape[1:])
    sched_spec = {'name': a.schedule, 'T': a.T}
    sched = build_schedule(sched_spec)
    seed_everything(a.seed)
    if a.net == 'dit':
        net = DiT(in_channels=shape[0], image_size=shape[-1], patch_size=a.patch_size, size=a.size, num_classes=len(data.classes),
                  block=a.block, class_dropout=a.class_dropout)
        spec, name = {'module': 'diffcourse.dit', 'class': 'DiT', 'kwargs': net.config}, f'DiT-{a.size}/{a.patch_size} {a.block}'
        loss_func = DiffusionLoss(sched, conditional=True)                      # the DiT drops labels itself
    else:
        spec = model_spec('res', shape[0], a.channels, {**json.loads(a.model_kwargs or '{}'), 'num_classes': len(data.classes)})
        net, name = build_model(spec), f"ResUNet {a.channels}"
        loss_func = CFGLoss(sched, p_uncond=a.class_dropout)
    dl = get_dataloader(data, batch_size=a.batch_size, shuffle=True, seed=a.seed, drop_last=True)
    speed = a.speed
    if speed == 'auto':
        batch = (data.images[:a.batch_size], data.labels[:a.batch_size])
        speed = fastest_setting(measure_speed(net, batch, loss_func, settings=speed_settings('cpu')), seconds=a.minutes * 60)
    skip = ('resume',) + (('channels', 'model_kwargs') if a.net == 'dit' else ('size', 'patch_size', 'block'))
    args = {k: v for k, v in vars(a).items() if k not in skip} | {'speed': speed}
    cmd = 'python tools/train_dit.py ' + ' '.join(f"--{k} {v if k != 'model_kwargs' else repr(v)}" for k, v in args.items() if v is not None)
    record = {'model': spec, 'schedule': sched_spec,
              'data': {'dataset': a.dataset, 'image_shape': list(pre_vae.image_shape if pre_vae else shape), 'n_images': len(data),
                       'classes': list(data.classes)},
              'training': {'steps': None, 'minutes': a.minutes, 'batch_size': a.batch_size, 'lr': a.lr, 'seed': a.seed, 'ema': a.ema,
                           'threads': a.threads, 'speed': speed, 'class_dropout': a.class_dropout},
              'command': cmd}
    if pre_vae is not None:
        record['data']['latent_shape'] = list(shape)
        record['vae'], record['sampling'] = vae_entry(pre_vae), {'clip_sample': None}
    tb = TimeBudgetCB(a.minutes, a.ckpt_minutes, out, keep=2, lr_by_time=True, log_every=60)
    cbs = [*speed_cbs(speed), EMACB(a.ema), CheckpointCB(out, keep=2), tb,
           SampleGridCB(out/'samples.png', sched, shape, n=16, steps=100, seed=a.seed, decode=pre_vae.decode if pre_vae else None)]
    learn = Learner(net, dl, loss_func, lr=a.lr, cbs=cbs, config={'diffcourse': record})
    print(f"training {name} ({sum(p.numel() for p in net.parameters()):,} parameters) on {len(data):,} "
          f"{a.dataset} {'latents' if pre_vae else 'images'} {shape} for {a.minutes} minutes ({speed}); writing to {out}", flush=True)
    if a.resume and any(out.glob('*/state.json')): print('resuming from the latest checkpoint in', out, flush=True); learn.resume(out)
    else: learn.fit(steps=10**9)
    m = learn.metrics
    print(f"done: {learn.step} steps, final loss {np.mean(m.losses[-200:]):.4f}, {tb.elapsed / 60:.1f} min", flush=True)


if __name__ == '__main__': main()
