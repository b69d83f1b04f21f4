"The docs site's config: _quarto.yml at the top of the repository (the design card's layout), and nbs/_quarto.yml, which nbdev 2 reads, a relative symlink to it."
import os, shutil, subprocess
from pathlib import Path
import pytest, yaml

ROOT = Path(__file__).resolve().parent.parent
TOP, LINK = ROOT / '_quarto.yml', ROOT / 'nbs' / '_quarto.yml'


def test_top_level_quarto_yml():
    cfg = yaml.safe_load(TOP.read_text())
    assert cfg['project']['type'] == 'website'
    assert cfg['metadata-files'] == ['nbdev.yml', 'sidebar.yml'] and cfg['format']['html']['css'] == 'styles.css'
    for f in ('nbdev.yml', 'sidebar.yml', 'styles.css'): assert (ROOT / 'nbs' / f).is_file(), f   # its paths are relative to nbs/


def test_nbs_quarto_yml_is_a_relative_symlink():
    assert LINK.is_symlink() and os.readlink(LINK) == '../_quarto.yml'   # relative: survives a clone anywhere
    assert LINK.resolve() == TOP.resolve()
    if shutil.which('git') and (ROOT / '.git').exists():
        out = subprocess.run(['git', 'ls-files', '-s', 'nbs/_quarto.yml'], cwd=ROOT, capture_output=True, text=True).stdout
        assert out.startswith('120000 '), f"git must store nbs/_quarto.yml as a symlink: {out!r}"


def test_nbdev_reads_it(tmp_path):
    "nbdev's proc_nbs copies the file nbs/_quarto.yml points to into its cache, where `quarto render` runs; nbdev never rewrites it."
    from nbdev.serve import _proc_file
    from nbdev.config import get_config
    assert 'custom_quarto_yml' not in get_config().d   # with it set false, refresh_quarto_yml would delete and regenerate the file
    _proc_file(LINK, cache=tmp_path, path=ROOT / 'nbs')
    out = tmp_path / '_quarto.yml'
    assert out.is_file() and not out.is_symlink() and out.read_text() == TOP.read_text()
