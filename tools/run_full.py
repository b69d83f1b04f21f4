#!/usr/bin/env python
"""Run chapters with full settings, keep their outputs, and stamp what code made them.

    python tools/run_full.py nbs/04_learner.ipynb [nbs/05_unets.ipynb ...] [--timeout 7200]

Each notebook is executed top to bottom in its own folder (quick mode off: IN_TEST and
DIFFCOURSE_QUICK are removed from the environment; DIFFCOURSE_OFFLINE=1 unless --online, so a loader
whose data is missing shows its offline message rather than a failed download), its outputs are written back, and its metadata
gets `diffcourse.full_run`: the date, the wall time, torch's version, and a hash of every
`diffcourse` module the kernel had imported by the end. `tests/test_notebooks.py` recomputes the
hashes from diffcourse/*.py and fails for a notebook whose stored outputs came from code that has
changed since. Then `nbdev_clean` tidies the notebook (settings.ini keeps this metadata key).
"""
from __future__ import annotations
import argparse, hashlib, json, os, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAMP_KEY = 'diffcourse'


def module_hash(path:Path) -> str:
    "sha256 of a module's code, ignoring the `# %% notebook #cell-id` markers nbdev writes between cells."
    lines = [l for l in path.read_text().splitlines() if not l.startswith('# %%')]
    return hashlib.sha256('\n'.join(lines).encode()).hexdigest()[:16]


def module_path(name:str) -> Path:
    "diffcourse/x.py for 'diffcourse.x' (or diffcourse/__init__.py for 'diffcourse')."
    parts = name.split('.')[1:]
    return ROOT / 'diffcourse' / ('__init__.py' if not parts else '/'.join(parts) + '.py')


def exported_modules(nb) -> list[str]:
    "The modules a notebook's `#| default_exp` cells name."
    return [l.split('default_exp', 1)[1].strip() for c in nb['cells'] if c['cell_type'] == 'code'
            for l in ''.join(c['source']).splitlines() if l.startswith('#| default_exp')]


_PROBE = "import sys as _s, json as _j; print('__DIFFCOURSE_MODULES__' + _j.dumps(sorted(m for m in _s.modules if m == 'diffcourse' or m.startswith('diffcourse.'))))"


def run(nb_path:Path, timeout:int, offline:bool=True) -> dict:
    import nbformat
    from nbclient import NotebookClient
    nb = nbformat.read(nb_path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(_PROBE))
    env = {k: v for k, v in os.environ.items() if k not in ('IN_TEST', 'DIFFCOURSE_QUICK')}
    if offline: env['DIFFCOURSE_OFFLINE'] = '1'          # the build machine reaches no dataset host: say so, don't try
    old = dict(os.environ)
    os.environ.clear(); os.environ.update(env)
    t0 = time.time()
    try:
        NotebookClient(nb, timeout=timeout, kernel_name='python3', resources={'metadata': {'path': str(nb_path.parent)}}).execute()
    finally:
        os.environ.clear(); os.environ.update(old)
    wall = time.time() - t0
    probe = nb.cells.pop()
    text = ''.join(o.get('text', '') for o in probe.outputs if o.get('output_type') == 'stream')
    mods = json.loads(text.split('__DIFFCOURSE_MODULES__', 1)[1].strip())
    mods += [f'diffcourse.{m}' for m in exported_modules(nb)]      # the chapter's own module, defined in its cells
    hashes = {m: module_hash(module_path(m)) for m in sorted(set(mods)) if module_path(m).exists()}
    import torch
    nb.metadata[STAMP_KEY] = {'full_run': {'date': time.strftime('%Y-%m-%d'), 'wall_s': round(wall), 'torch': torch.__version__,
                                           'modules': hashes}}
    nbformat.write(nb, nb_path)
    clean = Path(sys.executable).parent / 'nbdev_clean'
    subprocess.run([str(clean) if clean.exists() else 'nbdev_clean', '--fname', str(nb_path)], check=True, cwd=ROOT)
    return nb.metadata[STAMP_KEY]['full_run']


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('notebooks', nargs='+')
    p.add_argument('--timeout', type=int, default=7200, help='seconds allowed per cell')
    p.add_argument('--online', action='store_true', help='let loaders download (default: DIFFCOURSE_OFFLINE=1)')
    a = p.parse_args(argv)
    for f in a.notebooks:
        f = Path(f).resolve()
        print(f'{f.name}: running with full settings ...', flush=True)
        st = run(f, a.timeout, offline=not a.online)
        print(f"{f.name}: {st['wall_s']} s; stamped {len(st['modules'])} modules", flush=True)


if __name__ == '__main__':
    main()
