"""Training throughput of the course's ResAttnUNet against diffusers' UNet2DModel at the same configuration.

Both models are built from one configuration (channels per level, blocks per level, attention at the
lowest level and in the bottleneck, heads, GroupNorm groups), trained on the same random batch with
the ε-prediction loss and AdamW, in one process, alternating a few steps of one with a few steps of
the other so that both see the same machine load. Prints images/s for both and their ratio.

    python bench/bench_unet.py                      # 10 rounds of 2 steps each, batch 128, 32x32, 2 threads
    python bench/bench_unet.py --rounds 4 --steps 1 --threads 1 --batch 32   # a quick look

Not a test: timings depend on the machine and on what else runs on it.
"""
from __future__ import annotations
import argparse, platform, statistics, time

import torch
import torch.nn.functional as F


def cpu_name() -> str:
    "The CPU's model name (from /proc/cpuinfo on Linux), else what platform knows."
    try:
        for line in open('/proc/cpuinfo'):
            if line.startswith('model name'): return line.split(':', 1)[1].strip()
    except OSError: pass
    return platform.processor() or platform.machine()


def build(in_channels:int, size:int, seed:int=0):
    "The default ResAttnUNet and a UNet2DModel of the same configuration."
    from diffusers import UNet2DModel
    from diffcourse.unet import ResAttnUNet
    torch.manual_seed(seed)
    ours = ResAttnUNet(in_channels=in_channels)
    cfg = ours.config
    if cfg['neck_length'] != 2 or not cfg['attention'][-1] or any(cfg['attention'][:-1]):
        raise ValueError("UNet2DModel's middle block is (res, attention, res) and its attention levels must be the lowest; "
                         f"this comparison needs neck_length=2 and attention at the lowest level only; got {cfg}")
    levels = len(cfg['channels'])
    theirs = UNet2DModel(
        sample_size=size, in_channels=in_channels, out_channels=in_channels,
        block_out_channels=cfg['channels'], layers_per_block=cfg['num_res'],
        down_block_types=('DownBlock2D',) * (levels - 1) + ('AttnDownBlock2D',),
        up_block_types=('AttnUpBlock2D',) + ('UpBlock2D',) * (levels - 1),
        attention_head_dim=cfg['head_dim'], norm_num_groups=cfg['norm_groups'], act_fn='silu')
    return {'course ResAttnUNet': ours, 'diffusers UNet2DModel': theirs}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--rounds', type=int, default=10, help='alternating rounds (the first is a warm-up, not counted)')
    p.add_argument('--steps', type=int, default=2, help='training steps per model per round')
    p.add_argument('--batch', type=int, default=128)
    p.add_argument('--size', type=int, default=32, help='image height and width')
    p.add_argument('--in-channels', type=int, default=1)
    p.add_argument('--threads', type=int, default=2, help='torch.set_num_threads')
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    models = build(a.in_channels, a.size)
    calls = {'course ResAttnUNet': lambda m, x, t: m(x, t), 'diffusers UNet2DModel': lambda m, x, t: m(x, t).sample}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.batch, a.in_channels, a.size, a.size, generator=g)
    noise, t = torch.randn(x.shape, generator=g), torch.randint(0, 1000, (a.batch,), generator=g)

    print(f"CPU: {cpu_name()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"batch {a.batch} of {a.in_channels}x{a.size}x{a.size}; {a.rounds} rounds of {a.steps} steps (round 0 is warm-up)")
    for k, m in models.items(): print(f"  {k}: {sum(p.numel() for p in m.parameters()):,} parameters")
    secs = {k: [] for k in models}                       # seconds per step, one entry per counted round
    for r in range(a.rounds):
        order = list(models) if r % 2 == 0 else list(models)[::-1]     # alternate who goes first
        for k in order:
            m, opt = models[k], opts[k]
            t0 = time.perf_counter()
            for _ in range(a.steps):
                loss = F.mse_loss(calls[k](m, x, t), noise)
                opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
            if r: secs[k].append((time.perf_counter() - t0) / a.steps)
        if r: print(f"  round {r}: " + ', '.join(f"{k} {a.batch / secs[k][-1]:.1f} img/s" for k in models), flush=True)

    ours, theirs = list(models)
    ratios = [b / o for o, b in zip(secs[ours], secs[theirs])]           # per round: same load for both
    print(f"\n| model | images/s (median of rounds) | images/s (best round) |\n| --- | --- | --- |")
    for k in models: print(f"| {k} | {a.batch / statistics.median(secs[k]):.1f} | {a.batch / min(secs[k]):.1f} |")
    print(f"\nspeed ratio course / diffusers: median over rounds {statistics.median(ratios):.2f} "
          f"(range {min(ratios):.2f} to {max(ratios):.2f}); best rounds {min(secs[theirs]) / min(secs[ours]):.2f}")


if __name__ == '__main__':
    main()
