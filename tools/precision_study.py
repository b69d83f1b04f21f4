#!/usr/bin/env python
"""bf16 against float32 training on a CPU: loss curves and sample quality, over seeds (chapter 04's study).

Each run trains the default ResAttnUNet on Fashion-MNIST through `diffcourse.cli.train_command` (the same
recipe as `diffcourse_train`) in one speed setting, then draws `--n` samples from its EMA weights by
DDIM with 50 steps ('leading' spacing, no clipping, float32 arithmetic) from one fixed set of
starting noises, and measures their FID and KID against the 10,000 test images with the shipped
classifier's features. One JSON file per run (its loss at every step, wall time, FID, KID) and its
first 16 samples (uint8 safetensors) go to `--out`; a run whose JSON exists is skipped, so an
interrupted study resumes where it stopped.

    # equal steps, three seeds each: is bf16 within float32's seed-to-seed spread?
    python tools/precision_study.py --steps 800 --settings fp32 bf16 --seeds 0 1 2 --threads 1
    # equal minutes: what the CLI's default ('auto') buys over float32 in ten minutes of one core
    python tools/precision_study.py --minutes 10 --settings fp32 auto --seeds 0 --threads 1

Runs go one after another; start two such commands with --threads 1 to use two cores.
"""
from __future__ import annotations
import argparse, json, os, platform, sys, time, tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file


def run_name(setting:str, seed:int, steps:int|None, minutes:float|None) -> str:
    budget = f'{steps}steps' if steps else f'{minutes:g}min'
    return f"{setting.replace('+', '-')}-seed{seed}-{budget}"


def one_run(setting, seed, steps, minutes, n, out:Path, threads, batch):
    from diffcourse.cli import train_command
    from diffcourse.data import load_fashion_mnist
    from diffcourse.metrics import evaluate
    from diffcourse.samplers import sample
    name = run_name(setting, seed, steps, minutes)
    if (out / f'{name}.json').exists(): print(f'{name}: done before, skipped', flush=True); return
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.time()
        res = train_command('resattn', 'fmnist', steps=steps, minutes=minutes, out=d, speed=setting, seed=seed, threads=threads,
                    n_samples=4, sample_steps=10, progress=True)
        train_s = time.time() - t0
    learn = res['learner']
    model = learn.sampling_model.eval()
    sched = learn.loss_func.schedule
    g = torch.Generator().manual_seed(1234)                                   # the same starting noise for every run
    x = torch.randn(n, 1, 28, 28, generator=g)
    t0, chunks = time.time(), []
    with torch.no_grad():
        for i in range(0, n, batch): chunks.append(sample(model, sched, x[i:i + batch], sampler='ddim', steps=50, spacing='leading'))
    imgs = torch.cat(chunks).clamp(-1, 1)
    sample_s = time.time() - t0
    m = evaluate(imgs, load_fashion_mnist('test').images)
    row = {'name': name, 'setting': setting, 'speed_used': res['speed'], 'seed': seed, 'steps': res['steps'],
           'minutes': minutes, 'train_wall_s': res['wall_time_s'], 'train_s_with_setup': train_s,
           'losses': [float(v) for v in learn.metrics.losses], 'final_loss_100': res['final_loss'],
           'fid': m['fid'], 'kid': m['kid'], 'kid_se': m['kid_se'], 'n': n, 'sampler': 'ddim', 'sample_steps': 50,
           'spacing': 'leading', 'clip': None, 'sample_s': sample_s, 'threads': threads,
           'cpu': platform.processor() or platform.machine(), 'torch': torch.__version__}
    out.mkdir(parents=True, exist_ok=True)
    save_file({'samples': ((imgs[:16] + 1) * 127.5).round().to(torch.uint8).contiguous()}, out / f'{name}.safetensors')
    tmp = out / f'.{name}.json.tmp'
    tmp.write_text(json.dumps(row)); os.replace(tmp, out / f'{name}.json')
    print(f"{name}: {row['steps']} steps in {row['train_wall_s']:.0f} s, FID {row['fid']:.2f}, KID {row['kid']*1e3:.2f}e-3", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--settings', nargs='+', default=['fp32', 'bf16'], help="speed settings (see diffcourse.learner.speed_cbs) or 'auto'")
    p.add_argument('--seeds', nargs='+', type=int, default=[0])
    p.add_argument('--steps', type=int, default=None, help='optimizer steps per run (or --minutes)')
    p.add_argument('--minutes', type=float, default=None, help='wall-time budget per run')
    p.add_argument('--n', type=int, default=2000, help='samples per run for FID/KID')
    p.add_argument('--batch', type=int, default=250, help='samples drawn at once')
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--out', default='nbs/results/precision_study')
    a = p.parse_args(argv)
    if (a.steps is None) == (a.minutes is None): raise SystemExit('give exactly one of --steps and --minutes')
    if a.n <= 128: raise SystemExit('--n must be above 128 (FID needs a full-rank covariance of 128 features)')
    from diffcourse.learner import speed_cbs
    for s in a.settings:
        if s != 'auto': speed_cbs(s)
    for seed in a.seeds:
        for s in a.settings: one_run(s, seed, a.steps, a.minutes, a.n, Path(a.out), a.threads, a.batch)


if __name__ == '__main__':
    main()
