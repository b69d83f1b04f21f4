"""Data-parallel check for the Learner (tests/test_learner.py launches it).

    torchrun --standalone --nproc_per_node 2 learner_ddp.py OUTDIR 8 --accelerate   # two processes, 8 per process
    python learner_ddp.py OUTDIR 16                                                 # one process, the same global batch

Trains a tiny MLP on fixed data with a mean-reduced loss, so the averaged gradients of two processes
equal the gradient of the whole global batch. Each process writes OUTDIR/rank{r}.json (what it saw,
whether it is the main process, how many checkpoints it wrote, the logged losses); the main process
writes OUTDIR/weights.safetensors.
"""
import json, os, sys
from pathlib import Path
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

torch.set_num_threads(1)
import diffcourse.learner as L
from diffcourse.core import seed_everything

out, bs, use_acc = Path(sys.argv[1]), int(sys.argv[2]), '--accelerate' in sys.argv
out.mkdir(parents=True, exist_ok=True)

class Indexed(Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(7)
        self.x = torch.randn(64, 3, generator=g); self.y = self.x.sum(1, keepdim=True).tanh()
    def __len__(self): return len(self.x)
    def __getitem__(self, i): return self.x[i], self.y[i], i

seed_everything(0)
model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1))
dl = DataLoader(Indexed(), batch_size=bs, shuffle=True, generator=torch.Generator().manual_seed(1))
def loss(model, batch):
    x, y, _ = batch
    return ((model(x) - y) ** 2).mean()

class Seen(L.Callback):
    def __init__(self): self.seen = []
    def after_batch(self, learn):
        if learn.training: self.seen.append(learn.batch[2].tolist())

seen, ckpt = Seen(), L.CheckpointCB(out/'ckpt', every=2)
cbs = [seen, ckpt, L.MetricsCB(printer=None), L.GradClipCB(10.0)] + ([L.AccelerateCB()] if use_acc else [])
learn = L.Learner(model, dl, loss, lr=1e-2, cbs=cbs)
learn.fit(2)
rank = int(os.environ.get('RANK', 0))
info = {'rank': rank, 'world': int(os.environ.get('WORLD_SIZE', 1)), 'is_main': bool(cbs[-1].acc.is_main_process) if use_acc else True,
        'n_saved': len(ckpt.saved), 'seen': seen.seen, 'losses': learn.metrics.losses, 'steps': learn.step}
(out/f'rank{rank}.json').write_text(json.dumps(info))
if info['is_main']:
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in learn.model.state_dict().items()}, out/'weights.safetensors')
