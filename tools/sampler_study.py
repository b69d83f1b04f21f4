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
    p.add_argument('--out', default='nbs/results/sampler_study', help='path without extension')
    a = p.parse_args(argv)
    t_start, dev = time.perf_counter(), torch.device(a.device)
    out = Path(a.out); out.parent.mkdir(parents=True, exist_ok=True)
    pre, clf = load('fmnist-ddpm', device=dev), load_classifier(dev)
    test = load_fashion_mnist('test', download=False)
    ref = features(test.images, clf)
    clip = a.clip or None
    sync = torch.cuda.synchronize if dev.type == 'cuda' else (lambda: None)
    meta = dict(model='fmnist-ddpm', n=a.n, reference='Fashion-MNIST test set', n_reference=len(ref), clip_sample=clip,
                device=torch.cuda.get_device_name(dev) if dev.type == 'cuda' else platform.processor() or 'cpu',
                torch=torch.__version__, batch=a.batch, command='python tools/sampler_study.py ' + ' '.join(argv or sys.argv[1:]))
    rows, kept = [], {}
    # warm-up so the first timed setting does not pay for kernel selection
    sample(pre.model, pre.schedule, torch.randn(min(a.batch, a.n), 1, 28, 28, device=dev), sampler='ddim', steps=2)
    for s, steps, spacing, noise_seed in settings(a.samplers, a.spacings, a.steps, a.ddpm_steps, not a.no_second):
        if time.perf_counter() - t_start > a.budget_s: print('budget spent; stopping', flush=True); break
        x = torch.randn(a.n, 1, 28, 28, generator=torch.Generator().manual_seed(10 + noise_seed)).to(dev)
        g = torch.Generator().manual_seed(20 + noise_seed)    # CPU generator: the same draws on any device
        sync(); t0 = time.perf_counter()
        imgs = torch.cat([sample(pre.model, pre.schedule, x[i:i + a.batch], sampler=s, steps=steps, spacing=spacing,
                                 generator=g, clip_sample=clip) for i in range(0, a.n, a.batch)])
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
