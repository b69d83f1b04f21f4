"The command-line tools: clear errors for bad input, and a tiny training run that writes a checkpoint and a PNG."
import json, subprocess, sys
import pytest, torch
from PIL import Image
from diffcourse import cli
from diffcourse.cli import train_command, sample_command, export_command, main, model_spec, load_images

def run_cli(*args):
    return subprocess.run([sys.executable, '-m', 'diffcourse.cli', *args], capture_output=True, text=True, timeout=120)

@pytest.mark.parametrize('args, msg', [
    (['train', '--model', 'unet9', '--steps', '1'], "model must be one of conv, res, resattn; got 'unet9'"),
    (['train', '--dataset', 'imagenet', '--steps', '1'], "dataset must be one of fmnist, mnist, emoji, cifar10, folder:PATH; got 'imagenet'"),
    (['train', '--steps', '1', '--channels', '16,abc'], "channels must be comma-separated widths"),
    (['train', '--steps', '1', '--model_kwargs', '{"num_res": 0}'], "cannot be built"),
    (['train'], "give exactly one of steps and minutes"),
    (['train', '--steps', '1', '--out', '/dev/null/run'], "out: cannot write to '/dev/null/run'"),
    (['sample', '--ckpt', 'no/such/run'], "neither a checkpoint folder nor a shipped model"),
    (['export', '--ckpt', 'no/such/run'], "ckpt: no checkpoint at"),
    (['sample'], "ckpt is required"),
    (['sample', '--ckpt', 'fmnist-ddpm', '--sampler', 'plms'], "sampler must be one of ddpm, ddim, euler, euler_a, heun, dpmpp_2m; got 'plms'"),
    (['sample', '--ckpt', 'fmnist-ddpm', '--spacing', 'uniform'], "spacing must be one of leading, trailing, linspace, karras; got 'uniform'"),
    (['sample', '--ckpt', 'fmnist-ddpm', '--sampler', 'euler', '--eta', '0.5'], "eta applies to sampler='ddim' only"),
    (['sample', '--ckpt', 'fmnist-ddpm', '--sampler', 'ddim', '--spacing', 'karras'], "spacing='karras' places the noise levels"),
    (['sample', '--ckpt', 'fmnist-ddpm', '--clip_sample', '-1'], "clip_sample must be a number >= 0 (0: no clamp); got -1.0"),
])
def test_cli_errors(args, msg, capsys):
    with pytest.raises(SystemExit) as e: main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and msg in err, err
    assert err.startswith(f"diffcourse_{args[0]}: error:")

def test_cli_error_in_a_shell():
    "`python -m diffcourse.cli` reports bad input in one line, exit status 2, no traceback."
    r = run_cli('train', '--model', 'unet9', '--steps', '1')
    assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr[-1500:]
    assert r.stderr == "diffcourse_train: error: model must be one of conv, res, resattn; got 'unet9'\n"

def test_usage_without_command(capsys):
    with pytest.raises(SystemExit) as e: main([])
    assert e.value.code == 2 and 'usage: python -m diffcourse.cli' in capsys.readouterr().err

def test_unknown_names_raise_valueerror_in_python():
    with pytest.raises(ValueError, match="model must be one of"): model_spec('vit')
    with pytest.raises(ValueError, match="dataset must be one of"): load_images('svhn')

def test_unwritable_out_fails_before_training(tmp_path):
    f = tmp_path/'a-file'; f.write_text('x')
    with pytest.raises(ValueError, match='out: cannot write to'): train_command('res', steps=1, out=str(f/'run'))
    with pytest.raises(ValueError, match='out must be a file path'): sample_command('fmnist-ddpm', out=str(tmp_path))

def test_tiny_train_sample_export(tmp_path):
    torch.set_num_threads(1)
    res = train_command('resattn', 'fmnist', steps=4, out=str(tmp_path/'run'), batch_size=8, channels='16,32', n_data=64,
                n_samples=4, sample_steps=2, progress=False)
    ck = res['checkpoint']
    assert res['steps'] == 4 and (ck/'model.safetensors').is_file() and (ck/'ema.safetensors').is_file()
    rec = json.loads((ck/'state.json').read_text())['config']['diffcourse']
    assert rec['model']['class'] == 'ResAttnUNet' and rec['schedule'] == {'name': 'cosine', 'T': 1000}
    assert rec['command'].startswith('diffcourse_train --model resattn --dataset fmnist --steps 4 ') and '--channels 16,32' in rec['command']
    from diffcourse.learner import speed_settings
    assert res['speed'] in speed_settings('cpu') and rec['training']['speed'] == res['speed']   # measured, then named
    assert f"--speed {res['speed']}" in rec['command']                                          # so a rerun uses the same
    img = Image.open(res['samples']); assert img.size[0] > 0 and img.mode == 'L'
    png = sample_command(str(tmp_path/'run'), n=2, steps=3, out=str(tmp_path/'g.png'), progress=False)
    assert Image.open(png).size[0] > 0
    w = export_command(str(tmp_path/'run'), name='tiny-ddpm', folder=str(tmp_path/'weights'))
    card = json.loads(w.with_suffix('.json').read_text())
    assert card['training']['steps_done'] == 4 and card['dtype'] == 'float16' and card['command'] == rec['command']
    from diffcourse.pretrained import load
    pre = load('tiny-ddpm', folder=tmp_path/'weights')
    assert pre.sample(n=1, steps=2).shape == (1, 1, 28, 28)

def test_main_runs_a_command(tmp_path):
    "`main` (what `python -m diffcourse.cli` calls) parses the options like the console script."
    main(['train', '--model', 'conv', '--steps', '2', '--out', str(tmp_path/'r'), '--batch_size', '4', '--channels', '8,16',
          '--n_data', '16', '--n_samples', '1', '--sample_steps', '1'])
    assert (tmp_path/'r'/'samples.png').is_file() and (tmp_path/'r'/'latest').is_file()


@pytest.mark.filterwarnings(r"ignore:sample\(\) starts at t=:UserWarning")   # heun from σ = 20,291, unclipped, on purpose
def test_sample_with_any_sampler(tmp_path):
    "The sampler options reach `samplers.sample`: the grid is the one `generate` draws with the same settings, spelled out."
    from diffcourse.pretrained import load, generate
    from diffcourse.cli import save_grid
    torch.set_num_threads(1)
    pre = load('fmnist-ddpm')
    assert pre.card['sampling'] == {'sampler': 'dpmpp_2m', 'steps': 20, 'spacing': 'trailing', 'clip_sample': 1.0}
    for kw, full in [(dict(sampler='dpmpp_2m', steps=4, spacing='trailing'), dict(sampler='dpmpp_2m', steps=4, spacing='trailing', clip_sample=1.0)),
                     (dict(sampler='heun', steps=3, spacing='karras', clip_sample=0), dict(sampler='heun', steps=3, spacing='karras', clip_sample=None)),
                     # another sampler: the card's spacing is its own, its clipping stays
                     (dict(sampler='ddim', eta=0.5, steps=3), dict(sampler='ddim', eta=0.5, steps=3, spacing='leading', clip_sample=1.0)),
                     (dict(steps=3), dict(sampler='dpmpp_2m', steps=3, spacing='trailing', clip_sample=1.0))]:   # the card's recipe
        png = sample_command('fmnist-ddpm', n=2, seed=5, out=str(tmp_path / 'a.png'), progress=False, **kw)
        ref = save_grid(pre.sample(n=2, seed=5, **{k: v for k, v in kw.items() if k != 'clip_sample'},
                                   **({'clip_sample': False} if 'clip_sample' in kw else {})), tmp_path / 'b.png')
        assert png.read_bytes() == ref.read_bytes(), kw
        ref2 = save_grid(generate(pre.model, pre.schedule, 2, pre.image_shape, seed=5, **full), tmp_path / 'c.png')
        assert png.read_bytes() == ref2.read_bytes(), kw

def test_sample_options_in_a_shell(tmp_path):
    r = run_cli('sample', '--ckpt', 'fmnist-ddpm', '--n', '2', '--steps', '3', '--sampler', 'euler', '--spacing', 'karras',
                '--out', str(tmp_path / 'g.png'))
    assert r.returncode == 0, r.stderr[-1500:]
    assert Image.open(tmp_path / 'g.png').size[0] > 0 and 'sampler euler, steps 3, spacing karras' in r.stdout

def test_sampler_options_refused_before_anything_runs(tmp_path, capsys):
    "A combination `samplers.sample` refuses fails before the settings line, the progress bar and the grid."
    for kw, msg in [(dict(sampler='euler', eta=0.5), "eta applies to sampler='ddim' only"),
                    (dict(sampler='dpmpp_2m', spacing='linspace', steps=1000), "at most T-1"),
                    (dict(sampler='heun', spacing='karras', steps=0), "steps must be a positive int")]:
        with pytest.raises(ValueError, match=msg): sample_command('fmnist-ddpm', out=str(tmp_path / 'g.png'), progress=True, **kw)
        assert 'sampling' not in capsys.readouterr().out and not (tmp_path / 'g.png').exists()
