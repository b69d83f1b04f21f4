#!/usr/bin/env python
"""Train chapter 10's image VAE (`diffcourse.vae.ImageVAE`) on Fashion-MNIST with one of the loss recipes, then measure it.

Recipes (the ablation in chapter 10):
  mse        mean squared error + KL (weight 1e-6 per pixel, as Stable Diffusion's autoencoder)
  l1_perc    L1 + KL + a perceptual loss on the shipped classifier's early activations
  l1_perc_gan  l1_perc + a PatchGAN hinge loss from `--disc_start` on, with taming's adaptive weight

Checkpoints go to `--out` every `--ckpt_every` steps (atomic; the run resumes from them if started again with the same
arguments). At the end the EMA weights are measured on the test set: mean per-image PSNR and SSIM over all 10,000
test images, and reconstruction FID/KID of the first `--n_fid` test images (shipped classifier) against the whole
test set, beside the same images unreconstructed (the floor). Results go to `--out`/result.json.

    python tools/train_vae.py --recipe l1_perc_gan --steps 800 --seed 0 --out runs/vae/l1_perc_gan-s0
"""
from __future__ import annotations
import argparse, json, os, sys, time
from pathlib import Path

import torch

from diffcourse.core import seed_everything
from diffcourse.data import load_fashion_mnist, get_dataloader
from diffcourse.learner import Learner, EMACB, CheckpointCB, CosineCB, MixedPrecisionCB, MetricsCB, find_checkpoint
from diffcourse.metrics import load_classifier
from diffcourse.vae import ImageVAE, AutoencoderLoss, PerceptualLoss, PatchDiscriminator, DiscriminatorCB, evaluate_autoencoder

RECIPES = ('mse', 'l1_perc', 'l1_perc_gan')


def make_loss(recipe:str, clf):
    if recipe == 'mse': return AutoencoderLoss(rec='mse')
    perc = PerceptualLoss(clf)
    if recipe == 'l1_perc': return AutoencoderLoss(rec='l1', perceptual=perc)
    return AutoencoderLoss(rec='l1', perceptual=perc, discriminator=PatchDiscriminator())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--recipe', choices=RECIPES, required=True)
    p.add_argument('--steps', type=int, default=800)
    p.add_argument('--batch', type=int, default=64)
    p.add_argument('--lr', type=float, default=1e-3)
    p.add_argument('--channels', type=int, nargs='+', default=[32, 64, 64])
    p.add_argument('--disc_start', type=float, default=0.5, help='fraction of --steps after which the discriminator comes in')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--threads', type=int)
    p.add_argument('--precision', choices=['fp32', 'bf16'], default='bf16')
    p.add_argument('--ckpt_every', type=int, default=200)
    p.add_argument('--n_fid', type=int, default=2000)
    p.add_argument('--out', required=True)
    a = p.parse_args(argv)
    if a.threads: torch.set_num_threads(a.threads)
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    seed_everything(a.seed)
    train, test = load_fashion_mnist('train', download=False), load_fashion_mnist('test', download=False)
    clf = load_classifier()
    model = ImageVAE(channels=tuple(a.channels))
    loss = make_loss(a.recipe, clf)
    cbs = [EMACB(decay=0.999), CosineCB(warmup=0.05), CheckpointCB(out/'checkpoints', every=a.ckpt_every, keep=1),
           MetricsCB(), ]
    if a.precision == 'bf16': cbs.append(MixedPrecisionCB('bf16'))
    if loss.discriminator is not None: cbs.append(DiscriminatorCB(start=int(a.disc_start * a.steps)))
    dl = get_dataloader(train, batch_size=a.batch, seed=a.seed, drop_last=True)
    learn = Learner(model, dl, loss, lr=a.lr, cbs=cbs, config=dict(recipe=a.recipe, seed=a.seed))
    t0 = time.perf_counter()
    ck = (out/'checkpoints')
    done_before = 0
    if ck.exists() and any(ck.glob('step-*')):
        done_before = json.loads((find_checkpoint(ck)/'state.json').read_text())['step']
        print(f'resuming from step {done_before}', flush=True)
        learn.resume(ck)
    else:
        learn.fit(steps=a.steps)
    train_s = time.perf_counter() - t0
    hist = next(cb for cb in learn.cbs if isinstance(cb, MetricsCB))
    ema = learn.sampling_model.eval()
    res = evaluate_autoencoder(ema, test.images, n_fid=a.n_fid)
    res.update(recipe=a.recipe, seed=a.seed, steps=a.steps, batch=a.batch, lr=a.lr, channels=a.channels, precision=a.precision,
               disc_start=int(a.disc_start * a.steps) if a.recipe == 'l1_perc_gan' else None,
               n_params=sum(p.numel() for p in model.parameters()), train_seconds=round(train_s, 1), resumed_from=done_before,
               threads=torch.get_num_threads(), command='python tools/train_vae.py ' + ' '.join(argv or sys.argv[1:]))
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(out/'ema.safetensors'))
    tmp = out/'result.json.tmp'; tmp.write_text(json.dumps(res, indent=1)); os.replace(tmp, out/'result.json')
    print(json.dumps({k: res[k] for k in ('recipe', 'seed', 'psnr', 'ssim', 'rfid', 'fid_floor', 'train_seconds')}), flush=True)


if __name__ == '__main__': main()
