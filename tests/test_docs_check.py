"The browser check of the docs (`python tools/docs.py --check`): it bites on planted defects and passes a sound page."
import base64, importlib.util, io, json, os, re, shutil
from pathlib import Path
from types import SimpleNamespace
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _docs():
    spec = importlib.util.spec_from_file_location('docs_tool', ROOT / 'tools' / 'docs.py')
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod

docs = _docs()


def _browser_missing() -> str | None:
    try: import playwright  # noqa: F401
    except ImportError: return 'pip install playwright'
    if not docs.MATHJAX.exists(): return 'apt-get install libjs-mathjax'
    if not (os.environ.get('DIFFCOURSE_CHROMIUM') or any(Path(p).is_file() for p in docs.CHROMIUM)): return 'apt-get install chromium'

_missing = _browser_missing()
if _missing and os.environ.get('CI'): raise RuntimeError(f"CI runs the browser check: {_missing}")   # never skipped in CI
needs_browser = pytest.mark.skipif(bool(_missing), reason=f'the browser check needs: {_missing}')


def png_bytes() -> bytes:
    from PIL import Image
    buf = io.BytesIO(); Image.new('L', (8, 6), 128).save(buf, format='PNG'); return buf.getvalue()


def md(src): return {'cell_type': 'markdown', 'id': 'm' + str(abs(hash(src)) % 10**6), 'metadata': {}, 'source': src}
def code(src, outputs=()): return {'cell_type': 'code', 'id': 'c' + str(abs(hash(src)) % 10**6), 'metadata': {}, 'execution_count': None, 'source': src, 'outputs': list(outputs)}
def raw(src): return {'cell_type': 'raw', 'id': 'r' + str(abs(hash(src)) % 10**6), 'metadata': {}, 'source': src}
def image(data: bytes): return {'output_type': 'display_data', 'metadata': {}, 'data': {'image/png': base64.b64encode(data).decode(), 'text/plain': '<Figure>'}}
def write_nb(path: Path, cells): path.write_text(json.dumps({'cells': cells, 'metadata': {}, 'nbformat': 4, 'nbformat_minor': 5}))

SITE = 'https://example.github.io/proj/'


@pytest.fixture
def cfg(tmp_path):
    "A project of two notebooks, as nbdev's proc_nbs leaves them, and the settings the check reads."
    (tmp_path / 'lib').mkdir(); (tmp_path / 'lib' / 'mod.py').write_text('def f(): pass\n' * 5)
    (tmp_path / 'lib' / '_modidx.py').write_text("d = {'syms': {'lib.mod': {'lib.mod.f': ('good.html#f', 'lib/mod.py'), 'lib.mod.g': ('good.html#g', 'lib/mod.py')},\n"
                                                 "                 'lib.other': {'lib.other.g': ('bad.html#g', 'lib/other.py')}}}\n")
    return SimpleNamespace(doc_host='https://example.github.io', doc_baseurl='/proj', git_url='https://github.com/example/proj', branch='main',
                           lib_path=tmp_path / 'lib', lib_name='lib', config_path=tmp_path, nbs_path=tmp_path / 'nbs')


def good_cells():
    return [raw('---\ntitle: Good\ndescription: A sound page, with a figure and maths.\n---'),
            md('A sound page: $\\alpha_t = \\prod_s (1 - \\beta_s)$, a [link to `f`](' + SITE + 'good.html#f) and [back](bad.ipynb).'),
            code('fig', [image(png_bytes())]),
            code('show_doc(f)', [{'output_type': 'display_data', 'metadata': {}, 'data': {'text/markdown': '### f\n\n```python\ndef f(x, # see `g`\n):\n```\n\n[source](https://github.com/example/proj/blob/main/lib/mod.py#L2)'}}]),
            md('### g\n\nA heading the link above goes to, as on the site: [`f`](' + SITE + 'good.html#f).')]


@needs_browser
def test_check_passes_a_sound_page_and_bites_on_planted_defects(tmp_path, cfg):
    proc = tmp_path / '_proc'; proc.mkdir()
    write_nb(proc / 'good.ipynb', good_cells())
    write_nb(proc / 'bad.ipynb', [
        md('![a planted broken image](data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAAB)'),
        code('1/0', [{'output_type': 'error', 'ename': 'ZeroDivisionError', 'evalue': 'division by zero', 'traceback': []}]),
        code('#| error: true\n1/0', [{'output_type': 'error', 'ename': 'ZeroDivisionError', 'evalue': 'deliberate', 'traceback': []}]),
        md('A [planted dead link](nowhere.html), a [missing anchor](' + SITE + 'good.html#no-such-heading), '
           'a [missing source file](https://github.com/example/proj/blob/main/lib/gone.py#L3), '
           'a [wrong module](' + SITE + 'good.html#g) for `other.g`: [`other.g`](' + SITE + 'good.html#g), and `g` twice: [`g`](' + SITE + 'bad.html#g).'),
        md('A TeX error: $\\frac{1}{$ and an unknown macro $\\nosuchmacro{x}$.'),
        code('show_doc(h)', [{'output_type': 'display_data', 'metadata': {}, 'data': {'text/markdown': '### g\n\n```python\ndef h(x, # passed to [`f`](' + SITE + 'good.html#f)\n):\n```'}}]),
        code('fig', [image(b'\x89PNG\r\n\x1a\n not a png')]),
    ])
    problems = docs.check(proc, cfg, out=tmp_path / 'check')
    good = [p for p in problems if p.startswith('good.html')]
    assert good == [], good
    bad = '\n'.join(problems)
    for want in [r"bad\.html: an image does not decode: 'data:image/png;base64,iVBORw0KGgo",    # the Markdown image
                 r"bad\.html: an image does not decode: 'data:image/png;base64,iVBORw0KGgogbm90",  # the output image
                 r"bad\.html: the cell c\d+ shows an error \(ZeroDivisionError: division by zero\)",
                 r"bad\.html: link to a missing page 'nowhere\.html'",
                 r"bad\.html: link to a missing anchor 'good\.html#no-such-heading'",
                 r"bad\.html: link to a missing repository file 'lib/gone\.py'",
                 r"bad\.html: `g` names 2 things",
                 r"bad\.html: the link `other\.g` goes to good\.html#g, but `other\.g` is defined at bad\.html#g",
                 r"bad\.html: TeX error: .*",
                 r"bad\.html: Markdown link text shown raw inside code .*\[`f`\]"]:
        assert re.search(want, bad), f"not caught: {want}\n{bad}"
    assert 'ZeroDivisionError: deliberate' not in bad                                  # `#| error: true` marks it
    assert len([p for p in problems if 'TeX error' in p]) >= 2                         # the parse error and the unknown macro
    shots = sorted(p.name for p in (tmp_path / 'check' / 'screenshots').glob('*.png'))
    assert shots == ['bad.png', 'good.png'] and (tmp_path / 'check' / 'screenshots' / 'good.png').stat().st_size > 1000


def test_a_cut_description_is_caught(tmp_path):
    src = tmp_path / 'x.ipynb'
    write_nb(src, [md('# Title\n\n> A description wrapped\n> over two lines.')])
    proc = tmp_path / 'proc.ipynb'
    write_nb(proc, [raw('---\ntitle: Title\ndescription: A description wrapped\n---')])
    assert any('the description is cut' in p for p in docs.notebook_problems(proc, src))
    write_nb(proc, [raw('---\ntitle: Title\ndescription: A description wrapped over two lines.\n---')])
    assert docs.notebook_problems(proc, src) == []


def test_a_traceback_printed_on_stderr_is_caught(tmp_path):
    proc = tmp_path / 'p.ipynb'
    write_nb(proc, [code('f()', [{'output_type': 'stream', 'name': 'stderr', 'text': 'Traceback (most recent call last):\n  ...\nKeyError: 1\n'}])])
    assert any('prints a traceback' in p for p in docs.notebook_problems(proc))


def test_known_issues_only_shrink(tmp_path):
    known = tmp_path / 'known.txt'
    known.write_text("# a comment\nraw inside code\nmissing anchor 'x\\.html#y'\n")
    pats = docs.known_issues(known)
    new, seen, stale = docs.split_known(['a.html: Markdown link text shown raw inside code: [`f`](u)', 'a.html: an image does not decode'], pats)
    assert new == ['a.html: an image does not decode'] and len(seen) == 1 and stale == ["missing anchor 'x\\.html#y'"]


def test_page_names_are_the_sites():
    assert docs.page_name(Path('16_cli.ipynb')) == 'cli.html' and docs.page_name(Path('index.ipynb')) == 'index.html'
    assert docs.page_name(Path('06_ddpm_images.ipynb')) == 'ddpm_images.html'


def test_signatures_show_no_link_markup_and_prose_keeps_its_links():
    "settings.ini `procs` runs tools/docs_procs.unlink_code after nbdev's add_links: a backticked docment in show_doc's signature stays `name`, prose links stay."
    from execnb.nbio import dict2nb
    from nbdev.process import NBProcessor
    from nbdev.processors import FilterDefaults, add_links
    import docs_procs                                           # importable: tools/docs.py put its folder on sys.path
    procs = FilterDefaults().procs()
    names = [getattr(p, '__name__', '') for p in procs]
    assert names[-2:] == ['unlink_code', 'namedtuple_fields'] and names.index('add_links') < names.index('unlink_code'), names
    url = 'https://diffcourse.github.io/diffcourse/pretrained.html#build_model'
    sig = ('### build_schedule\n\n```python\ndef build_schedule(\n    spec:dict, # see `build_model`\n)->NoiseSchedule:\n```\n\n'
           '*Build what a card describes; the model: `build_model`.*')
    nb = dict2nb({'cells': [md('Prose: `build_model` builds it.'),
                            code('show_doc(build_schedule)', [{'output_type': 'display_data', 'metadata': {},
                                                               'data': {'text/markdown': sig.splitlines(keepends=True)}}])],
                  'metadata': {}, 'nbformat': 4, 'nbformat_minor': 5})
    NBProcessor(nb=nb, procs=[add_links, docs_procs.unlink_code]).process()
    prose, shown = nb.cells[0].source, ''.join(nb.cells[1].outputs[0].data['text/markdown'])
    assert prose == f'Prose: [`build_model`]({url}) builds it.'                              # a prose link is kept
    fenced, after = shown.split('```python\n')[1].split('```\n')
    assert '    spec:dict, # see `build_model`\n' in fenced and '](' not in fenced, fenced    # the signature: no link markup
    assert f'the model: [`build_model`]({url})' in after, after                              # the docstring under it keeps its link


def test_unlink_fenced():
    from docs_procs import unlink_fenced
    link = '[`f`](https://x.io/a.html#f)'
    src = (f'{link} prose\n```python\ndef g(x, # see {link}, {link}\n):\n```\n{link}\n'
           f'~~~~\n{link}\n~~~\nstill in the fence {link}\n~~~~\nout {link}\n````\n```\n{link}\n````\n')
    assert unlink_fenced(src) == ('[`f`](https://x.io/a.html#f) prose\n```python\ndef g(x, # see `f`, `f`\n):\n```\n[`f`](https://x.io/a.html#f)\n'
                                  '~~~~\n`f`\n~~~\nstill in the fence `f`\n~~~~\nout [`f`](https://x.io/a.html#f)\n````\n```\n`f`\n````\n')
    assert unlink_fenced('no fence [`f`](u.html) `g`') == 'no fence [`f`](u.html) `g`'


def test_namedtuple_pages_show_their_fields():
    "show_doc of a NamedTuple shows `(*args, **kwargs)`; settings.ini's namedtuple_fields puts the fields, hints and comments back."
    from nbdev.showdoc import show_doc
    from diffcourse.ddpm import SampleOutput, DDPMStepOutput
    import docs_procs
    for cls in (SampleOutput, DDPMStepOutput):
        md = show_doc(cls)._repr_markdown_()
        assert '*args, **kwargs' in md                                  # what nbdev shows by itself
        cell = {'outputs': [{'data': {'text/markdown': md.splitlines(keepends=True)}}]}
        docs_procs.namedtuple_fields(cell)
        shown = ''.join(cell['outputs'][0]['data']['text/markdown'])
        assert '*args, **kwargs' not in shown and f'class {cls.__name__}(NamedTuple):' in shown, shown
        assert all(f'    {f}: torch.Tensor  # ' in shown for f in cls._fields), shown
    assert '    prev_sample: torch.Tensor  # x_{t-1}' in docs_procs.namedtuple_signature(DDPMStepOutput)
    assert docs_procs.namedtuple_signature(dict) is None
