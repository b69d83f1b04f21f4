"""Training and sampling speed of the course's DiT against diffusers' DiTTransformer2DModel at the same configuration.

Both models are the same network: diffusers' model is made by `diffcourse.dit.to_diffusers` from
ours, so parameters (apart from diffusers' per-block copies of the timestep and label embedders)
and outputs are equal, and the script checks the outputs first. Everything runs in one process,
alternating rounds so that both see the same machine load; each training step is a forward pass,
the MSE against random targets, a backward pass and an AdamW step. Reported: images/s (median over
rounds) in float32 and in bf16 autocast, and our speed over diffusers'.

    python bench/bench_dit.py --out bench/results/bench_dit_cpu.json                 # DiT-XS on 4x7x7 latents, patch 1
    python bench/bench_dit.py --size 28 --in-channels 1 --patch 2                    # on pixels, patch 2

Not a test: timings depend on the machine and on what else runs on it.
"""
from __future__ import annotations
import argparse, contextlib, json, os, platform, statistics, sys, time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from bench_unet import cpu_name


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--model', default='XS', help='a preset of diffcourse.dit.DIT_SIZES')
    p.add_argument('--size', type=int, default=7); p.add_argument('--in-channels', type=int, default=4)
    p.add_argument('--patch', type=int, default=1); p.add_argument('--batch', type=int, default=64)
    p.add_argument('--rounds', type=int, default=8); p.add_argument('--steps', type=int, default=3)
    p.add_argument('--threads', type=int, default=2); p.add_argument('--out', default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from diffcourse.dit import DiT, to_diffusers, forward_flops
    torch.manual_seed(0)
    ours = DiT(in_channels=a.in_channels, image_size=a.size, patch_size=a.patch, size=a.model, num_classes=10)
    with torch.no_grad():
        for q in ours.parameters(): q.add_(torch.randn_like(q) * 0.02)
    theirs = to_diffusers(ours)
    B = a.batch
    x, t, y = torch.randn(B, a.in_channels, a.size, a.size), torch.randint(0, 1000, (B,)), torch.randint(0, 10, (B,))
    calls = {'course': lambda m: m(x, t, labels=y), 'diffusers': lambda m: m(x, t, class_labels=y).sample}
    models = {'course': ours, 'diffusers': theirs}
    with torch.no_grad(): diff = (calls['course'](ours.eval()) - calls['diffusers'](theirs.eval())).abs().max().item()
    assert diff < 1e-4, f"the two models differ by {diff}"
    flops = forward_flops(ours, x[:1], t[:1], labels=y[:1])
    res = {'machine': cpu_name(), 'torch': torch.__version__, 'threads': a.threads, 'config': vars(a), 'max_abs_output_difference': diff,
           'forward_mflop_per_image': flops / 1e6,
           'params': {k: sum(q.numel() for q in m.parameters()) for k, m in models.items()},
           'load_before': os.getloadavg()[0], 'train': {}, 'sample': {}}
    for prec in ('fp32', 'bf16'):
        ctx = (lambda: torch.autocast('cpu', dtype=torch.bfloat16)) if prec == 'bf16' else contextlib.nullcontext
        opts = {k: torch.optim.AdamW(m.parameters(), 1e-4) for k, m in models.items()}
        times = {k: [] for k in models}; stimes = {k: [] for k in models}
        for r in range(a.rounds + 1):
            for k in (list(models) if r % 2 else list(models)[::-1]):
                m = models[k].train()
                t0 = time.perf_counter()
                for _ in range(a.steps):
                    with ctx(): loss = F.mse_loss(calls[k](m).float(), x)
                    opts[k].zero_grad(); loss.backward(); opts[k].step()
                if r: times[k].append(B * a.steps / (time.perf_counter() - t0))
                m.eval(); t0 = time.perf_counter()
                with torch.no_grad(), ctx():
                    for _ in range(a.steps): calls[k](m)
                if r: stimes[k].append(B * a.steps / (time.perf_counter() - t0))
        for what, tt in (('train', times), ('sample', stimes)):
            med = {k: statistics.median(v) for k, v in tt.items()}
            res[what][prec] = {'images_per_s': med, 'ratio': med['course'] / med['diffusers']}
            print(f"{what:6s} {prec}: course {med['course']:.0f} img/s, diffusers {med['diffusers']:.0f} img/s, ratio {med['course'] / med['diffusers']:.2f}x", flush=True)
    res['load_after'] = os.getloadavg()[0]
    print(f"{res['machine']}, torch {res['torch']}, {a.threads} threads, DiT-{a.model}/{a.patch} on {a.in_channels}x{a.size}x{a.size}, batch {B}; "
          f"outputs differ by at most {diff:.1e}; load {res['load_before']:.2f} before, {res['load_after']:.2f} after")
    if a.out: Path(a.out).write_text(json.dumps(res, indent=1) + '\n')


if __name__ == '__main__': main()
