"The study tools behind chapter 09's numbers: continuing a shipped model's training, exporting it, and measuring it."
import importlib.util, json
from pathlib import Path
import pytest, torch
from safetensors.torch import load_file

from diffcourse.cli import export_command
from diffcourse.pretrained import WEIGHTS_DIR

TOOLS = Path(__file__).resolve().parents[1] / 'tools'

def _tool(name):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f'{name}.py')
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod

def test_continue_export_and_measure(tmp_path):
    "A continued run starts from the shipped weights, exports with its whole history, and the study reads it back."
    run, folder, out = tmp_path / 'run', tmp_path / 'weights', tmp_path / 'study'
    _tool('continue_training').main(['--minutes', '0.05', '--threads', '1', '--batch_size', '16', '--out', str(run)])
    w = export_command(str(run), name='cont', folder=str(folder))
    card = json.loads((folder / 'cont.json').read_text())
    shipped = json.loads((WEIGHTS_DIR / 'fmnist-ddpm.json').read_text())
    assert card['command'].startswith('python tools/continue_training.py --minutes 0.05')
    assert card['training']['continued_from'] == 'fmnist-ddpm' and card['training']['steps_done'] > 0
    assert card['training']['previous'] == shipped['training'] and card['model'] == shipped['model']
    new, old = load_file(w), load_file(WEIGHTS_DIR / 'fmnist-ddpm.safetensors')
    assert new.keys() == old.keys() and any(not torch.equal(new[k], old[k]) for k in new)   # it trained: the weights moved

    study = _tool('sampler_study')
    study.main(['--model', str(w), '--only', 'ddim:2:trailing', 'euler_a:2:trailing', '--n', '130', '--batch', '65',
                '--device', 'cpu', '--heldout', '4', '--keep', '2', '--out', str(out)])
    res = json.loads(out.with_suffix('.json').read_text())
    assert [(r['sampler'], r['steps'], r['spacing']) for r in res['rows']] == [('ddim', 2, 'trailing'), ('euler_a', 2, 'trailing')]
    assert res['training'] == card['training'] and res['n'] == 130 and res['clip_sample'] == 1.0
    assert all(r['finite'] and r['fid'] > 0 for r in res['rows']) and 0 < res['heldout_eps_mse'] < 1
    assert load_file(out.with_suffix('.safetensors'))['ddim|2|trailing|0'].shape == (2, 1, 28, 28)

@pytest.mark.parametrize('bad,msg', [('plms:20:trailing', "unknown sampler 'plms'"), ('ddim:many:trailing', 'is not sampler:steps:spacing'),
                                     ('ddim:20', 'is not sampler:steps:spacing')])
def test_study_rejects_bad_settings_before_loading(tmp_path, bad, msg):
    with pytest.raises(SystemExit, match=msg):
        _tool('sampler_study').main(['--only', bad, '--model', str(tmp_path / 'no-such-run'), '--out', str(tmp_path / 's')])
    assert not list(tmp_path.iterdir())

def test_study_needs_enough_samples_for_fid(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _tool('sampler_study').main(['--only', 'ddim:2:trailing', '--n', '128', '--out', str(tmp_path / 's')])
    assert '--n must be more than 128' in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_train_dit_exports_loads_and_samples_with_labels(tmp_path, monkeypatch):
    "tools/train_dit.py writes a run that diffcourse_export ships and pretrained.load samples from, by label; --resume continues it."
    monkeypatch.setenv('DIFFCOURSE_CACHE', str(tmp_path / 'cache'))
    from diffcourse.pretrained import load
    from diffcourse.learner import read_checkpoint
    run, folder = tmp_path / 'run', tmp_path / 'weights'
    args = ['--minutes', '0.03', '--size', 'T', '--patch_size', '7', '--speed', 'fp32', '--batch_size', '8', '--out', str(run)]
    _tool('train_dit').main(args)
    first = read_checkpoint(run)['meta']['step']
    _tool('train_dit').main(args + ['--resume', '--minutes', '0.06'])      # a longer budget: the resumed run goes on from the checkpoint
    assert read_checkpoint(run)['meta']['step'] > first > 0
    export_command(str(run), name='tiny-dit', folder=str(folder))
    pre = load('tiny-dit', folder=folder)
    assert pre.card['command'].startswith('python tools/train_dit.py') and pre.card['model']['class'] == 'DiT'
    assert pre.model.num_classes == 10 and pre.model.patch_size == 7 and pre.card['training']['class_dropout'] == 0.1
    x = pre.sample(4, steps=3, labels=torch.tensor([0, 1, 2, 3]))
    assert x.shape == (4, 1, 28, 28) and torch.isfinite(x).all()



def test_train_dit_net_unet_trains_a_guidable_unet_with_label_dropout(tmp_path, monkeypatch):
    "tools/train_dit.py --net unet: a class-conditional ResUNet trained with CFGLoss, exported, loaded and sampled with guidance."
    monkeypatch.setenv('DIFFCOURSE_CACHE', str(tmp_path / 'cache'))
    from diffcourse.pretrained import load
    from diffcourse import guidance
    seen = []
    orig = guidance.drop_labels
    monkeypatch.setattr(guidance, 'drop_labels', lambda *a, **k: (seen.append(a[1:3]), orig(*a, **k))[1])
    run, folder = tmp_path / 'run', tmp_path / 'weights'
    _tool('train_dit').main(['--net', 'unet', '--channels', '16,32', '--model_kwargs', '{"attention": [false, false]}', '--minutes', '0.03',
                             '--speed', 'fp32', '--batch_size', '8', '--class_dropout', '0.2', '--out', str(run)])
    assert seen and seen[0] == (10, 0.2)                                  # labels dropped to the null label 10 with p = 0.2
    export_command(str(run), name='tiny-cfg', folder=str(folder))
    pre = load('tiny-cfg', folder=folder)
    assert pre.card['model']['class'] == 'ResUNet' and pre.model.num_classes == 10 and list(pre.model.config['channels']) == [16, 32]
    assert '--net unet' in pre.card['command'] and '--patch_size' not in pre.card['command'] and pre.card['training']['class_dropout'] == 0.2
    y = torch.tensor([0, 1, 2, 3])
    a, b = pre.sample(4, steps=3, labels=y, guidance_scale=3.0), pre.sample(4, steps=3, labels=y)
    assert a.shape == (4, 1, 28, 28) and torch.isfinite(a).all() and (a - b).abs().max() > 0

def test_dit_study_records_curves_and_scores_and_skips_done_runs(tmp_path, capsys):
    "tools/dit_variants.py --study patches: one run per patch size and seed, its held-out curve and sample scores, kept across reruns."
    out = tmp_path / 'patches.json'
    args = ['--study', 'patches', '--patches', '7', '--seeds', '0', '--steps', '4', '--eval_every', '2', '--n', '150', '--out', str(out)]
    _tool('dit_variants').main(args)
    res = json.loads(out.read_text())
    (r,) = res['runs']
    assert (r['block'], r['patch_size'], r['tokens'], r['seed']) == ('adaln_zero', 7, 16, 0)
    assert [c[0] for c in r['curve']] == [2, 4] and all(c[2] > 0 for c in r['curve'])
    assert r['at_steps']['step'] == 4 and r['at_steps']['fid'] > 0 and 0 <= r['at_steps']['class_accuracy'] <= 1
    capsys.readouterr()
    _tool('dit_variants').main(args)                                          # done already: nothing is trained again
    assert json.loads(out.read_text()) == res and 'patch 7 seed 0' not in capsys.readouterr().out


def test_parametrisation_study_trains_each_target_and_skips_done_runs(tmp_path, capsys):
    "tools/param_study.py: one run per target and seed under a CPU budget, its held-out ε-MSE curve and FID/KID per sampler and steps, kept across reruns."
    out = tmp_path / 'params.json'
    args = ['--targets', 'v,flow', '--seeds', '0', '--minutes', '0.02', '--eval_every', '5', '--n', '200', '--steps', '2',
            '--n_data', '256', '--n_held', '64', '--channels', '16', '--n_paths', '16', '--out', str(out), '--models', str(tmp_path / 'models')]
    _tool('param_study').main(args)
    res = json.loads(out.read_text())
    assert [(r['target'], r['seed']) for r in res['runs']] == [('v', 0), ('flow', 0)]
    v, flow = res['runs']
    for r in res['runs']:
        assert r['cpu_s'] >= 0.02 * 60 and r['curve'][-1][0] == r['steps_done'] and all(c[2] > 0 for c in r['curve'])
        assert len(r['x0_mse_bands']) == 3 and all(e > 0 for e in r['x0_mse_bands']) and 0 < r['straightness'] <= 1
    assert sorted(f.name for f in (tmp_path / 'models').iterdir()) == ['flow_seed0.safetensors', 'v_seed0.safetensors']
    assert [(e['sampler'], e['steps']) for e in v['evals']] == [('ddim', 2)]
    assert [(e['sampler'], e['steps']) for e in flow['evals']] == [('euler', 2), ('ddim', 2)] and all(e['fid'] > 0 for e in flow['evals'])
    from safetensors.torch import load_file
    pics = load_file(str(tmp_path / 'params_samples.safetensors'))
    assert sorted(pics) == ['flow_ddim2', 'flow_euler2', 'v_ddim2'] and pics['v_ddim2'].shape == (8, 1, 28, 28) and pics['v_ddim2'].dtype == torch.uint8
    capsys.readouterr()
    _tool('param_study').main(args)                                           # done already: nothing is trained again
    assert json.loads(out.read_text()) == res and 'seed 0' not in capsys.readouterr().out
