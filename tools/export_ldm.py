#!/usr/bin/env python
"""Ship a latent diffusion run as a model card: `diffcourse_export`, then the card's default sampler.

    python tools/export_ldm.py --ckpt runs/fmnist-ldm --name fmnist-ldm --sampler dpmpp_2m --steps 20 --spacing trailing --clip none

The checkpoint's record already names its VAE (`diffcourse_train --vae`); this writes the EMA
weights and card with `export_command`, sets the card's `sampling` entry (latents are not clamped
to [-1, 1]: `--clip none`, or a number such as the largest |z| of the training latents), adds
`--notes`, and checks the result by loading it (which also loads and checks its VAE).
"""
import argparse, json, sys
from pathlib import Path

from diffcourse.cli import export_command
from diffcourse import pretrained


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--ckpt', required=True); ap.add_argument('--name', default='fmnist-ldm')
    ap.add_argument('--folder', default=None)
    ap.add_argument('--sampler', default='dpmpp_2m'); ap.add_argument('--steps', type=int, default=20)
    ap.add_argument('--spacing', default='trailing'); ap.add_argument('--clip', default='none')
    ap.add_argument('--notes', default=None)
    a = ap.parse_args(argv)
    path = export_command(a.ckpt, name=a.name, folder=a.folder, notes=a.notes)
    card_path = path.with_suffix('.json')
    card = json.loads(card_path.read_text())
    if 'vae' not in card: sys.exit(f"{a.ckpt} was not trained on latents (no 'vae' in its record): use diffcourse_export")
    card['sampling'] = {'sampler': a.sampler, 'steps': a.steps, 'spacing': a.spacing,
                        'clip_sample': None if a.clip.lower() == 'none' else float(a.clip)}
    card['export_command'] = ' '.join(['python tools/export_ldm.py --ckpt <run folder>'] + [f'--{k} {v}' for k, v in
                                      (('name', a.name), ('sampler', a.sampler), ('steps', a.steps), ('spacing', a.spacing), ('clip', a.clip))])
    card_path.write_text(json.dumps(card, indent=1) + '\n')
    pre = pretrained.load(a.name, folder=a.folder)       # checks the weights, the sampling entry and the VAE
    print(pre, '| sampling', pre.sampling)


if __name__ == '__main__': main()
