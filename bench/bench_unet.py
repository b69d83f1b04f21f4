"""Training and sampling speed of the course's UNet against diffusers' UNet2DModel at a matched size.

The two models are built so that their parameters and forward FLOPs (both counted, FLOPs with
`torch.utils.flop_counter`) are within 10% of each other; the script refuses to run otherwise. The
diffusers model is UNet2DModel with one ResNet per down level (its up levels have two), attention at
the lowest level and in its middle block; the course's ResAttnUNet matches it with `num_res=2` and a
first level of 36 channels (diffusers' up blocks hold one more ResNet than its down blocks, ours the
same number on both sides).

Each model runs in one or more *settings* (see `diffcourse.learner.speed_cbs`): 'fp32', 'bf16'
(torch.autocast to bfloat16, float32 weights), 'channels_last', 'bf16+channels_last', and any of
them '+compile'. Everything runs in one process, alternating: each round runs a few steps of every
contestant, in a rotating order, so that all see the same machine load. Reported: images/s (median
over rounds), achieved GFLOP/s (counted FLOPs per image times images/s), the first step's time
(warm-up, and compilation where asked), and ratios against diffusers in its own default precision
(float32) and at equal precision.

    python bench/bench_unet.py                                  # training, then sampling; 2 threads
    python bench/bench_unet.py --mode train --rounds 4 --steps 1 --threads 1 --batch 32   # a quick look
    python bench/bench_unet.py --compile                       # also the compiled settings

Not a test: timings depend on the machine and on what else runs on it.
"""
from __future__ import annotations
import argparse, contextlib, copy, json, os, platform, statistics, sys, time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode


def cpu_name() -> str:
    "The CPU's model name (from /proc/cpuinfo on Linux), else what platform knows."
    try:
        for line in open('/proc/cpuinfo'):
            if line.startswith('model name'): return line.split(':', 1)[1].strip()
    except OSError: pass
    return platform.processor() or platform.machine()


def build(in_channels:int, size:int, seed:int=0):
    "The course's ResAttnUNet and diffusers' UNet2DModel at matched parameters and FLOPs."
    from diffusers import UNet2DModel
    from diffcourse.unet import ResAttnUNet
    torch.manual_seed(seed)
    ours = ResAttnUNet(in_channels=in_channels, channels=(48, 96, 128), num_res=1, neck_length=3)
    theirs = UNet2DModel(
        sample_size=size, in_channels=in_channels, out_channels=in_channels,
        block_out_channels=(32, 64, 128), layers_per_block=1,
        down_block_types=('DownBlock2D', 'DownBlock2D', 'AttnDownBlock2D'),
        up_block_types=('AttnUpBlock2D', 'UpBlock2D', 'UpBlock2D'),
        attention_head_dim=32, norm_num_groups=8, act_fn='silu')
    return {'course': ours, 'diffusers': theirs}


CALLS = {'course': lambda m, x, t: m(x, t), 'diffusers': lambda m, x, t: m(x, t).sample}


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as fc: fn()
    return fc.get_total_flops()


class Contestant:
    "One model in one setting: a copy of the model, its optimizer, and a step function."
    def __init__(self, kind:str, model, setting:str, x, t, noise, train:bool):
        parts = setting.split('+')
        bad = [p for p in parts if p not in ('fp32', 'bf16', 'channels_last', 'compile')]
        if bad: raise SystemExit(f"unknown setting part {bad[0]!r} in {setting!r}")
        self.kind, self.setting, self.train = kind, setting, train
        self.name = f'{kind} {setting}'
        self.model = copy.deepcopy(model).train(train)
        self.x, self.t, self.noise = x, t, noise
        if 'channels_last' in parts:
            self.model = self.model.to(memory_format=torch.channels_last)
            self.x = x.contiguous(memory_format=torch.channels_last)
        self.bf16 = 'bf16' in parts
        self.fn = torch.compile(self.model) if 'compile' in parts else self.model
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4) if train else None
        self.secs, self.first = [], None

    def autocast(self):
        return torch.autocast('cpu', dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def step(self):
        call = CALLS[self.kind]
        if self.train:
            with self.autocast(): out = call(self.fn, self.x, self.t)
            loss = F.mse_loss(out.float(), self.noise)
            self.opt.zero_grad(set_to_none=True); loss.backward(); self.opt.step()
        else:
            with torch.no_grad(), self.autocast(): call(self.fn, self.x, self.t)


def run(models, settings, a, train:bool):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.batch, a.in_channels, a.size, a.size, generator=g)
    noise, t = torch.randn(x.shape, generator=g), torch.randint(0, 1000, (a.batch,), generator=g)
    cs = [Contestant(kind, models[kind], s, x, t, noise, train) for kind, s in settings]
    what = 'training step (forward, backward, AdamW)' if train else 'sampling call (forward, no grad)'
    print(f"\n## {what}: batch {a.batch} of {a.in_channels}x{a.size}x{a.size}, {a.rounds} rounds of {a.steps} steps", flush=True)
    for c in cs:                                                      # round 0: first steps, timed alone
        t0 = time.perf_counter(); c.step(); c.first = time.perf_counter() - t0
    for r in range(a.rounds):
        order = cs[r % len(cs):] + cs[:r % len(cs)]                   # rotate who goes first
        for c in order:
            t0 = time.perf_counter()
            for _ in range(a.steps): c.step()
            c.secs.append((time.perf_counter() - t0) / a.steps)
        print(f"  round {r + 1}: " + ', '.join(f"{c.name} {a.batch / c.secs[-1]:.0f}" for c in cs) + ' img/s', flush=True)
    return cs


def report(cs, flops_per_image:dict, a, train:bool) -> dict:
    "Print the table and ratios; return them for --out."
    ips = {c.name: a.batch / statistics.median(c.secs) for c in cs}
    res = {'rows': [{'model': c.kind, 'setting': c.setting, 'images_per_s': ips[c.name], 'first_step_s': c.first,
                     'gflops_per_s': flops_per_image[c.kind] * ips[c.name] / 1e9, 'round_images_per_s': [a.batch / s for s in c.secs]}
                    for c in cs], 'ratios': []}
    print(f"\n| model | setting | images/s (median) | GFLOP/s achieved | first step (s) |\n| --- | --- | --- | --- | --- |")
    for c in cs:
        gf = flops_per_image[c.kind] * ips[c.name] / 1e9
        print(f"| {c.kind} | {c.setting} | {ips[c.name]:.1f} | {gf:.1f} | {c.first:.2f} |")
    base = next((c for c in cs if c.kind == 'diffusers' and c.setting == 'fp32'), None)
    if base is None: return res
    print()
    for c in cs:
        if c.kind != 'course': continue
        per_round = [b / o for o, b in zip(c.secs, base.secs)]       # same rounds, same load
        res['ratios'].append({'course': c.setting, 'diffusers': 'fp32', 'median': statistics.median(per_round),
                              'min': min(per_round), 'max': max(per_round),
                              'per_flop': statistics.median(per_round) * flops_per_image['course'] / flops_per_image['diffusers']})
        print(f"course {c.setting} / diffusers fp32 (its default): {statistics.median(per_round):.2f}x images/s "
              f"(rounds {min(per_round):.2f} to {max(per_round):.2f}); per FLOP "
              f"{statistics.median(per_round) * flops_per_image['course'] / flops_per_image['diffusers']:.2f}x")
    for c in cs:
        same = next((d for d in cs if d.kind == 'diffusers' and d.setting == c.setting), None)
        if c.kind == 'course' and same is not None and same is not base:
            r = statistics.median(b / o for o, b in zip(c.secs, same.secs))
            res['ratios'].append({'course': c.setting, 'diffusers': c.setting, 'median': r})
            print(f"course {c.setting} / diffusers {c.setting} (equal precision): {r:.2f}x images/s")
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--mode', choices=('train', 'sample', 'both'), default='both')
    p.add_argument('--rounds', type=int, default=8, help='alternating rounds (after one untimed first step each)')
    p.add_argument('--steps', type=int, default=2, help='steps per contestant per round')
    p.add_argument('--batch', type=int, default=64)
    p.add_argument('--size', type=int, default=32, help='image height and width')
    p.add_argument('--in-channels', type=int, default=1)
    p.add_argument('--threads', type=int, default=2, help='torch.set_num_threads')
    p.add_argument('--compile', action='store_true', help='also time torch.compile settings (compilation takes minutes)')
    p.add_argument('--out', default=None, help='also write the results to this JSON file')
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from diffcourse.learner import cpu_has_bf16
    models = build(a.in_channels, a.size)
    x1, t1 = torch.randn(1, a.in_channels, a.size, a.size), torch.tensor([500])
    npar = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    fwd = {k: count_flops(lambda: CALLS[k](m, x1, t1)) for k, m in models.items()}
    trn = {k: count_flops(lambda: F.mse_loss(CALLS[k](m, x1, t1), x1).backward()) for k, m in models.items()}
    for m in models.values(): m.zero_grad(set_to_none=True)
    print(f"CPU: {cpu_name()}; bf16 in hardware: {cpu_has_bf16()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| model | parameters | forward MFLOP/image | training MFLOP/image |\n| --- | --- | --- | --- |")
    for k in models: print(f"| {k} | {npar[k]:,} | {fwd[k] / 1e6:.0f} | {trn[k] / 1e6:.0f} |")
    dp, df = npar['course'] / npar['diffusers'] - 1, fwd['course'] / fwd['diffusers'] - 1
    print(f"course against diffusers: parameters {dp:+.1%}, forward FLOPs {df:+.1%}")
    if abs(dp) > 0.10 or abs(df) > 0.10: raise SystemExit('the models are not matched within 10%: fix build()')
    ours = ['fp32', 'channels_last'] + (['bf16', 'bf16+channels_last'] if cpu_has_bf16() else [])
    theirs = ['fp32'] + (['bf16'] if cpu_has_bf16() else [])
    if a.compile: ours += [s + '+compile' for s in ours]; theirs += ['fp32+compile']
    settings = [('course', s) for s in ours] + [('diffusers', s) for s in theirs]
    out = {'cpu': cpu_name(), 'bf16_in_hardware': cpu_has_bf16(), 'torch': torch.__version__, 'threads': torch.get_num_threads(),
           'batch': a.batch, 'size': a.size, 'in_channels': a.in_channels, 'rounds': a.rounds, 'steps': a.steps,
           'load_average_before': os.getloadavg()[0] if hasattr(os, 'getloadavg') else None,
           'models': {k: {'parameters': npar[k], 'forward_mflop': fwd[k] / 1e6, 'training_mflop': trn[k] / 1e6,
                          'config': getattr(models[k], 'config', None) if k == 'course' else dict(models[k].config)} for k in models},
           'command': 'python bench/bench_unet.py ' + ' '.join(argv if argv is not None else sys.argv[1:])}
    if a.mode in ('train', 'both'): out['train'] = report(run(models, settings, a, True), trn, a, True)
    if a.mode in ('sample', 'both'): out['sample'] = report(run(models, settings, a, False), fwd, a, False)
    if hasattr(os, 'getloadavg'): out['load_average_after'] = os.getloadavg()[0]
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(out, indent=1, default=str))
        print(f"\nwritten to {a.out}")


if __name__ == '__main__':
    main()
