#!/usr/bin/env python
"""Quality against cost for every sampler on the shipped `fmnist-ddpm` model (chapter 09's study).

For each sampler, spacing and step count: `--n` samples from one fixed set of starting noises (and
one seed for the noise draws), their FID and KID against the Fashion-MNIST test set (features of the
shipped classifier, `diffcourse.metrics`), the classes the classifier sees in them, and the wall time.
DDPM with all 1,000 steps is the reference, run first; a second DDPM-1000 set from other noise shows
how much FID moves between two draws of the same sampler. Rows are written to `--out`.json after
each setting, so an interrupted run keeps what it finished; the first `--keep` samples of each
setting go to `--out`.safetensors (uint8) for the chapter's grids.

    python tools/sampler_study.py --n 5000 --device cuda --out nbs/results/sampler_study

`--model` takes a run folder written by `diffcourse_train` or `tools/continue_training.py` (its EMA
weights) instead of the shipped model; `--only ddpm:1000:leading dpmpp_2m:20:trailing` runs just
those settings, in that order.
"""
from __future__ import annotations
import argparse, json, os, platform, sys, time
from pathlib import Path

import torch
from safetensors.torch import save_file

from diffcourse.data import load_fashion_mnist
from diffcourse.metrics import features, fid, kid, load_classifier, predict
from diffcourse.pretrained import load
from diffcourse.samplers import SAMPLERS, n_model_calls, sample


def settings(samplers, spacings, steps, ddpm_steps, second=True):
    "The settings in the order they run: the references first, then the ones the issue's targets name."
    out = [('ddpm', ddpm_steps, 'leading', 0), ('dpmpp_2m', 20, 'leading', 0), ('ddim', 50, 'leading', 0)]
    for sp in spacings:
        for s in samplers:
            for n in steps:
                if (s, n, sp, 0) not in out: out.append((s, n, sp, 0))
    if second: out.append(('ddpm', ddpm_steps, 'leading', 1))   # a second DDPM set, from other noise: the draw-to-draw spread
    return out


def parse_setting(text:str):
    "'sampler:steps:spacing' as (sampler, steps, spacing, noise_seed 0)."
    try: s, n, sp = text.split(':'); n = int(n)
    except ValueError: raise SystemExit(f"--only: {text!r} is not sampler:steps:spacing, e.g. dpmpp_2m:20:trailing") from None
    if s not in SAMPLERS: raise SystemExit(f"--only: unknown sampler {s!r}; one of {', '.join(SAMPLERS)}")
    return (s, n, sp, 0)


def load_model(model:str, dev):
    "(name, model, schedule, how it was trained) of a shipped model's name, a NAME.safetensors beside its NAME.json card, or a run folder's EMA weights."
    if model.endswith('.safetensors'):
        pre = load(Path(model).stem, device=dev, folder=Path(model).parent)
        return model, pre.model, pre.schedule, pre.card.get('training')
    if Path(model).exists():
        from diffcourse.cli import _from_checkpoint
        m, sched, rec, ck = _from_checkpoint(model)
        return str(ck['path']), m.to(dev), sched, dict(rec.get('training', {}), steps_done=ck['meta'].get('step'))
    pre = load(model, device=dev)
    return model, pre.model, pre.schedule, pre.card.get('training')


@torch.no_grad()
def heldout_eps_mse(model, schedule, images, batch=250, seed=1234):
    "The DDPM objective with its randomness frozen: mean ‖ε_θ(x_t, t) - ε‖² over `images` at t = 50, 150, …, 950, one seeded ε each."
    g, dev, total = torch.Generator().manual_seed(seed), next(model.parameters()).device, []
    for t in range(50, 1000, 100):
        eps = torch.randn(images.shape, generator=g)
        for i in range(0, len(images), batch):
            x0, e = images[i:i + batch].to(dev), eps[i:i + batch].to(dev)
            tt = torch.full((len(x0),), t, device=dev)
            total.append(((model(schedule.add_noise(x0, e, tt), tt) - e) ** 2).mean(dim=(1, 2, 3)).cpu())
    return torch.cat(total).mean().item()


def atomic_write(path: Path, write):
    tmp = path.with_name(path.name + '.tmp')
    write(tmp)
    os.replace(tmp, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--n', type=int, default=2000, help='samples per setting (FID needs more than 128)')
    p.add_argument('--steps', type=int, nargs='+', default=[5, 10, 20, 50, 100])
    p.add_argument('--samplers', nargs='+', default=list(SAMPLERS))
    p.add_argument('--spacings', nargs='+', default=['leading', 'trailing'])
    p.add_argument('--ddpm_steps', type=int, default=1000)
    p.add_argument('--batch', type=int, default=5000, help='images per sampling call')
    p.add_argument('--clip', type=float, default=1.0, help="clip_sample for every sampler (0: none)")
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--budget_s', type=float, default=float('inf'), help='stop starting new settings after this many seconds')
    p.add_argument('--no_second', action='store_true', help='skip the second DDPM reference set')
    p.add_argument('--keep', type=int, default=16, help='samples of each setting kept for grids')
    p.add_argument('--model', default='fmnist-ddpm', help="a shipped model's name, a NAME.safetensors with its card, or a run folder (its EMA weights)")
    p.add_argument('--only', nargs='*', help='run just these settings, as sampler:steps:spacing (none: only --heldout)')
    p.add_argument('--variance', choices=['beta', 'posterior'], help="the variance of the 'ddpm' rows (default: sample()'s, β)")
    p.add_argument('--threads', type=int, help='torch CPU threads')
    p.add_argument('--heldout', type=int, default=0, help='also record the ε-MSE on this many test images (10 timesteps each)')
    p.add_argument('--out', default='nbs/results/sampler_study', help='path without extension')
    a = p.parse_args(argv)
    if a.n <= 128: p.error(f"--n must be more than 128, the classifier's feature width (FID needs a full-rank covariance); got {a.n}")
    if a.threads: torch.set_num_threads(a.threads)
    t_start, dev = time.perf_counter(), torch.device(a.device)
    out = Path(a.out); out.parent.mkdir(parents=True, exist_ok=True)
    only = [parse_setting(o) for o in a.only] if a.only is not None else None   # a bad --only fails before loading
    name, model, schedule, training = load_model(a.model, dev)
    clf = load_classifier(dev)
    test = load_fashion_mnist('test', download=False)
    ref = features(test.images, clf)
    clip = a.clip or None
    sync = torch.cuda.synchronize if dev.type == 'cuda' else (lambda: None)
    meta = dict(model=name, training=training, variance=a.variance, n=a.n, reference='Fashion-MNIST test set', n_reference=len(ref), clip_sample=clip,
                device=torch.cuda.get_device_name(dev) if dev.type == 'cuda' else platform.processor() or 'cpu',
                torch=torch.__version__, batch=a.batch, command='python tools/sampler_study.py ' + ' '.join(argv or sys.argv[1:]))
    if a.heldout:
        meta.update(heldout_images=a.heldout, heldout_eps_mse=heldout_eps_mse(model, schedule, test.images[:a.heldout]))
        print(f"held-out ε-MSE on {a.heldout:,} test images × 10 timesteps: {meta['heldout_eps_mse']:.5f}", flush=True)
    rows, kept = [], {}
    # warm-up so the first timed setting does not pay for kernel selection
    sample(model, schedule, torch.randn(min(a.batch, a.n), 1, 28, 28, device=dev), sampler='ddim', steps=2)
    todo = only if only is not None else settings(a.samplers, a.spacings, a.steps, a.ddpm_steps, not a.no_second)
    if not todo: atomic_write(out.with_suffix('.json'), lambda t: t.write_text(json.dumps(dict(meta, rows=[]), indent=1)))
    for s, steps, spacing, noise_seed in todo:
        if time.perf_counter() - t_start > a.budget_s: print('budget spent; stopping', flush=True); break
        x = torch.randn(a.n, 1, 28, 28, generator=torch.Generator().manual_seed(10 + noise_seed)).to(dev)
        g = torch.Generator().manual_seed(20 + noise_seed)    # CPU generator: the same draws on any device
        sync(); t0 = time.perf_counter()
        kw = dict(variance=a.variance) if s == 'ddpm' and a.variance else {}
        imgs = torch.cat([sample(model, schedule, x[i:i + a.batch], sampler=s, steps=steps, spacing=spacing,
                                 generator=g, clip_sample=clip, **kw) for i in range(0, a.n, a.batch)])
        sync(); sec = time.perf_counter() - t0
        imgs = imgs.clamp(-1, 1)
        f = features(imgs, clf)
        k, k_se = kid(f, ref)
        counts = torch.bincount(predict(imgs, clf), minlength=10)
        row = dict(sampler=s, steps=steps, spacing=spacing, noise_seed=noise_seed, model_calls=n_model_calls(s, steps),
                   seconds=round(sec, 3), fid=fid(f, ref), kid=k, kid_se=k_se, finite=bool(torch.isfinite(imgs).all()),
                   class_fractions=(counts / counts.sum()).tolist())
        rows.append(row)
        kept[f"{s}|{steps}|{spacing}|{noise_seed}"] = ((imgs[:a.keep] + 1) * 127.5).round().to(torch.uint8).cpu()
        print(f"{s:9s} {steps:5d} {spacing:9s} seed {noise_seed}: FID {row['fid']:8.3f}  KID {k:.5f} ± {k_se:.5f}  "
              f"{sec:7.2f} s  ({time.perf_counter() - t_start:.0f} s in)", flush=True)
        atomic_write(out.with_suffix('.json'), lambda t: t.write_text(json.dumps(dict(meta, rows=rows), indent=1)))
        atomic_write(out.with_suffix('.safetensors'), lambda t: save_file(kept, str(t), metadata={'keys': 'sampler|steps|spacing|noise_seed'}))
    print(f"{len(rows)} settings in {time.perf_counter() - t_start:.0f} s")


if __name__ == '__main__': main()
