#!/usr/bin/env python
"""Ship a VAE trained by tools/train_vae.py as `fmnist-vae`, and gather the ablation runs for chapter 10.

    python tools/export_vae.py --run runs/vae/ship-l1_perc_gan --name fmnist-vae
    python tools/export_vae.py --collect runs/vae --out nbs/results/vae_ablation.json

Shipping computes the latent scale factor (1 / std of the latents μ(x) over the 60,000 training images,
`diffcourse.vae.latent_scale`), puts it in the card's model arguments so `encode`/`decode` apply it, and copies
the run's measurements (test-set PSNR, SSIM, reconstruction FID/KID) and command into the card.
"""
from __future__ import annotations
import argparse, json, os
from pathlib import Path

import torch
from safetensors.torch import load_file

from diffcourse.data import load_fashion_mnist
from diffcourse.pretrained import save_pretrained
from diffcourse.vae import ImageVAE, latent_scale


def collect(root:Path, out:Path):
    rows = [json.loads(f.read_text()) for f in sorted(root.glob('*-s[0-9]*/result.json'))]
    if not rows: raise SystemExit(f"no */result.json under {root}")
    tmp = out.with_name(out.name + '.tmp'); tmp.write_text(json.dumps(rows, indent=1) + '\n'); os.replace(tmp, out)
    print(f"{len(rows)} runs -> {out}")


def ship(run:Path, name:str, folder):
    res = json.loads((run/'result.json').read_text())
    kwargs = dict(in_channels=1, channels=list(res['channels']), latent_channels=4, num_res=1, norm_groups=8, head_dim=32, image_size=28)
    model = ImageVAE(**{**kwargs, 'channels': tuple(kwargs['channels'])})
    model.load_state_dict(load_file(str(run/'ema.safetensors')))
    train = load_fashion_mnist('train', download=False)
    scale, stats = latent_scale(model, train.images)
    model.scale = scale
    card = {'kind': 'vae',
            'model': {'module': 'diffcourse.vae', 'class': 'ImageVAE', 'kwargs': dict(kwargs, scale=scale)},
            'data': {'dataset': 'fmnist', 'image_shape': [1, 28, 28], 'n_images': len(train.images)},
            'latent': {'shape': list(model.latent_shape), 'scale': scale, 'unscaled_stats': stats},
            'training': {k: res[k] for k in ('recipe', 'steps', 'batch', 'lr', 'seed', 'precision', 'threads', 'disc_start', 'train_seconds')}
                        | {'minutes': round(res['train_seconds'] / 60, 1), 'weights': 'ema'},
            'measured': {k: res[k] for k in ('n', 'psnr', 'psnr_sd', 'ssim', 'n_fid', 'rfid', 'rkid', 'rkid_se', 'fid_floor', 'kid_floor')}
                        | {'on': 'Fashion-MNIST test set; FID/KID with the shipped fmnist-classifier'},
            'command': res['command'],
            'export_command': f'python tools/export_vae.py --run {run} --name {name}'}
    path = save_pretrained(model, card, name, folder=folder)
    print(f"{path}: scale {scale:.5f}, PSNR {res['psnr']:.2f} dB, rFID {res['rfid']:.2f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--run', help='a run folder of tools/train_vae.py to ship')
    p.add_argument('--name', default='fmnist-vae')
    p.add_argument('--folder', help="where to write (default: the package's weights folder)")
    p.add_argument('--collect', help='a folder of ablation runs (*-s<seed>/result.json) to gather')
    p.add_argument('--out', default='nbs/results/vae_ablation.json')
    a = p.parse_args(argv)
    if a.collect: collect(Path(a.collect), Path(a.out))
    if a.run: ship(Path(a.run), a.name, a.folder)
    if not (a.collect or a.run): p.error('give --run and/or --collect')


if __name__ == '__main__': main()
