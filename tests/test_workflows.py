"The GitHub workflows: test.yaml runs the README's test command on every push and pull request; deploy.yaml publishes the docs site as nbdev projects do."
import configparser, re
from pathlib import Path
import pytest, yaml

ROOT = Path(__file__).resolve().parent.parent
WF = ROOT / '.github' / 'workflows'


def load(name:str) -> dict:
    wf = yaml.safe_load((WF / name).read_text())
    assert isinstance(wf, dict) and wf.get('jobs'), f"{name}: no jobs"
    if True in wf: wf['on'] = wf.pop(True)   # YAML 1.1 (PyYAML) reads the key `on` as the boolean true; GitHub reads it as "on"
    return wf


def steps(wf:dict) -> list[dict]:
    out = [s for job in wf['jobs'].values() for s in job['steps']]
    for s in out: assert isinstance(s, dict) and ('uses' in s) != ('run' in s), f"a step needs exactly one of uses and run: {s}"
    return out


def test_pyyaml_is_a_dev_requirement():
    cfg = configparser.ConfigParser(); cfg.read(ROOT / 'settings.ini')
    assert 'pyyaml' in cfg['DEFAULT']['dev_requirements'].lower().split()


def test_test_workflow():
    wf = load('test.yaml')
    assert {'push', 'pull_request'} <= set(wf['on']), wf['on']
    assert (wf['on']['push'] or {}).get('branches') is None          # every branch, every pull request
    job, = wf['jobs'].values()
    assert job['runs-on'] and job.get('timeout-minutes', 360) <= 90     # CI's time on a submission is 90 minutes
    st = steps(wf)
    assert st[0].get('uses', '').startswith('actions/checkout@')
    runs = [s['run'] for s in st if 'run' in s]
    assert any(r.strip() == 'bash .ci/run' for r in runs), runs
    # the command the README gives for every test on a fresh machine is the one CI runs
    assert re.search(r'```sh\nbash \.ci/run\n```', (ROOT / 'README.md').read_text())
    # .ci/run needs root for apt-get: it runs in a container (root) rather than on the runner as a user
    assert 'container' in job or any('sudo' in r for r in runs)


def test_deploy_workflow():
    wf = load('deploy.yaml')
    assert wf['permissions'] == {'contents': 'write', 'pages': 'write'}
    assert set(wf['on']['push']['branches']) & {'main'} and 'workflow_dispatch' in wf['on']
    uses = [s['uses'] for s in steps(wf) if 'uses' in s]
    assert any(u.startswith('fastai/workflows/quarto-ghp@') for u in uses), uses   # nbdev_docs (proc_nbs + Quarto), then gh-pages
    cfg = configparser.ConfigParser(); cfg.read(ROOT / 'settings.ini')
    assert 'nbdev==2.' in cfg['DEFAULT']['dev_requirements']   # the action upgrades nbdev, then `pip install -e .[dev]` pins it back
    assert cfg['DEFAULT']['branch'] == 'main'
    # the extra docs processors settings.ini names (`module:function`) live in tools/, which the job puts on the import path
    mods = [p.split(':')[0] for p in cfg['DEFAULT'].get('procs', '').split()]
    assert mods and all((ROOT / 'tools' / f'{m}.py').is_file() for m in mods), mods
    assert wf['jobs']['deploy']['env']['PYTHONPATH'] == '${{ github.workspace }}/tools'
