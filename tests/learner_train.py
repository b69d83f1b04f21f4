"""A small training run for the Learner's fault tests (tests/test_learner.py launches it).

    python learner_train.py OUT CKPT [--resume] [--every N] [--delay S] [--die-in-save K:FILE] [--bf16]

Trains a tiny MLP with dropout on shuffled data, a loss that draws noise, validation, EMA, one-cycle
and gradient clipping, writing checkpoints to CKPT every N steps, then saves the final model, EMA
and optimizer tensors to OUT (safetensors). `--resume` continues from CKPT instead of starting.
`--die-in-save K:FILE` SIGKILLs the process in the middle of writing FILE of the K-th checkpoint
(FILE: model.safetensors, state.json or latest), to test that a torn save leaves the last one intact.
"""
import argparse, os, signal, sys, time
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

torch.set_num_threads(1)
import diffcourse.learner as L
from diffcourse.core import seed_everything

p = argparse.ArgumentParser()
p.add_argument('out'); p.add_argument('ckpt')
p.add_argument('--resume', action='store_true')
p.add_argument('--every', type=int, default=5)
p.add_argument('--epochs', type=int, default=4)
p.add_argument('--delay', type=float, default=0.0)
p.add_argument('--die-in-save', default=None)
p.add_argument('--bf16', action='store_true', help='bf16 autocast (forced on any CPU)')
args = p.parse_args()

if args.die_in_save:
    k, fname = args.die_in_save.split(':')
    k, calls = int(k), {'n': 0}
    write_bytes = L._write_bytes
    def dying_write(path, data):
        if path.name == 'model.safetensors': calls['n'] += 1
        is_target = calls['n'] == k and (path.name == fname or (fname == 'latest' and path.name.startswith('.latest')))
        if is_target:
            with open(path, 'wb') as f: f.write(data[:len(data) // 2]); f.flush(); os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        write_bytes(path, data)
    L._write_bytes = dying_write

def make_learner():
    seed_everything(0)
    g = torch.Generator().manual_seed(123)
    X = torch.randn(96, 4, generator=g); Y = torch.sin(X @ torch.randn(4, 2, generator=g))
    Xv = torch.randn(32, 4, generator=g); Yv = torch.sin(Xv @ torch.randn(4, 2, generator=g))
    train = DataLoader(TensorDataset(X, Y), batch_size=8, shuffle=True)   # shuffles with torch's global RNG
    valid = DataLoader(TensorDataset(Xv, Yv), batch_size=16)
    model = nn.Sequential(nn.Linear(4, 32), nn.Dropout(0.1), nn.SiLU(), nn.Linear(32, 2))
    def loss(model, batch):                                   # randomness inside the loss, like a diffusion loss
        x, y = batch
        return ((model(x + 0.05 * torch.randn_like(x)) - y) ** 2).mean()
    class Slow(L.Callback):
        def after_batch(self, learn):
            if args.delay: time.sleep(args.delay)
    cbs = [L.EMACB(0.99), L.OneCycleCB(), L.GradClipCB(1.0), L.MetricsCB(printer=None),
           L.CheckpointCB(args.ckpt, every=args.every, keep=2), Slow()]
    if args.bf16: cbs.append(L.MixedPrecisionCB('bf16', cpu=True))
    return L.Learner(model, (train, valid), loss, lr=1e-2, cbs=cbs)

learn = make_learner()
if args.resume: learn.resume(args.ckpt)
else: learn.fit(args.epochs)

from safetensors.torch import save_file
out = {f'model.{k}': v.contiguous() for k, v in learn.model.state_dict().items()}
out.update({f'ema.{k}': v.contiguous() for k, v in learn.ema_model.state_dict().items()})
for i, st in learn.opt.state_dict()['state'].items():
    for k, v in st.items(): out[f'opt.{i}.{k}'] = v.reshape(-1).contiguous()
out['step'] = torch.tensor(learn.step)
save_file(out, args.out)
print('done', learn.step, flush=True)
