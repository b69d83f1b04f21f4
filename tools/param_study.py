#!/usr/bin/env python
"""Chapter 14's comparison: one latent UNet trained on each target (ε, x₀, v, flow velocity) for the same CPU time, over seeds.

    python tools/param_study.py --out nbs/results/parametrisations.json --minutes 5 --seeds 0,1

For each seed and target, chapter 11's latent UNet (ResUNet, 4 channels in, one level of `--channels`,
no attention, unconditional) trains on fmnist-vae's latents of Fashion-MNIST with `TargetLoss`, the
Learner, AdamW at `--lr` after a 100-step warm-up, batch `--batch_size`, a warmed-up EMA, float32, one
torch thread, until it has spent `--minutes` of CPU time (time.process_time, evaluation excluded).
Every `--eval_every` steps it records the held-out ε-MSE of the EMA weights on 2,000 test latents at
fixed timesteps in [100, 900) of the cosine schedule and fixed noise: every target converted to ε̂
(`AsEps`), so the four curves share one unit. At the end, `--n` samples from the same starting noise, decoded by fmnist-vae, are
scored against the 10,000 test images by the shipped classifier (FID, KID) at each of `--steps`
sampler steps: DDIM ('leading' spacing, unclamped) for ε, x₀ and v, and Euler for the flow model, plus
the flow model through DDIM (`AsEps`) at the step counts up to 10, and the ε-model's DDIM at
`--ref_steps` steps, the reference. Then the x̂₀-MSE on the held-out latents in the timestep bands [0, 100),
[100, 900) and [900, 1000), and the straightness of the deterministic sampler's 100-step paths from the
first `--n_paths` starting noises (Euler for flow, DDIM for the others, in the straight path's coordinates).
Results are written after every run, and the first `--keep` decoded samples of every evaluation of
seed `--picture_seed` go to <out>_samples.safetensors (uint8); a rerun skips the runs already in the file.
"""
import argparse, json, time
from pathlib import Path

import numpy as np
import torch

from diffcourse.core import seed_everything
from diffcourse.data import get_dataloader, load_fashion_mnist
from diffcourse.flow import TARGETS, TargetLoss, AsEps, split_prediction, ddim_sample_target, flow_sample, straightness
from diffcourse.learner import Learner, Callback, CancelFitException, EMACB
from diffcourse.latent import load_latents
from diffcourse.metrics import evaluate
from diffcourse.pretrained import build_schedule, load as load_pretrained
from diffcourse.samplers import sample, sampler_timesteps
from diffcourse.unet import ResUNet, count_params


@torch.no_grad()
def heldout_eps_mse(model, target, sched, z, seed=0, t_range=(100, 900)):
    """ε-MSE of a model of any target on held-out latents `z`, at timesteps in `t_range` and noise fixed by `seed`.

    The range keeps the comparison fair: on the cosine schedule t in [100, 900) is |log-SNR| < 3.7, where turning an x₀- or
    flow prediction into ε̂ multiplies its error by at most 6; at the ends the conversion alone would decide the mean."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(*t_range, (len(z),), generator=g); eps = torch.randn(z.shape, generator=g)
    m = AsEps(model, target, sched)
    out = [torch.nn.functional.mse_loss(m(sched.add_noise(zb, eb, tb), tb), eb, reduction='sum')
           for zb, eb, tb in zip(z.split(500), eps.split(500), t.split(500))]
    return float(sum(out) / eps.numel())


BANDS = ((0, 100), (100, 900), (900, 1000))

@torch.no_grad()
def heldout_x0_mse_bands(model, target, sched, z, seed=1, bands=BANDS, time_scale=1000.):
    "Per band of timesteps: the MSE of the model's own x̂₀ on held-out latents `z` (noise fixed by `seed`), the error a DDIM step carries."
    g, res = torch.Generator().manual_seed(seed), []
    for lo, hi in bands:
        t = torch.randint(lo, hi, (len(z),), generator=g); eps = torch.randn(z.shape, generator=g)
        err = 0.
        for zb, eb, tb in zip(z.split(500), eps.split(500), t.split(500)):
            ab = sched.alphas_cumprod[tb].view(-1, *[1] * (zb.ndim - 1)).float()
            a, b = ab.sqrt(), (1 - ab).sqrt()
            if target == 'flow':                                 # the same signal-to-noise ratio on the straight path, as AsEps asks it
                s = b / (a + b); xs = (1 - s) * zb + s * eb
                x0 = split_prediction(model(xs, (s * time_scale).reshape(-1)), xs, 1 - s, s, 'flow')[1]
            else:
                xt = a * zb + b * eb
                x0 = split_prediction(model(xt, tb), xt, a, b, target)[1]
            err += float(((x0 - zb) ** 2).sum())
        res.append(err / z.numel())
    return res


@torch.no_grad()
def path_straightness(model, target, sched, x, steps=100):
    """Mean straightness of the deterministic sampler's paths from `x`, in the straight path's coordinates x / (a + b):
    Euler for the flow model, DDIM ('leading') for the others, as chapter 14 draws them on the two moons."""
    if target == 'flow':
        pts = [x.clone()]
        flow_sample(model, x, steps=steps, callback=lambda i, s, xx, x0: pts.append(xx.clone()))
    else:
        ts = sampler_timesteps(sched.T, steps, 'leading').tolist()
        ab = sched.alphas_cumprod
        scale = lambda t: float(1 / (ab[t].sqrt() + (1 - ab[t]).sqrt())) if t >= 0 else 1.
        pts = [x * scale(ts[0])]
        ddim_sample_target(model, sched, x, target=target, steps=steps, spacing='leading',
                           callback=lambda i, t, xx, x0: pts.append(xx * scale(ts[i + 1] if i + 1 < len(ts) else -1)))
    return float(straightness(torch.stack(pts)).mean())


class BudgetCB(Callback):
    "Warm up the LR over 100 steps; record the held-out ε-MSE every `every` steps; stop at `budget` CPU seconds."
    order = 20   # after the EMA update
    def __init__(self, study, target, budget, every, lr):
        self.study, self.target, self.budget, self.every, self.lr = study, target, budget, every, lr
        self.curve, self.cpu = [], 0.

    def before_fit(self, learn): self.t0 = time.process_time()

    def before_batch(self, learn):
        if learn.training:
            for g in learn.opt.param_groups: g['lr'] = self.lr * min(1., (learn.step + 1) / 100)

    def after_batch(self, learn):
        if not learn.training: return
        self.cpu += time.process_time() - self.t0
        if learn.step % self.every == 0 or self.cpu >= self.budget:
            was = learn.ema_model.training; learn.ema_model.eval()
            self.curve.append((learn.step, self.cpu, heldout_eps_mse(learn.ema_model, self.target, self.study.sched, self.study.held)))
            learn.ema_model.train(was)
        if self.cpu >= self.budget: raise CancelFitException()
        self.t0 = time.process_time()


class Study:
    def __init__(self, a):
        self.a = a
        self.vae = load_pretrained('fmnist-vae')
        self.train = load_latents(self.vae, 'fmnist', n=a.n_data, progress=False)
        self.held = load_latents(self.vae, 'fmnist', split='test', n=a.n_held, progress=False).images
        self.reference = load_fashion_mnist('test').images
        self.sched = build_schedule({'name': 'cosine', 'T': 1000})
        self.noise = torch.randn((a.n, *self.train.images.shape[1:]), generator=torch.Generator().manual_seed(100))

    @torch.no_grad()
    def quality(self, model, target, sampler, steps):
        z = []
        for x in self.noise.split(500):
            if sampler == 'euler': z.append(flow_sample(model, x, steps=steps))
            elif target == 'flow': z.append(sample(AsEps(model, 'flow', self.sched), self.sched, x, sampler='ddim', steps=steps))
            else: z.append(ddim_sample_target(model, self.sched, x, target=target, steps=steps, spacing='leading'))
        imgs = self.vae.decode(torch.cat(z)).clamp(-1, 1)
        r = evaluate(imgs, self.reference)
        self.last = ((imgs[:self.a.keep] + 1) * 127.5).round().to(torch.uint8)   # the first images, for the chapter's pictures
        return {'sampler': sampler, 'steps': steps} | {k: float(r[k]) for k in ('fid', 'kid', 'kid_se')}

    def evaluate_all(self, m, target):
        "FID/KID at every step count (and the extra samplers), with the first `keep` images of each as uint8."
        a, specs = self.a, [('euler' if target == 'flow' else 'ddim', s) for s in self.a.steps]
        if target == 'flow': specs += [('ddim', s) for s in a.steps if s <= 10]      # the same model through DDIM, where few steps tell them apart
        if target == 'eps': specs.append(('ddim', a.ref_steps))
        evals, pics = [], {}
        for sampler, steps in specs:
            evals.append(self.quality(m, target, sampler, steps))
            pics[f'{target}_{sampler}{steps}'] = self.last
        self.extra = {'x0_mse_bands': heldout_x0_mse_bands(m, target, self.sched, self.held),
                      'straightness': path_straightness(m, target, self.sched, self.noise[:a.n_paths])}
        return evals, pics

    def run(self, target, seed):
        a = self.a
        seed_everything(seed)
        net = ResUNet(in_channels=self.train.images.shape[1], channels=(a.channels,), attention=(False,))
        dl = get_dataloader(self.train, batch_size=a.batch_size, shuffle=True, seed=seed, drop_last=True)
        cb = BudgetCB(self, target, a.minutes * 60, a.eval_every, a.lr)
        learn = Learner(net, dl, TargetLoss(target, self.sched), lr=a.lr, cbs=[EMACB(a.ema), cb])
        learn.fit(steps=10 ** 9)
        m = learn.ema_model.eval()
        if a.models:
            from safetensors.torch import save_file
            Path(a.models).mkdir(parents=True, exist_ok=True)
            f = Path(a.models) / f'{target}_seed{seed}.safetensors'; tmp = f.with_suffix('.tmp')
            save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp)); tmp.replace(f)
        t0 = time.time()
        evals, self.pics = self.evaluate_all(m, target)
        losses = learn.metrics.losses
        return {'target': target, 'seed': seed, 'params': count_params(net), 'steps_done': learn.step, 'cpu_s': cb.cpu,
                'curve': cb.curve, 'final_loss': float(np.mean(losses[-200:])), 'evals': evals, 'eval_wall_s': time.time() - t0} | self.extra


def _save_pictures(f:Path, pics:dict):
    "Add `pics` (name -> uint8 images) to the safetensors file `f`, written atomically."
    from safetensors.torch import load_file, save_file
    allp = (load_file(str(f)) if f.exists() else {}) | {k: v.contiguous() for k, v in pics.items()}
    tmp = f.with_suffix('.tmp'); save_file(allp, str(tmp)); tmp.replace(f)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--out', default='nbs/results/parametrisations.json')
    ap.add_argument('--targets', default=','.join(TARGETS)); ap.add_argument('--seeds', default='0,1')
    ap.add_argument('--minutes', type=float, default=5.0, help='CPU minutes of training per run')
    ap.add_argument('--channels', type=int, default=128); ap.add_argument('--batch_size', type=int, default=32)
    ap.add_argument('--lr', type=float, default=2e-3); ap.add_argument('--ema', type=float, default=0.999)
    ap.add_argument('--eval_every', type=int, default=500); ap.add_argument('--n', type=int, default=2000)
    ap.add_argument('--steps', default='5,10,20,50'); ap.add_argument('--ref_steps', type=int, default=100)
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--n_data', type=int, default=None, help='train on a fixed subset of this many images (default: all 60,000)')
    ap.add_argument('--n_held', type=int, default=2000, help='held-out test latents for the ε-MSE')
    ap.add_argument('--keep', type=int, default=8, help='decoded samples kept per evaluation for the pictures')
    ap.add_argument('--picture_seed', type=int, default=0, help='the seed whose samples are kept')
    ap.add_argument('--n_paths', type=int, default=256, help='sampler paths (100 steps) whose straightness is measured')
    ap.add_argument('--models', default=None, help="folder for each run's EMA weights (safetensors); none kept if not given")
    a = ap.parse_args(argv)
    a.steps = [int(s) for s in a.steps.split(',')]
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    res = json.loads(out.read_text()) if out.exists() else {'settings': {k: v for k, v in vars(a).items() if k not in ('out', 'targets', 'seeds', 'picture_seed', 'keep', 'models')}, 'runs': []}
    study = Study(a)
    for seed in [int(s) for s in a.seeds.split(',')]:
        for target in a.targets.split(','):
            if any(r['target'] == target and r['seed'] == seed for r in res['runs']): continue
            t0 = time.time()
            r = study.run(target, seed) | {'wall_s': time.time() - t0}
            res = json.loads(out.read_text()) if out.exists() else res          # another process may have added runs meanwhile
            res['runs'].append(r)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(f'.{target}{seed}.tmp'); tmp.write_text(json.dumps(res, indent=1)); tmp.replace(out)
            if seed == a.picture_seed: _save_pictures(out.with_name(out.stem + '_samples.safetensors'), study.pics)
            print(f"{target} seed {seed}: {r['steps_done']} steps, held-out ε-MSE {r['curve'][-1][2]:.4f}, "
                  + ', '.join(f"{e['sampler']}-{e['steps']} FID {e['fid']:.2f}" for e in r['evals']) + f", x̂₀-MSE by band {', '.join(f'{v:.3g}' for v in r['x0_mse_bands'])}, straightness {r['straightness']:.3f} | {r['wall_s']:.0f} s", flush=True)


if __name__ == '__main__': main()
