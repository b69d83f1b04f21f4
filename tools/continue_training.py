#!/usr/bin/env python
"""Continue training a shipped model (by default `fmnist-ddpm`) for more wall time, into a run folder.

Used for issue 5's question: does the gap between the deterministic samplers (the probability-flow
ODE) and the ancestral ones shrink when the same model is trained longer? The run starts from the
shipped EMA weights with a fresh AdamW (warm-up, then cosine decay over `--minutes`) and a fresh EMA,
on the same data, objective and schedule, and writes checkpoints that `diffcourse_sample` and
`tools/sampler_study.py --model` read.

    python tools/continue_training.py --minutes 80 --threads 1 --out runs/fmnist-ddpm-more
"""
from __future__ import annotations
import argparse, json, shlex, sys, time

import torch

from diffcourse.cli import TimeBudgetCB, load_images
from diffcourse.core import seed_everything
from diffcourse.data import get_dataloader
from diffcourse.ddpm import DiffusionLoss
from diffcourse.learner import EMACB, Learner
from diffcourse.pretrained import load


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--name', default='fmnist-ddpm', help='the shipped model to start from')
    p.add_argument('--minutes', type=float, required=True)
    p.add_argument('--batch_size', type=int, default=64)
    p.add_argument('--lr', type=float, default=1e-3)
    p.add_argument('--ema', type=float, default=0.999)
    p.add_argument('--seed', type=int, default=1, help='a seed other than the first run: other data order and noise')
    p.add_argument('--threads', type=int, default=None)
    p.add_argument('--ckpt_minutes', type=float, default=10)
    p.add_argument('--out', default='runs/fmnist-ddpm-more')
    a = p.parse_args(argv)
    if a.minutes <= 0: p.error(f"--minutes must be positive; got {a.minutes}")
    if a.threads: torch.set_num_threads(a.threads)
    pre = load(a.name)
    card = pre.card
    data = load_images(card['data']['dataset'])
    seed_everything(a.seed)
    net = pre.model.float().train().requires_grad_(True)
    dl = get_dataloader(data, batch_size=a.batch_size, shuffle=True, seed=a.seed, drop_last=True)
    record = {'model': card['model'], 'schedule': card['schedule'], 'data': card['data'],
              'training': {'continued_from': a.name, 'previous': card.get('training'), 'minutes': a.minutes,
                           'batch_size': a.batch_size, 'lr': a.lr, 'seed': a.seed, 'ema': a.ema, 'threads': a.threads},
              'command': 'python tools/continue_training.py ' + ' '.join(map(shlex.quote, argv if argv is not None else sys.argv[1:]))}
    tb = TimeBudgetCB(a.minutes, a.ckpt_minutes, a.out, keep=2, lr_by_time=True, log_every=60)
    learn = Learner(net, dl, DiffusionLoss(pre.schedule), lr=a.lr, cbs=[EMACB(a.ema), tb], config={'diffcourse': record})
    print(f"continuing {a.name} for {a.minutes} min, batch {a.batch_size}, lr {a.lr}, into {a.out}", flush=True)
    t0 = time.time()
    learn.fit(steps=10**9)
    path = learn.save_checkpoint(a.out, keep=2)
    print(json.dumps({'steps': learn.step, 'images': learn.step * a.batch_size, 'minutes': round((time.time() - t0) / 60, 1),
                      'checkpoint': str(path)}), flush=True)


if __name__ == '__main__': main()
