"The Learner: callback order, budgets, EMA, LR finder, NaN guard, checkpoints and exact resume, W&B offline, Accelerate."
import json, os, random, re, shutil, signal, struct, subprocess, sys, time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import diffcourse.learner as L
from diffcourse.learner import (Learner, Callback, MetricsCB, EMACB, CheckpointCB, OneCycleCB, CosineCB, GradClipCB,
                                MixedPrecisionCB, ProgressCB, WandbCB, LRScheduleCB, CancelFitException,
                                CancelEpochException, CancelBatchException, NonFiniteLossError, ema_decay, one_cycle,
                                read_checkpoint, load_weights, find_checkpoint, EVENTS, ChannelsLastCB, CompileCB,
                                speed_cbs, speed_settings, measure_speed, fastest_setting, cpu_has_bf16)
from diffcourse.core import seed_everything

HERE = Path(__file__).parent
ROOT = HERE.parent

def data(n=64, bs=8, shuffle=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g); y = x.sum(1, keepdim=True).sin()
    return DataLoader(TensorDataset(x, y), batch_size=bs, shuffle=shuffle)

def mlp(): return nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1))
def mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()
def quiet(): return MetricsCB(printer=None)
def weights(m): return {k: v.detach().clone() for k, v in m.state_dict().items()}
def equal_states(a, b): return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

def env(**kw):
    e = {**os.environ, 'PYTHONPATH': str(ROOT) + os.pathsep + os.environ.get('PYTHONPATH', ''), 'OMP_NUM_THREADS': '1',
         'WANDB_MODE': 'offline', 'WANDB_SILENT': 'true', 'HF_HUB_OFFLINE': '1', 'MPLBACKEND': 'Agg'}
    e.update(kw); return e

# ---------------------------------------------------------------- the loop

class Record(Callback):
    order = 100
    def __init__(self): self.seen = []
    def __getattr__(self, name):
        if name not in EVENTS: raise AttributeError(name)
        return lambda learn: self.seen.append(name)

def test_event_order_and_callback_order():
    rec, calls = Record(), []
    class A(Callback):
        order = 5
        def before_batch(self, learn): calls.append('A')
    class B(Callback):
        order = -5
        def before_batch(self, learn): calls.append('B')
    Learner(mlp(), [(torch.zeros(2, 3), torch.zeros(2, 1))], mse, cbs=[A(), rec, B(), quiet()]).fit(1)
    assert rec.seen == ['before_fit', 'before_epoch', 'before_batch', 'after_loss', 'after_backward', 'after_step',
                        'after_batch', 'cleanup_batch', 'after_epoch', 'cleanup_epoch', 'after_fit', 'cleanup_fit']
    assert calls == ['B', 'A']

def test_fit_epochs_and_step_budget():
    dl = data(n=40, bs=8)                       # 5 batches an epoch
    learn = Learner(mlp(), dl, mse, cbs=[quiet()]).fit(3)
    assert learn.step == 15 and learn.epochs_done == 3
    learn = Learner(mlp(), dl, mse, cbs=[quiet()]).fit(steps=12)
    assert learn.step == 12 and learn.epochs_done == 3 and learn.n_epochs == 3
    it = [(torch.zeros(2, 3), torch.zeros(2, 1))] * 3   # a plain list of batches works too
    assert Learner(mlp(), it, mse, cbs=[quiet()]).fit(steps=7).step == 7

def test_cancel_exceptions():
    class StopAt(Callback):
        def __init__(self, exc, step): self.exc, self.at = exc, step
        def after_step(self, learn):
            if learn.step == self.at: raise self.exc()
    rec = Record()
    learn = Learner(mlp(), data(n=40, bs=8), mse, cbs=[StopAt(CancelFitException, 3), rec, quiet()]).fit(2)
    assert learn.step == 3 and rec.seen[-2:] == ['after_fit', 'cleanup_fit']   # after_fit still runs
    learn = Learner(mlp(), data(n=40, bs=8), mse, cbs=[StopAt(CancelEpochException, 2), quiet()]).fit(2)
    assert learn.step == 2 + 5 and learn.epochs_done == 2                       # rest of epoch 0 skipped
    class SkipOdd(Callback):
        def before_batch(self, learn):
            if learn.iter % 2: raise CancelBatchException()
    learn = Learner(mlp(), data(n=40, bs=8), mse, cbs=[SkipOdd(), quiet()]).fit(1)
    assert learn.step == 3                                                       # batches 0, 2, 4 trained

def test_bad_inputs_are_named():
    dl = data()
    with pytest.raises(ValueError, match='lr must be a positive'): Learner(mlp(), dl, mse, lr=0)
    with pytest.raises(ValueError, match='lr must be a positive'): Learner(mlp(), dl, mse, lr=float('nan'))
    with pytest.raises(ValueError, match='empty'): Learner(mlp(), DataLoader(TensorDataset(torch.zeros(0, 3)), batch_size=4), mse)
    with pytest.raises(ValueError, match='empty'): Learner(mlp(), [], mse)
    with pytest.raises(TypeError, match='got a tensor'): Learner(mlp(), torch.zeros(8, 3), mse)
    with pytest.raises(TypeError, match='loss_func must be callable'): Learner(mlp(), dl, 'mse')
    with pytest.raises(TypeError, match='torch.nn.Module'): Learner(lambda x: x, dl, mse)
    with pytest.raises(TypeError, match=r'write ProgressCB\(\)'): Learner(mlp(), dl, mse, cbs=[ProgressCB])
    learn = Learner(mlp(), dl, mse, cbs=[quiet()])
    with pytest.raises(ValueError, match='exactly one of epochs and steps'): learn.fit()
    with pytest.raises(ValueError, match='exactly one of epochs and steps'): learn.fit(1, steps=3)
    with pytest.raises(ValueError, match='epochs must be a positive int'): learn.fit(0)
    with pytest.raises(ValueError, match='steps must be a positive int'): learn.fit(steps=2.5)
    with pytest.raises(TypeError, match='scalar tensor'): Learner(mlp(), dl, lambda m, b: m(b[0]), cbs=[quiet()]).fit(1)
    with pytest.raises(ValueError, match='yielded no batches'):
        Learner(mlp(), iter_empty(), mse, cbs=[quiet()]).fit(steps=2)
    with pytest.raises(ValueError, match="warmup must be"): EMACB(warmup='cosine')
    with pytest.raises(ValueError, match='needs the number of steps'):
        Learner(mlp(), iter_empty(), mse, cbs=[quiet(), OneCycleCB()]).fit(1)

class iter_empty:
    "Re-iterable data without a length that yields nothing."
    def __iter__(self): return iter([])

# ---------------------------------------------------------------- metrics, schedules, clipping, mixed precision

def test_metrics_and_schedule():
    dl = data(n=40, bs=8)
    m = MetricsCB(printer=None, first_x=lambda learn: learn.batch[0][0, 0].item())
    learn = Learner(mlp(), (dl, data(n=16, bs=8, shuffle=False)), mse, lr=0.1, cbs=[m, OneCycleCB(pct_start=0.3)]).fit(2)
    assert len(m.losses) == 10 and len(m.history) == 2
    assert {'epoch', 'train_loss', 'train_first_x', 'valid_loss', 'valid_first_x', 'time'} <= set(m.history[0])
    assert m.history[0]['train_loss'] == pytest.approx(np.mean(m.losses[:5]))
    assert m.lrs == pytest.approx([0.1 * one_cycle(s / 10, pct_start=0.3) for s in range(10)])

def test_grad_clip():
    norms = []
    class Norm(Callback):
        order = 1
        def after_backward(self, learn): norms.append(torch.cat([p.grad.flatten() for p in learn.model.parameters()]).norm().item())
    learn = Learner(mlp(), data(), mse, lr=1e-3, cbs=[GradClipCB(0.01), Norm(), quiet()]).fit(1)
    assert max(norms) <= 0.01 * (1 + 1e-5) and learn.grad_norm > 0.01

def test_mixed_precision_is_a_noop_on_cpu():
    seed_everything(0); a = Learner(mlp(), data(), mse, cbs=[quiet()]).fit(1)
    seed_everything(0); b = Learner(mlp(), data(), mse, cbs=[quiet(), MixedPrecisionCB('fp16')]).fit(1)
    assert equal_states(weights(a.model), weights(b.model))
    assert b.autocast.__func__ is Learner.autocast          # hooks put back after the fit
    with pytest.raises(ValueError, match="'bf16' or 'fp16'"): MixedPrecisionCB('fp8')

class Dtypes(Callback):
    "Records the dtype of the first Linear's output in each forward, and of the loss."
    order = 100
    def __init__(self): self.out, self.loss = [], []
    def before_fit(self, learn):
        self.h = next(m for m in learn.model.modules() if isinstance(m, nn.Linear)).register_forward_hook(
            lambda m, i, o: self.out.append(o.dtype))
    def after_loss(self, learn): self.loss.append(learn.loss.dtype)
    def cleanup_fit(self, learn): self.h.remove()

def all_float32(learn):
    opt = [v for st in learn.opt.state.values() for v in st.values() if torch.is_tensor(v) and v.is_floating_point()]
    return all(t.dtype == torch.float32 for t in [*learn.model.parameters(), *learn.ema_model.parameters(), *opt])

def test_bf16_autocast_on_cpu_keeps_float32_master_weights():
    seed_everything(0); a = Learner(mlp(), data(), mse, cbs=[quiet(), EMACB(0.9)]).fit(2)
    d = Dtypes(); mp = MixedPrecisionCB('bf16', cpu=True)
    seed_everything(0); b = Learner(mlp(), data(), mse, cbs=[quiet(), EMACB(0.9), mp, d]).fit(2)
    assert mp.active and 'bf16 autocast on CPU' in repr(mp)
    assert set(d.out) == {torch.bfloat16} and set(d.loss) == {torch.float32}   # bf16 matmuls, float32 loss
    assert all_float32(b)                                                        # weights, EMA, Adam's moments
    wa, wb = weights(a.model), weights(b.model)
    assert not equal_states(wa, wb)                                              # it did compute in bf16 ...
    assert all(torch.allclose(wa[k], wb[k], atol=0.02) for k in wa)              # ... and lands near the float32 run
    assert b.autocast.__func__ is Learner.autocast

def test_bf16_falls_back_to_float32_where_the_cpu_lacks_it(monkeypatch):
    monkeypatch.setattr(L, 'cpu_has_bf16', lambda: False)
    seed_everything(0); a = Learner(mlp(), data(), mse, cbs=[quiet()]).fit(1)
    mp, d = MixedPrecisionCB(), Dtypes()
    seed_everything(0); b = Learner(mlp(), data(), mse, cbs=[quiet(), mp, d]).fit(1)
    assert not mp.active and 'no bf16 in hardware' in repr(mp) and set(d.out) == {torch.float32}
    assert equal_states(weights(a.model), weights(b.model))
    assert speed_settings('cpu') == ['fp32', 'channels_last']                   # nothing with bf16 is offered
    monkeypatch.setattr(L, 'cpu_has_bf16', lambda: True)
    assert speed_settings('cpu') == ['fp32', 'channels_last', 'bf16', 'bf16+channels_last']
    assert MixedPrecisionCB(cpu=False)._decide('cpu')[0] is False
    with pytest.raises(ValueError, match="cpu must be None, True or False"): MixedPrecisionCB(cpu='yes')

def test_cpu_has_bf16_agrees_with_the_cpu_flags():
    flags = Path('/proc/cpuinfo').read_text() if Path('/proc/cpuinfo').exists() else None
    if flags is None: pytest.skip('no /proc/cpuinfo')
    assert cpu_has_bf16() == any(f in flags.split() for f in ('avx512_bf16', 'amx_bf16', 'amx_tile'))

def make_resumable(extra=(), conv=False):
    "A small run with randomness everywhere; conv=True gives a model with 4-D weights and image batches."
    seed_everything(0)
    if conv:
        model = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.Dropout(0.1), nn.SiLU(), nn.Conv2d(8, 2, 3, padding=1))
        g = torch.Generator().manual_seed(0)
        x = torch.randn(48, 2, 6, 6, generator=g); y = x.roll(1, dims=-1).sin()
        xv = torch.randn(16, 2, 6, 6, generator=g); yv = xv.roll(1, dims=-1).sin()
        dls = (DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True), DataLoader(TensorDataset(xv, yv), batch_size=8))
    else:
        model = nn.Sequential(nn.Linear(3, 16), nn.Dropout(0.2), nn.Tanh(), nn.Linear(16, 1))
        dls = (data(n=48, bs=8), data(n=16, bs=8))
    def loss(model, batch):
        x, y = batch
        scale = 0.1 * (1 + np.random.rand()) * (1 + random.random())
        return ((model(x + scale * torch.randn_like(x)) - y) ** 2).mean()
    cbs = [EMACB(0.99), CosineCB(warmup=0.1), GradClipCB(1.), MetricsCB(printer=None), *extra]
    return Learner(model, dls, loss, lr=1e-2, cbs=cbs)

@pytest.mark.parametrize('setting,conv', [('bf16', False), ('bf16', True), ('channels_last', True), ('bf16+channels_last', True)])
def test_resume_with_a_speed_setting_equals_uninterrupted(tmp_path, setting, conv):
    "bf16 and channels-last runs, stopped at step 13 and resumed from step 10, end bit for bit where the whole run ends."
    def make(*more):
        cbs = speed_cbs(setting)
        for cb in cbs:
            if isinstance(cb, MixedPrecisionCB): cb.cpu = True           # bf16 on any CPU, so the test runs everywhere
        return make_resumable([*cbs, *more], conv=conv)
    full = make().fit(4)
    class Crash(Callback):
        def after_step(self, learn):
            if learn.step == 13: raise CancelFitException()
    make(CheckpointCB(tmp_path, every=5, at_end=False), Crash()).fit(4)
    resumed = make(CheckpointCB(tmp_path, every=5))
    resumed.resume(tmp_path)
    assert resumed.step == full.step == 24
    assert equal_states(weights(full.model), weights(resumed.model))
    assert equal_states(weights(full.ema_model), weights(resumed.ema_model))
    assert full.metrics.losses == resumed.metrics.losses
    assert all_float32(full) and all(p.is_contiguous() for p in full.model.parameters())   # the model comes back in the usual layout

def test_channels_last_changes_layout_not_values():
    seen = []
    class Layout(Callback):
        order = 100
        def after_loss(self, learn): seen.append((learn.batch[0].is_contiguous(memory_format=torch.channels_last),
                                                  learn.model[0].weight.is_contiguous(memory_format=torch.channels_last)))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, 6, 6, generator=g)
    def run(*cbs):   # no dropout and no noise: random draws land on other pixels in another layout
        seed_everything(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 3, 3, padding=1))
        dl = DataLoader(TensorDataset(x, x.roll(1, dims=-1)), batch_size=8)
        return Learner(model, dl, mse, lr=1e-2, cbs=[quiet(), *cbs]).fit(2)
    a, b = run(), run(ChannelsLastCB(), Layout())
    assert seen and all(s == (True, True) for s in seen)
    wa, wb = weights(a.model), weights(b.model)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    assert all(p.is_contiguous() for p in b.model.parameters())

def test_compile_cb_trains_through_torch_compile_and_restores_the_model():
    seen = []
    class Seen(Callback):
        order = 100
        def after_loss(self, learn): seen.append(type(learn.model).__name__)
    model = mlp()
    cb = CompileCB(backend='eager')                                      # the plumbing; inductor is timed in bench/
    learn = Learner(model, data(), mse, cbs=[quiet(), cb, Seen()]).fit(1)
    assert set(seen) == {'OptimizedModule'} and learn.model is model and cb.compile_s > 0
    assert learn.unwrapped_model is model

def test_speed_settings_by_name_and_measured():
    assert speed_cbs('fp32') == []
    assert [type(c).__name__ for c in speed_cbs('bf16+channels_last+compile')] == ['MixedPrecisionCB', 'ChannelsLastCB', 'CompileCB']
    for bad in ('bf32', 'bf16+bf16', '', 'bf16+fast'):
        with pytest.raises(ValueError, match="setting must be 'fp32' or parts from"): speed_cbs(bad)
    with pytest.raises(TypeError, match='setting must be a string'): speed_cbs(None)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.SiLU(), nn.Conv2d(4, 1, 3, padding=1))
    batch = (torch.randn(8, 1, 8, 8), torch.zeros(8))
    before, rng = weights(model), torch.get_rng_state()
    rows = measure_speed(model, batch, lambda m, b: (m(b[0]) - b[0]).pow(2).mean(), settings=['fp32', 'channels_last'], steps=2)
    assert [r['setting'] for r in rows] == ['fp32', 'channels_last'] and all(r['images_per_s'] > 0 for r in rows)
    assert equal_states(before, weights(model)) and torch.equal(rng, torch.get_rng_state())   # nothing touched
    said = []
    best = fastest_setting([{'setting': 'fp32', 'images_per_s': 10.}, {'setting': 'bf16', 'images_per_s': 17.}], printer=said.append)
    assert best == 'bf16' and said == ['speed: fp32 10 img/s, bf16 17 img/s; using bf16']
    with pytest.raises(ValueError, match='rows is empty'): fastest_setting([])
    # compilation: faster steps after a slow first one pay only over a long enough run
    rows = [{'setting': 'bf16', 'images_per_s': 100., 'first_step_s': 0.5, 'batch': 64},
            {'setting': 'bf16+compile', 'images_per_s': 110., 'first_step_s': 60., 'batch': 64}]
    assert fastest_setting(rows, printer=None) == 'bf16+compile'
    assert fastest_setting(rows, printer=None, steps=100) == 'bf16'               # 64 s against 118 s
    assert fastest_setting(rows, printer=None, steps=100_000) == 'bf16+compile'
    assert fastest_setting(rows, printer=None, seconds=600) == 'bf16'              # 937 steps against 790
    assert fastest_setting(rows, printer=None, seconds=6000) == 'bf16+compile'
    with pytest.raises(ValueError, match='steps or seconds, not both'): fastest_setting(rows, steps=1, seconds=1)
    with pytest.raises(ValueError, match='parts from'): measure_speed(model, batch, lambda m, b: 0, settings=['fp64'])

def test_progress_in_a_terminal(capsys):
    Learner(mlp(), (data(n=32), data(n=16)), mse, cbs=[ProgressCB()]).fit(2)
    out = capsys.readouterr().out
    assert 'train_loss' in out and 'valid_loss' in out and len(out.strip().splitlines()) >= 3

# ---------------------------------------------------------------- EMA

def test_ema_decay_matches_diffusers():
    from diffusers.training_utils import EMAModel
    for kw, ours in (({}, {}), ({'use_ema_warmup': True}, {'warmup': 'power'}), ({'use_ema_warmup': True, 'power': 3/4, 'inv_gamma': 2.}, {'warmup': 'power', 'power': 3/4, 'inv_gamma': 2.})):
        ema = EMAModel([nn.Parameter(torch.zeros(1))], decay=0.995, **kw)
        for n in range(1, 3000, 37): assert ema_decay(n, 0.995, **ours) == pytest.approx(ema.get_decay(n), abs=1e-12)

def test_ema_closed_form_with_warmup():
    "EMA after N updates = sum_n w_n theta_n, w_n = (1 - d_n) prod_{m>n} d_m, with the warmed-up decays."
    class Two(nn.Module):
        def __init__(self): super().__init__(); self.w = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    for warmup in ('linear', 'power', None):
        learn = SimpleNamespace(unwrapped_model=Two(), step=0)
        cb = EMACB(decay=0.9, warmup=warmup); cb.before_fit(learn)
        thetas = [np.array([0., 0.])] + [np.array([np.sin(n), n ** 0.5]) for n in range(1, 41)]
        for th in thetas[1:]:
            with torch.no_grad(): learn.unwrapped_model.w.copy_(torch.from_numpy(th))
            cb.after_step(learn)
        d = np.array([ema_decay(n, 0.9, warmup) for n in range(1, 41)])
        w = np.array([np.prod(d)] + [(1 - d[i]) * np.prod(d[i + 1:]) for i in range(40)])   # w_0: the initial value's share
        np.testing.assert_allclose(learn.ema_model.w.detach().numpy(), (w[:, None] * np.stack(thetas)).sum(0), rtol=1e-12)
        assert w.sum() == pytest.approx(1.0)
        assert w[0] == 0.0     # the first update copies the weights: nothing of the random initialisation is left

def test_ema_in_training_and_sampling_model():
    learn = Learner(mlp(), data(), mse, cbs=[EMACB(0.999), quiet()]).fit(2)
    assert learn.sampling_model is learn.ema_model
    assert not equal_states(weights(learn.ema_model), weights(learn.model))
    assert not any(p.requires_grad for p in learn.ema_model.parameters())

# ---------------------------------------------------------------- LR finder

def test_lr_finder_restores_the_model_exactly():
    model = nn.Sequential(nn.Linear(3, 16), nn.BatchNorm1d(16), nn.Dropout(0.2), nn.ReLU(), nn.Linear(16, 1))
    learn = Learner(model, data(n=128, bs=16), mse, opt_func=torch.optim.SGD, cbs=[EMACB(), CheckpointCB('never-written'), quiet()])
    model.eval()
    before = weights(model)
    rng = torch.get_rng_state()
    res = learn.lr_find(num_steps=60, plot=False)
    assert equal_states(before, weights(model))                        # weights and BatchNorm buffers, bit for bit
    assert not model.training and torch.equal(rng, torch.get_rng_state())
    assert not Path('never-written').exists() and learn.step == 0 and learn.ema_model is None
    assert 3 <= len(res.lrs) <= 60 and np.all(np.diff(res.lrs) > 0)
    assert res.lrs[0] == pytest.approx(1e-7) and res.lrs[0] < res.suggestion < res.lrs[-1]
    assert len(res.lrs) < 60                                           # SGD blew up before lr 10, and it stopped

# ---------------------------------------------------------------- NaN guard

def test_nan_loss_names_the_step_and_keeps_the_checkpoint(tmp_path):
    def loss(model, batch):
        l = mse(model, batch)
        return l * float('nan') if learn.step == 5 else l
    learn = Learner(mlp(), data(), mse, cbs=[CheckpointCB(tmp_path, every=2), quiet()])
    learn.loss_func = loss
    with pytest.raises(NonFiniteLossError, match=r'loss is nan at step 6 \(epoch 0, batch 5\)'): learn.fit(3)
    assert learn.step == 5
    ck = read_checkpoint(tmp_path)
    assert ck['path'].name == 'step-00000004' and [d.name for d in L.list_checkpoints(tmp_path)] == ['step-00000002', 'step-00000004']
    m = load_weights(mlp(), tmp_path)
    assert all(torch.isfinite(v).all() for v in m.state_dict().values())

# ---------------------------------------------------------------- checkpoints

def test_checkpoint_format(tmp_path):
    learn = Learner(mlp(), data(), mse, cbs=[EMACB(), CheckpointCB(tmp_path, every=3, keep=2), quiet()], config={'note': 'x'}).fit(1)
    ckpts = L.list_checkpoints(tmp_path)
    assert [d.name for d in ckpts] == ['step-00000006', 'step-00000008']            # every 3 steps and at the end, keep 2
    assert (tmp_path / 'latest').read_text() == 'step-00000008'
    d = ckpts[-1]
    assert sorted(p.name for p in d.iterdir()) == ['ema.safetensors', 'model.safetensors', 'state.json', 'state.safetensors']
    meta = json.loads((d / 'state.json').read_text())
    assert meta['format'] == L.CKPT_FORMAT and meta['version'] == L.CKPT_VERSION and meta['step'] == 8
    assert meta['config']['note'] == 'x' and meta['config']['model'] == 'Sequential'
    pg = meta['state']['optimizer']['param_groups'][0]
    assert pg['lr'] == 1e-3 and pg['betas'] == {'__tuple__': [0.9, 0.999]}
    from safetensors import safe_open
    with safe_open(d / 'state.safetensors', 'pt') as f:
        keys = set(f.keys())
    assert 'state.optimizer.state.0.exp_avg' in keys and 'state.rng.torch' in keys
    ck = read_checkpoint(d)
    assert ck['state']['optimizer']['param_groups'][0]['betas'] == (0.9, 0.999)
    assert equal_states(ck['model'], weights(learn.model)) and equal_states(ck['ema'], weights(learn.ema_model))
    m = load_weights(mlp(), tmp_path, ema=True)
    assert equal_states(weights(m), weights(learn.ema_model))

def test_checkpoint_errors(tmp_path):
    learn = Learner(mlp(), data(), mse, cbs=[quiet()]).fit(1)
    d = learn.save_checkpoint(tmp_path)
    other = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2), nn.Linear(2, 1))
    with pytest.raises(ValueError, match=r"missing keys 2: 3.bias, 3.weight; shape mismatches 2: 2.weight: \(1, 16\) in the checkpoint, \(2, 16\) in the model"):
        load_weights(other, d)
    with pytest.raises(ValueError, match=r"does not fit this Sequential; unexpected keys 2: 2.bias, 2.weight$"):
        load_weights(nn.Sequential(nn.Linear(3, 16)), d)
    with pytest.raises(ValueError, match='missing keys 2: 3.bias, 3.weight'): Learner(other, data(), mse).load_checkpoint(d)
    with pytest.raises(FileNotFoundError, match='no EMA|has no ema.safetensors'): load_weights(mlp(), d, ema=True)
    meta = json.loads((d / 'state.json').read_text()); meta['version'] = L.CKPT_VERSION + 1
    (d / 'state.json').write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r'format version 2, newer than this diffcourse reads \(1\)'): read_checkpoint(d)
    (tmp_path / 'empty').mkdir()
    with pytest.raises(FileNotFoundError, match='no complete checkpoint'): read_checkpoint(tmp_path / 'empty')
    with pytest.raises(ValueError, match='keep must be'): learn.save_checkpoint(tmp_path, keep=0)

def test_resume_in_process_equals_uninterrupted(tmp_path):
    "Stop a run with a cancel at step 13, resume from its last checkpoint (step 10) in a fresh Learner: same end, bit for bit."
    def make(extra=()):
        seed_everything(0)
        model = nn.Sequential(nn.Linear(3, 16), nn.Dropout(0.2), nn.Tanh(), nn.Linear(16, 1))
        def loss(model, batch):
            x, y = batch
            scale = 0.1 * (1 + np.random.rand()) * (1 + random.random())    # every generator matters
            return ((model(x + scale * torch.randn_like(x)) - y) ** 2).mean()
        cbs = [EMACB(0.99), CosineCB(warmup=0.1), GradClipCB(1.), MetricsCB(printer=None), *extra]
        return Learner(model, (data(n=48, bs=8), data(n=16, bs=8)), loss, lr=1e-2, cbs=cbs)
    full = make().fit(4)
    class Crash(Callback):
        def after_step(self, learn):
            if learn.step == 13: raise CancelFitException()
    part = make([CheckpointCB(tmp_path, every=5, at_end=False), Crash()]).fit(4)
    assert part.step == 13 and find_checkpoint(tmp_path).name == 'step-00000010'
    resumed = make([CheckpointCB(tmp_path, every=5)])
    resumed.resume(tmp_path)
    assert resumed.step == full.step == 24
    assert equal_states(weights(full.model), weights(resumed.model))
    assert equal_states(weights(full.ema_model), weights(resumed.ema_model))
    assert full.metrics.losses == resumed.metrics.losses                  # the whole loss history, steps 1 to 24
    assert [r['train_loss'] for r in full.metrics.history] == [r['train_loss'] for r in resumed.metrics.history]
    assert [r['valid_loss'] for r in full.metrics.history] == [r['valid_loss'] for r in resumed.metrics.history]

# ---------------------------------------------------------------- fault tests in subprocesses

def run_train(tmp, out, ckpt, *args, timeout=60):
    return subprocess.run([sys.executable, str(HERE / 'learner_train.py'), str(tmp / out), str(tmp / ckpt), *args],
                          capture_output=True, text=True, timeout=timeout, env=env(), cwd=tmp)

@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    "The uninterrupted run's final model, EMA and optimizer tensors."
    from safetensors.torch import load_file
    tmp = tmp_path_factory.mktemp('reference')
    r = run_train(tmp, 'full.safetensors', 'ckpt')
    assert r.returncode == 0, r.stderr[-3000:]
    return load_file(tmp / 'full.safetensors')

def same_tensors(a, b): return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

def kill_after_a_checkpoint(tmp_path, *args):
    "Start a training run, SIGKILL it once it has written its second checkpoint (step 10) or later; return the step it kept."
    p = subprocess.Popen([sys.executable, str(HERE / 'learner_train.py'), str(tmp_path / 'x.safetensors'), str(tmp_path / 'ckpt'),
                          '--delay', '0.15', *args], env=env(), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    latest, t0 = tmp_path / 'ckpt' / 'latest', time.time()
    try:
        while not (latest.exists() and latest.read_text() >= 'step-00000010'):
            assert p.poll() is None, 'the run ended before it could be killed: ' + p.stderr.read().decode()[-2000:]
            assert time.time() - t0 < 60, 'no checkpoint within 60 s'
            time.sleep(0.02)
        p.send_signal(signal.SIGKILL)
    finally:
        p.kill(); p.wait(timeout=30)
    assert p.returncode == -signal.SIGKILL
    return int(find_checkpoint(tmp_path / 'ckpt').name.split('-')[1])

def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path, reference):
    from safetensors.torch import load_file
    killed_at = kill_after_a_checkpoint(tmp_path)
    assert 10 <= killed_at < 48, killed_at
    r = run_train(tmp_path, 'resumed.safetensors', 'ckpt', '--resume')
    assert r.returncode == 0, r.stderr[-3000:]
    assert same_tensors(load_file(tmp_path / 'resumed.safetensors'), reference)

def test_sigkill_mid_run_then_resume_equals_uninterrupted_in_bf16(tmp_path, reference):
    "The same fault test with bf16 autocast: killed, resumed, equal to the uninterrupted bf16 run (which differs from float32's)."
    from safetensors.torch import load_file
    r = run_train(tmp_path, 'full.safetensors', 'ref', '--bf16')
    assert r.returncode == 0, r.stderr[-3000:]
    killed_at = kill_after_a_checkpoint(tmp_path, '--bf16')
    assert 10 <= killed_at < 48, killed_at
    r = run_train(tmp_path, 'resumed.safetensors', 'ckpt', '--resume', '--bf16')
    assert r.returncode == 0, r.stderr[-3000:]
    full = load_file(tmp_path / 'full.safetensors')
    assert same_tensors(load_file(tmp_path / 'resumed.safetensors'), full)
    assert not same_tensors(full, reference)                      # bf16 really changed the arithmetic
    assert all(v.dtype in (torch.float32, torch.int64) for v in full.values())

@pytest.mark.parametrize('where', ['model.safetensors', 'latest'])
def test_kill_while_writing_a_checkpoint_keeps_the_previous(tmp_path, reference, where):
    "SIGKILL half-way through writing the 3rd checkpoint (a file of it, or the `latest` pointer): the 2nd stays the one."
    from safetensors.torch import load_file
    r = run_train(tmp_path, 'x.safetensors', 'ckpt', '--die-in-save', f'3:{where}')
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-2000:])
    ck = tmp_path / 'ckpt'
    assert (ck / 'latest').read_text() == 'step-00000010'
    if where == 'model.safetensors': assert list(ck.glob('.tmp-step-00000015-*')), sorted(os.listdir(ck))
    else: assert (ck / 'step-00000015' / 'state.json').exists()                 # renamed in, but not yet the latest
    loaded = read_checkpoint(ck)
    assert loaded['path'].name == 'step-00000010' and loaded['state']['step'] == 10
    r = run_train(tmp_path, 'resumed.safetensors', 'ckpt', '--resume')
    assert r.returncode == 0, r.stderr[-3000:]
    assert same_tensors(load_file(tmp_path / 'resumed.safetensors'), reference)

def test_two_processes_through_accelerate_match_one(tmp_path):
    "torchrun, 2 CPU processes (gloo) x 8 samples == 1 process x 16 samples, to float32 rounding."
    from safetensors.torch import load_file
    one, two = tmp_path / 'one', tmp_path / 'two'
    r = subprocess.run([sys.executable, str(HERE / 'learner_ddp.py'), str(one), '16'], capture_output=True, text=True,
                       timeout=120, env=env(), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                        str(HERE / 'learner_ddp.py'), str(two), '8', '--accelerate'], capture_output=True, text=True,
                       timeout=180, env=env(HF_HOME=str(tmp_path / 'hf'), ACCELERATE_USE_CPU='1'), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    ref, r0, r1 = (json.loads(p.read_text()) for p in (one / 'rank0.json', two / 'rank0.json', two / 'rank1.json'))
    assert (r0['world'], r1['world'], r0['is_main'], r1['is_main']) == (2, 2, True, False)
    assert ref['steps'] == r0['steps'] == r1['steps'] == 8
    for full, a, b in zip(ref['seen'], r0['seen'], r1['seen']):
        assert not set(a) & set(b) and sorted(a + b) == sorted(full)    # different data, together the global batch
    assert r0['n_saved'] > 0 and r1['n_saved'] == 0                      # only the main process writes checkpoints
    np.testing.assert_allclose(r0['losses'], ref['losses'], rtol=1e-5)  # the logged loss is averaged over processes
    wa, wb = load_file(one / 'weights.safetensors'), load_file(two / 'weights.safetensors')
    for k in wa: torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6)

# ---------------------------------------------------------------- W&B offline

def wandb_history(run_dir: Path) -> list:
    "The history rows of an offline W&B run, read from its .wandb file (a LevelDB-style log of protobuf records)."
    from wandb.proto import wandb_internal_pb2 as pb
    data = next(run_dir.glob('run-*.wandb')).read_bytes()
    assert data[:4] == b':W&B'
    rows, pos, buf = [], 7, b''
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7: pos += left; continue
        _, n, kind = struct.unpack('<IHB', data[pos:pos + 7]); pos += 7
        if n == 0 and kind == 0: pos += left - 7; continue
        buf += data[pos:pos + n]; pos += n
        if kind in (1, 4):
            rec = pb.Record(); rec.ParseFromString(buf); buf = b''
            if rec.WhichOneof('record_type') == 'history':
                rows.append({(i.key or '/'.join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
    return rows

WANDB_SCRIPT = '''
import sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from test_learner import Learner, WandbCB, ProgressCB, EMACB, data, mlp, mse
cb = WandbCB(project='test', every=2, sample_fn=lambda m: torch.rand(4, 1, 8, 8) * 2 - 1, sample_every=4, dir='run')
Learner(mlp(), (data(n=32), data(n=16)), mse, cbs=[cb, EMACB()]).fit(2)
print('run', cb.run_id)
'''

def test_wandb_offline_logs_keys_and_stays_off_the_network(tmp_path):
    e = env(HOME=str(tmp_path), NETRC=str(tmp_path / 'no-netrc'))
    for k in ('WANDB_MODE', 'WANDB_API_KEY'): e.pop(k, None)                 # the callback itself must choose offline
    cmd = [sys.executable, '-c', WANDB_SCRIPT.format(tests=str(HERE))]
    strace = shutil.which('strace')
    if strace and subprocess.run([strace, '-o', os.devnull, 'true'], capture_output=True).returncode == 0:
        cmd = [strace, '-f', '-qq', '-e', 'trace=connect', '-o', str(tmp_path / 'connects.txt')] + cmd
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=e, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = next((tmp_path / 'run' / 'wandb').glob('offline-run-*'))
    rows = wandb_history(run_dir)
    keys = set().union(*rows)
    assert {'loss', 'lr', 'smooth_loss', 'epoch', 'epoch/train_loss', 'epoch/valid_loss'} <= keys
    assert any(k.startswith('samples') for k in keys) and list((run_dir / 'files' / 'media' / 'images').glob('samples_*.png'))
    assert sorted(r['_step'] for r in rows if 'loss' in r) == [2, 4, 6, 8]
    if (tmp_path / 'connects.txt').exists():
        inet = [l for l in (tmp_path / 'connects.txt').read_text().splitlines() if 'AF_INET' in l and '127.0.0.1' not in l and '::1' not in l]
        assert not inet, inet
