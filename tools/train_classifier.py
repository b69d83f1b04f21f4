"""Train the Fashion-MNIST classifier that `diffcourse.metrics` uses as its feature extractor, and ship it.

    python tools/train_classifier.py --epochs 9 --lr 5e-3 --batch_size 128 --seed 0 --threads 1

(about 20 minutes on one busy CPU core; test accuracy 92.8%)

trains `diffcourse.metrics.FashionClassifier` on the 60,000 training images with random flips and shifts
(one-cycle AdamW, the Learner of chapter 04), measures its accuracy on the 10,000 test images, and writes
`diffcourse/weights/fmnist-classifier.{safetensors,json}` (float16 weights and the model card) with
`diffcourse.pretrained.save_pretrained`. The test set is only measured, never used to choose anything.
"""
from __future__ import annotations
import argparse, json, time
from pathlib import Path

import torch
import torch.nn.functional as F

from diffcourse.core import seed_everything
from diffcourse.data import load_fashion_mnist, get_dataloader
from diffcourse.learner import Learner, OneCycleCB, MetricsCB
from diffcourse.metrics import FashionClassifier
from diffcourse.pretrained import save_pretrained, load as load_pretrained


def augment(x:torch.Tensor, generator:torch.Generator, shift:int=2) -> torch.Tensor:
    "Random horizontal flips and random shifts of up to `shift` pixels (padding with black, -1)."
    B, C, H, W = x.shape
    flip = torch.rand(B, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    xp = F.pad(x, (shift,) * 4, value=-1.0)
    dy, dx = (torch.randint(0, 2 * shift + 1, (2, B), generator=generator))
    rows = dy[:, None] + torch.arange(H)                                   # (B, H)
    cols = dx[:, None] + torch.arange(W)                                   # (B, W)
    b = torch.arange(B)[:, None, None]
    return torch.stack([xp[b, c, rows[:, :, None], cols[:, None, :]] for c in range(C)], 1)


@torch.no_grad()
def accuracy(model, data, batch_size=500) -> float:
    model.eval()
    correct = sum((model(data.images[i:i + batch_size]).argmax(1) == data.labels[i:i + batch_size]).sum().item()
                  for i in range(0, len(data), batch_size))
    return correct / len(data)


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--epochs', type=int, default=9)
    p.add_argument('--lr', type=float, default=5e-3)
    p.add_argument('--batch_size', type=int, default=128)
    p.add_argument('--weight_decay', type=float, default=0.05)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--channels', type=int, nargs='+', default=[16, 32, 64, 128])
    p.add_argument('--run', default='runs/fmnist-classifier', help='where the float32 weights and the log go')
    p.add_argument('--name', default='fmnist-classifier')
    p.add_argument('--folder', default=None, help='where to ship the weights; default the package')
    p.add_argument('--export_only', action='store_true', help='ship the weights of an earlier run without training')
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    seed_everything(a.seed)
    run = Path(a.run); run.mkdir(parents=True, exist_ok=True)
    kwargs = {'channels': list(a.channels), 'num_classes': 10, 'in_channels': 1, 'dropout': 0.0}
    model = FashionClassifier(**kwargs)
    test = load_fashion_mnist('test')
    from safetensors.torch import save_file, load_file
    if not a.export_only:
        train = load_fashion_mnist('train')
        dl = get_dataloader(train, batch_size=a.batch_size, shuffle=True, seed=a.seed, drop_last=True)
        g = torch.Generator().manual_seed(a.seed + 1)
        def loss_func(model, batch):
            x, y = batch
            if model.training: x = augment(x, g)
            return F.cross_entropy(model(x), y)
        opt = lambda params, lr: torch.optim.AdamW(params, lr=lr, weight_decay=a.weight_decay)
        t0 = time.time()
        learn = Learner(model, dl, loss_func, lr=a.lr, opt_func=opt, cbs=[OneCycleCB(), MetricsCB()])
        learn.fit(a.epochs)
        wall = time.time() - t0
        acc32 = accuracy(model, test)
        print(f'test accuracy (float32): {acc32:.4f}, {wall/60:.1f} min', flush=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run/'model.safetensors'))
        (run/'log.json').write_text(json.dumps({'history': learn.metrics.history, 'wall_time_s': wall, 'test_accuracy_fp32': acc32,
                                                 'args': vars(a), 'steps': learn.step}, indent=1))
    log = json.loads((run/'log.json').read_text())
    args = log['args']
    kwargs['channels'] = list(args['channels'])
    model = FashionClassifier(**kwargs)
    model.load_state_dict(load_file(str(run/'model.safetensors')))
    shipped = FashionClassifier(**kwargs)
    shipped.load_state_dict({k: v.half().float() if v.is_floating_point() else v for k, v in model.state_dict().items()})
    acc16 = accuracy(shipped, test)
    cmd = (f"python tools/train_classifier.py --epochs {args['epochs']} --lr {args['lr']} --batch_size {args['batch_size']} "
           f"--weight_decay {args['weight_decay']} --seed {args['seed']} --threads {args['threads']} "
           f"--channels {' '.join(map(str, args['channels']))}")
    card = {'model': {'module': 'diffcourse.metrics', 'class': 'FashionClassifier', 'kwargs': kwargs},
            'kind': 'classifier',
            'data': {'dataset': 'fmnist', 'image_shape': [1, 28, 28], 'n_images': 60000, 'value_range': [-1, 1]},
            'training': {'epochs': args['epochs'], 'steps_done': log['steps'], 'batch_size': args['batch_size'], 'lr': args['lr'],
                         'optimizer': f"AdamW(weight_decay={args['weight_decay']}), one-cycle", 'augmentation': 'random horizontal flip, random shift up to 2 px',
                         'seed': args['seed'], 'threads': args['threads'], 'wall_time_s': round(log['wall_time_s'], 1),
                         'torch': torch.__version__, 'history': log['history']},
            'test_accuracy': round(acc16, 4),   # of the shipped float16 weights, loaded back as float32
            'command': cmd,
            'notes': 'Feature extractor for FID/KID (diffcourse.metrics.features: the 128-d pooled penultimate activations). '
                     'The test set was only measured, never used for choices during training.'}
    path = save_pretrained(model, card, a.name, folder=a.folder, max_mb=2.0)
    assert abs(accuracy(load_pretrained(a.name, folder=a.folder).model, test) - acc16) < 1e-9
    print(f'shipped {path} ({path.stat().st_size/1e6:.2f} MB), test accuracy after float16 round trip: {acc16:.4f}')


if __name__ == '__main__':
    main()
