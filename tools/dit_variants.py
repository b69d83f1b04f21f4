#!/usr/bin/env python
"""Chapter 12's comparisons: the four DiT blocks at equal steps and equal CPU time, and patch sizes on pixels, over seeds.

    python tools/dit_variants.py --out nbs/results/dit_variants.json
    python tools/dit_variants.py --study patches --out nbs/results/dit_patches.json --seeds 0,1

For each seed, the four conditioning blocks (cross-attention first: it is the slowest, and its CPU
time for `--steps` steps sets the CPU budget of every run) train a class-conditional DiT of size
`--size` with patch 1 on fmnist-vae's latents of Fashion-MNIST, with the Learner, AdamW at `--lr`
after a 100-step warm-up, batch `--batch_size`, and a warmed-up EMA. Each run records the held-out
ε-MSE of its EMA weights every `--eval_every` steps (2,000 test latents, fixed t and noise, labels
given) with the CPU seconds spent training so far, and at `--steps` steps and at the CPU budget
the FID, KID and class accuracy of `--n` decoded class-conditional samples (dpmpp_2m, 20 leading
steps, unclamped; 10 classes in equal shares) against the 10,000 test images, by the shipped
classifier. One torch thread; CPU time is the process's (time.process_time), evaluation excluded.
Results are written after every run, and a rerun skips the runs already in the file.

`--study patches` trains adaLN-Zero DiTs of the same size on Fashion-MNIST pixels (28x28) with patch
sizes 7, 4 and 2 for `--steps` steps each, and measures the same things on decoded-free samples
(clamped to [-1, 1]); there is no CPU budget.
"""
import argparse, json, time
from pathlib import Path

import numpy as np
import torch

from diffcourse.core import seed_everything
from diffcourse.ddpm import DiffusionLoss
from diffcourse.data import get_dataloader, load_fashion_mnist
from diffcourse.dit import DiT, BLOCKS, forward_flops
from diffcourse.learner import Learner, Callback, CancelFitException, EMACB
from diffcourse.latent import load_latents
from diffcourse.metrics import evaluate
from diffcourse.pretrained import build_schedule, generate, load as load_pretrained
from diffcourse.unet import count_params


@torch.no_grad()
def heldout_mse(model, sched, z, y, seed=0):
    "Mean ε-MSE over held-out latents `z` with labels `y`, at timesteps and noise fixed by `seed`."
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, sched.T, (len(z),), generator=g); eps = torch.randn(z.shape, generator=g)
    was = model.training; model.eval()
    out = [torch.nn.functional.mse_loss(model(sched.add_noise(zb, eb, tb), tb, labels=yb), eb, reduction='sum')
           for zb, eb, tb, yb in zip(z.split(500), eps.split(500), t.split(500), y.split(500))]
    model.train(was)
    return float(sum(out) / eps.numel())


class StudyCB(Callback):
    "Held-out ε-MSE every `every` steps; the sample metrics at `steps` steps and at `budget` CPU seconds; stop when both are done."
    order = 20   # after the EMA update
    def __init__(self, study, steps, budget, every):
        self.study, self.steps, self.budget, self.every = study, steps, budget, every
        self.curve, self.points, self.cpu = [], {}, 0.

    def before_fit(self, learn): self.t0 = time.process_time()

    def after_batch(self, learn):
        if not learn.training: return
        self.cpu += time.process_time() - self.t0
        s, m = learn.step, learn.ema_model
        if s % self.every == 0: self.curve.append((s, self.cpu, heldout_mse(m, *self.study.held)))
        if s == self.steps: self.points['steps'] = self.study.quality(m) | {'step': s, 'cpu_s': self.cpu}
        if self.budget is not None and self.cpu >= self.budget and 'cpu' not in self.points:
            self.points['cpu'] = self.study.quality(m) | {'step': s, 'cpu_s': self.cpu}
        if 'steps' in self.points and (self.budget is None or 'cpu' in self.points): raise CancelFitException()
        self.t0 = time.process_time()


class Study:
    def __init__(self, a):
        self.a = a
        self.reference = load_fashion_mnist('test').images
        if a.study == 'blocks':
            self.vae = load_pretrained('fmnist-vae')
            self.train = load_latents(self.vae, 'fmnist')
            test = load_latents(self.vae, 'fmnist', split='test')
        else: self.vae, self.train, test = None, load_fashion_mnist('train'), load_fashion_mnist('test')
        self.held = (build_schedule({'name': 'cosine', 'T': 1000}), test.images[:2000], test.labels[:2000])
        self.sched = self.held[0]

    def quality(self, model):
        n = self.a.n
        labels = torch.arange(n) % 10
        z = generate(model, self.sched, n, tuple(self.train.images.shape[1:]), steps=20, seed=100, sampler='dpmpp_2m',
                     clip_sample=None if self.vae else 1.0, labels=labels)
        x = (self.vae.decode(z) if self.vae else z).clamp(-1, 1)
        r = evaluate(x, self.reference, labels=labels)
        return {k: float(r[k]) for k in ('fid', 'kid', 'kid_se', 'class_accuracy')}

    def run(self, block, seed, budget, patch=1):
        a = self.a
        seed_everything(seed)
        C, S = self.train.images.shape[1], self.train.images.shape[-1]
        net = DiT(in_channels=C, image_size=S, patch_size=patch, size=a.size, num_classes=10, block=block)
        dl = get_dataloader(self.train, batch_size=a.batch_size, shuffle=True, seed=seed, drop_last=True)
        class WarmupCB(Callback):
            def before_batch(self, learn):
                if learn.training:
                    for g in learn.opt.param_groups: g['lr'] = a.lr * min(1., (learn.step + 1) / 100)
        cb = StudyCB(self, a.steps, budget, a.eval_every)
        learn = Learner(net, dl, DiffusionLoss(self.sched, conditional=True), lr=a.lr, cbs=[EMACB(a.ema), WarmupCB(), cb])
        learn.fit(steps=10**9)
        x = self.train.images[:8]; t = torch.full((8,), 500); y = torch.arange(8)
        return {'block': block, 'seed': seed, 'patch_size': patch, 'tokens': net.num_tokens, 'params': count_params(net), 'mflop_per_image': forward_flops(net, x, t, labels=y) / 8 / 1e6,
                'curve': cb.curve, 'at_steps': cb.points['steps'], 'at_cpu': cb.points.get('cpu'), 'final_loss': float(np.mean(learn.metrics.losses[-200:]))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--out', default='nbs/results/dit_variants.json'); ap.add_argument('--size', default='T')
    ap.add_argument('--steps', type=int, default=2000); ap.add_argument('--batch_size', type=int, default=32)
    ap.add_argument('--lr', type=float, default=1e-3); ap.add_argument('--ema', type=float, default=0.999)
    ap.add_argument('--eval_every', type=int, default=250); ap.add_argument('--n', type=int, default=2000)
    ap.add_argument('--seeds', default='0,1,2'); ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--study', default='blocks', choices=('blocks', 'patches')); ap.add_argument('--patches', default='7,4,2')
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    res = json.loads(out.read_text()) if out.exists() else {'settings': {k: v for k, v in vars(a).items() if k != 'out'}, 'runs': []}
    study = Study(a)
    if a.study == 'patches':
        for seed in [int(s) for s in a.seeds.split(',')]:
            for p in [int(p) for p in a.patches.split(',')]:
                if any(r['patch_size'] == p and r['seed'] == seed for r in res['runs']): continue
                t0 = time.time()
                r = study.run('adaln_zero', seed, None, patch=p) | {'wall_s': time.time() - t0}
                res['runs'].append(r)
                tmp = out.with_suffix('.tmp'); tmp.write_text(json.dumps(res, indent=1)); tmp.replace(out)
                print(f"patch {p} seed {seed}: {r['at_steps']} | {r['wall_s']:.0f} s", flush=True)
        return
    order = ['cross_attn'] + [b for b in BLOCKS if b != 'cross_attn']
    for seed in [int(s) for s in a.seeds.split(',')]:
        for block in order:
            if any(r['block'] == block and r['seed'] == seed for r in res['runs']): continue
            budget = res.get('cpu_budget_s')
            t0 = time.time()
            r = study.run(block, seed, budget if block != 'cross_attn' or budget is not None else None)
            if budget is None:                            # the first cross-attention run sets the CPU budget
                res['cpu_budget_s'] = budget = r['at_steps']['cpu_s']; r['at_cpu'] = r['at_steps']
            r['wall_s'] = time.time() - t0
            res['runs'].append(r)
            tmp = out.with_suffix('.tmp'); tmp.write_text(json.dumps(res, indent=1)); tmp.replace(out)
            print(f"{block} seed {seed}: {r['at_steps']} | at CPU budget {r['at_cpu']} | {r['wall_s']:.0f} s", flush=True)


if __name__ == '__main__': main()
