"""Docs without Quarto: process the notebooks as `nbdev_docs` would, and make README.md from nbs/index.ipynb.

Quarto cannot be installed on the course's build machines, so `nbdev_readme` and `nbdev_docs` cannot run
there. This script uses nbdev's own notebook processing (`nbdev.quarto.proc_nbs`, the step before Quarto
renders) and turns the processed index notebook into Markdown with nbconvert.

    python tools/docs.py                 # process notebooks, write README.md
    python tools/docs.py --check-readme  # process notebooks, fail if README.md differs
    python tools/docs.py --html          # also render every processed notebook to _docs_html/*.html
    python tools/docs.py --only 01_data  # process one notebook only (to _proc/), no README
    python tools/docs.py --check         # process notebooks, render every page, check each in headless Chromium

`--check` (what CI runs) renders each processed notebook to HTML with nbconvert under _docs_check/ (the page
names the site uses: 16_cli.ipynb -> cli.html), opens each in headless Chromium with every request that is
not a local file blocked and MathJax served from Debian's libjs-mathjax, saves a full-page screenshot of
each under _docs_check/screenshots/, and fails on: an error output (or a traceback on stderr) in a cell not
marked `#| error: true`, a description cut short (the front matter differs from the chapter's `> ` lines),
an image that does not decode, a TeX error, a link to a page, anchor or repository file that does not
exist, a link whose text names something defined elsewhere (or defined twice), and Markdown link text
left raw inside code (an API signature). It needs `pip install playwright` and Debian's `chromium` and
`libjs-mathjax` (no browser download: playwright drives Debian's Chromium; DIFFCOURSE_CHROMIUM overrides).
"""
import argparse, json, os, re, shutil, sys, difflib
from pathlib import Path

from nbdev.config import get_config
from nbdev.quarto import proc_nbs

# settings.ini `procs` names docs_procs (beside this file): nbdev imports it by module name while processing,
# so this folder goes on the import path, also when this file is loaded by path (the tests) rather than run.
if str(Path(__file__).resolve().parent) not in map(str, sys.path): sys.path.insert(0, str(Path(__file__).resolve().parent))


def _frontmatter(src: str) -> dict:
    "Parse the `---` YAML block nbdev puts in a raw cell (title, description, ...), wrapped lines and all."
    import yaml
    body = src.strip()
    if body.startswith('---'): body = body[3:]
    if body.rstrip().endswith('---'): body = body.rstrip()[:-3]
    out = yaml.safe_load(body) or {}
    return out if isinstance(out, dict) else {}


README_IMAGES = 'images/readme'   # figures of the README, beside it in the repository


def _hidden_source(src: str) -> bool:
    "A cell whose code the docs do not show (`#| echo: false`, `#| hide`)."
    flags = [l.replace(' ', '') for l in src.splitlines() if l.startswith('#|')]
    return any(f in ('#|echo:false', '#|hide', '#|include:false') for f in flags)


def readme_from(nb_path: Path, images: dict | None = None) -> str:
    "Markdown for README.md from a processed notebook: title, description, prose, shown code, text and image outputs."
    import base64
    nb = json.loads(nb_path.read_text())
    parts = []
    for cell in nb['cells']:
        src = ''.join(cell['source']).rstrip()
        if cell['cell_type'] == 'raw' and src.startswith('---'):
            fm = _frontmatter(src)
            if 'title' in fm: parts.append(f"# {fm['title']}")
            if 'description' in fm: parts.append(f"> {' '.join(str(fm['description']).split())}")
        elif cell['cell_type'] == 'markdown':
            if src: parts.append(src)
        elif cell['cell_type'] == 'code':
            if src and not _hidden_source(src): parts.append(f"```python\n{src}\n```")
            for o in cell.get('outputs', []):
                data = o.get('data', {})
                if 'image/png' in data and images is not None:       # figures go to files the README links to
                    name = f"{README_IMAGES}/{nb_path.stem}-{len(images) + 1}.png"
                    images[name] = base64.b64decode(''.join(data['image/png']))
                    parts.append(f"![]({name})")
                    continue
                if any(k.startswith('image/') for k in data): continue
                text = o.get('text') or data.get('text/markdown') or data.get('text/plain')
                if text: parts.append("```\n" + ''.join(text).rstrip() + "\n```")
    return '\n\n'.join(parts) + '\n'


def render_html(proc: Path, out: Path, only=None):
    "Render every processed notebook to HTML with nbconvert, for a look in a browser."
    from nbconvert import HTMLExporter
    import nbformat
    out.mkdir(exist_ok=True)
    exp = HTMLExporter()
    for nb in sorted(proc.glob(f"{only or '*'}.ipynb")):
        body, _ = exp.from_notebook_node(nbformat.read(nb, as_version=4))
        (out / (nb.stem + '.html')).write_text(body)
        print('wrote', out / (nb.stem + '.html'))



# --- the browser check: every page rendered and looked at in headless Chromium ------------------------------

CHECK_DIR = '_docs_check'                                  # gitignored: the rendered pages and their screenshots
MATHJAX = Path('/usr/share/javascript/mathjax/MathJax.js')  # Debian's libjs-mathjax (MathJax 2.7)
CHROMIUM = ('/usr/lib/chromium/chromium', '/usr/bin/chromium', '/usr/bin/chromium-browser')
# Put before MathJax loads: TeX errors shown as errors (not the TeX source in their place), and collected.
MATHJAX_CONFIG = """<script type="text/x-mathjax-config">
window.__texErrors = [];
MathJax.Hub.Config({TeX: {noErrors: {disabled: true}, noUndefined: {disabled: true}}});
MathJax.Hub.Register.MessageHook("TeX Jax - parse error", function (m) { window.__texErrors.push(String(m[1])); });
MathJax.Hub.Register.MessageHook("Math Processing Error", function (m) { window.__texErrors.push("math processing error: " + String(m[2] && m[2].message || m[2])); });
MathJax.Hub.Register.StartupHook("End", function () { window.__mathjaxDone = true; });
</script>
"""
# What a page shows, read in the browser once it has loaded and MathJax has typeset it.
PAGE_JS = r"""() => {
  const pandocId = t => t.toLowerCase().trim().replace(/[^\p{L}\p{N}_.\s-]/gu, '').replace(/\s+/g, '-').replace(/^[^\p{L}]+/u, '');
  const ids = new Set([...document.querySelectorAll('[id]')].map(e => e.id));
  for (const a of document.querySelectorAll('a[name]')) ids.add(a.getAttribute('name'));
  for (const h of document.querySelectorAll('h1, h2, h3, h4, h5, h6')) ids.add(pandocId(h.textContent.replace(/\u00b6/g, '')));  // Quarto's (pandoc's) ids
  const images = [...document.images].filter(i => !i.complete || i.naturalWidth === 0).map(i => (i.getAttribute('src') || '').slice(0, 80));
  const links = [...document.querySelectorAll('a[href]')].map(a => ({href: a.getAttribute('href'), text: a.textContent.trim()}));
  const raw = [];
  for (const el of document.querySelectorAll('pre, code')) raw.push(...(el.textContent.match(/\[`?[^\]\n]{1,80}?`?\]\((?:https?:|[\w.\/-]+\.html)[^)\s]*\)/g) || []));
  const tex = (window.__texErrors || []).concat([...document.querySelectorAll('.mjx-merror, .MathJax_Error')].map(e => 'shown as an error: ' + e.textContent.slice(0, 80)));
  return {ids: [...ids], images, links, raw: [...new Set(raw)], tex, mathjax: !!window.__mathjaxDone};
}"""


def page_name(nb: Path) -> str:
    "The page a notebook becomes on the site, as nbdev links it: 16_cli.ipynb -> cli.html."
    from nbdev.doclinks import _nbpath2html
    return _nbpath2html(Path(nb)).name


def _description(nb_path: Path) -> str | None:
    "The whole `> ` description under a chapter's title (its first Markdown cell), wrapped lines joined."
    cells = json.loads(nb_path.read_text())['cells']
    md = next((c for c in cells if c['cell_type'] == 'markdown'), None)
    if md is None: return None
    lines, out = ''.join(md['source']).splitlines(), []
    i = next((k + 1 for k, l in enumerate(lines) if l.startswith('# ')), None)
    if i is None: return None
    while i < len(lines) and not lines[i].strip(): i += 1
    while i < len(lines) and lines[i].startswith('>'): out.append(lines[i][1:].strip()); i += 1
    return ' '.join(' '.join(out).split()) or None


def notebook_problems(proc_nb: Path, src_nb: Path | None = None) -> list[str]:
    "What the processed notebook itself shows wrong: error outputs not marked deliberate, a cut description."
    nb, page, out = json.loads(proc_nb.read_text()), page_name(proc_nb), []
    for cell in nb['cells']:
        if cell['cell_type'] != 'code': continue
        src = ''.join(cell['source'])
        if re.search(r'^#\|\s*error:\s*true\s*$', src, re.M | re.I): continue          # Quarto's mark for a deliberate error
        where = f"{page}: the cell {cell.get('id') or src.strip().splitlines()[:1]}"
        for o in cell.get('outputs', []):
            if o['output_type'] == 'error':
                out.append(f"{where} shows an error ({o.get('ename')}: {str(o.get('evalue'))[:120]}); fix it, or mark the cell `#| error: true` if it is deliberate")
            elif o['output_type'] == 'stream' and 'Traceback (most recent call last)' in ''.join(o.get('text', '')):
                out.append(f"{where} prints a traceback; fix it, or mark the cell `#| error: true` if it is deliberate")
    if src_nb is not None and src_nb.exists():
        want = _description(src_nb)
        fm = next((_frontmatter(''.join(c['source'])) for c in nb['cells']
                   if c['cell_type'] == 'raw' and ''.join(c['source']).lstrip().startswith('---')), {})
        got = ' '.join(str(fm.get('description', '')).split())
        if want and got != want:
            out.append(f"{page}: the description is cut: the page says {got!r}, the chapter {want!r} (nbdev keeps only the first `> ` line)")
    return out


def render_pages(proc: Path, out: Path, nbs: Path | None = None) -> dict:
    "Each processed notebook as an HTML page under `out`, named as on the site, with local MathJax; {page: notebook}."
    from nbconvert import HTMLExporter
    import nbformat
    if out.exists(): shutil.rmtree(out)
    shutil.copytree(proc, out, ignore=shutil.ignore_patterns('*.ipynb', '_quarto.yml', '*.yml'))   # the files pages refer to
    exp = HTMLExporter(mathjax_url=MATHJAX.as_uri() + '?config=TeX-AMS_CHTML-full,Safe')
    pages = {}
    for nb in sorted(proc.glob('*.ipynb')):
        node = nbformat.read(nb, as_version=4)
        for cell in node.cells:                              # closer to what Quarto shows: no hidden code, front matter as a title
            src = ''.join(cell.source)
            if cell.cell_type == 'raw' and src.lstrip().startswith('---'):
                fm = _frontmatter(src)
                cell.cell_type, cell.source = 'markdown', f"# {fm.get('title', '')}\n\n> {fm.get('description', '')}"
                cell.pop('outputs', None); cell.pop('execution_count', None)
            elif cell.cell_type == 'code' and _hidden_source(src):
                cell.metadata.setdefault('transient', {})['remove_source'] = True
            for o in cell.get('outputs', []):                 # Quarto's link attributes, which nbconvert would print
                if 'text/markdown' in o.get('data', {}):
                    o.data['text/markdown'] = re.sub(r'\{target="_blank"[^}]*\}', '', ''.join(o.data['text/markdown']))
        body, _ = exp.from_notebook_node(node)
        body = body.replace('<head>', '<head>\n' + MATHJAX_CONFIG, 1)
        name = page_name(nb)
        (out / name).write_text(body)
        pages[name] = nb
    return pages


def _symbols(cfg) -> dict:
    "Where each documented name of the package is defined: {name: {page#anchor, ...}}, by bare and full name."
    ns = {}
    exec((cfg.lib_path / '_modidx.py').read_text(), ns)
    where = {}
    for mod, syms in ns['d']['syms'].items():
        for k, (url, _) in syms.items():
            for name in (k, k[len(mod) + 1:]): where.setdefault(name, set()).add(url)
    return where


def _chromium() -> str:
    for p in ([os.environ['DIFFCOURSE_CHROMIUM']] if os.environ.get('DIFFCOURSE_CHROMIUM') else []) + list(CHROMIUM):
        if Path(p).is_file(): return p
    sys.exit("FAIL: no Chromium: `apt-get install chromium` (Debian), or set DIFFCOURSE_CHROMIUM to its binary")


def browser_problems(out: Path, pages: dict, cfg, shots: Path | None = None, timeout_s: float = 60) -> list[str]:
    "Open every page in headless Chromium, offline, and list what a reader would meet that is broken."
    try: from playwright.sync_api import sync_playwright
    except ImportError: sys.exit("FAIL: the browser check needs `pip install playwright` (and Debian's chromium; no browser download)")
    if not MATHJAX.exists(): sys.exit(f"FAIL: no MathJax at {MATHJAX}: `apt-get install libjs-mathjax`")
    site = f"{cfg.doc_host}{cfg.doc_baseurl}".rstrip('/') + '/'
    source = f"{cfg.git_url}/blob/{cfg.branch}/"
    where, problems, seen, blocked = _symbols(cfg), [], {}, set()
    if shots: shots.mkdir(parents=True, exist_ok=True)

    def route(r):
        if r.request.url.startswith(('file:', 'data:', 'blob:')): r.continue_()
        else: blocked.add(r.request.url.split('?')[0][:100]); r.abort()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'])
        ctx = browser.new_context(viewport={'width': 1200, 'height': 900})
        ctx.route('**/*', route)
        for name in pages:
            page = ctx.new_page()
            page.goto((out / name).resolve().as_uri(), wait_until='load', timeout=timeout_s * 1000)
            try: page.wait_for_function('window.__mathjaxDone === true', timeout=timeout_s * 1000)
            except Exception: problems.append(f"{name}: MathJax did not finish typesetting within {timeout_s:.0f} s")
            seen[name] = info = page.evaluate(PAGE_JS)
            if shots: page.screenshot(path=str(shots / (Path(name).stem + '.png')), full_page=True)
            page.close()
            problems += [f"{name}: an image does not decode: {src!r}" for src in info['images']]
            problems += [f"{name}: TeX error: {e}" for e in info['tex']]
            problems += [f"{name}: Markdown link text shown raw inside code (an API signature?): {r}" for r in info['raw']]
        browser.close()

    for name, info in seen.items():
        for link in info['links']:
            href, text = link['href'], link['text']
            if href.startswith(source):                                   # a source link: the file, and the line, must exist
                path, _, frag = href[len(source):].partition('#')
                f = cfg.config_path / path
                if not f.is_file(): problems.append(f"{name}: link to a missing repository file {path!r} ({text!r})")
                elif frag.startswith('L') and frag[1:].isdigit() and int(frag[1:]) > len(f.read_text().splitlines()):
                    problems.append(f"{name}: link to line {frag[1:]} of {path}, which is shorter ({text!r})")
                continue
            if href.startswith(site): target = href[len(site):] or 'index.html'
            elif re.match(r'^[a-z][a-z0-9+.-]*:', href): continue            # elsewhere on the web: not checked offline
            else: target = href
            tpage, _, anchor = target.partition('#')
            tpage = tpage or name
            if tpage.endswith('.ipynb'): tpage = page_name(Path(tpage))      # Quarto turns links to notebooks into their pages
            if tpage.endswith('/'): tpage += 'index.html'
            if tpage not in seen:
                if not (out / tpage).exists(): problems.append(f"{name}: link to a missing page {target!r} ({text!r})")
                continue
            if anchor and anchor not in seen[tpage]['ids']:
                problems.append(f"{name}: link to a missing anchor {target!r} ({text!r})")
                continue
            sym = text.strip('`').removesuffix('()')
            if anchor and href.startswith(site) and re.fullmatch(r'[A-Za-z_][\w.]*', sym):
                defs = where.get(sym) or where.get(f"{cfg.lib_name}.{sym}") or set()
                if len(defs) > 1:
                    problems.append(f"{name}: `{sym}` names {len(defs)} things ({', '.join(sorted(defs))}): nbdev links it to one; public names must be unique")
                elif defs and f"{tpage}#{anchor}" not in defs:
                    problems.append(f"{name}: the link `{sym}` goes to {tpage}#{anchor}, but `{sym}` is defined at {next(iter(defs))}")
    if blocked: print(f"(blocked, as the check runs offline: {len(blocked)} outside address(es), e.g. {sorted(blocked)[:3]})")
    return problems


KNOWN = Path(__file__).with_name('docs_known_issues.txt')


def known_issues(path: Path = KNOWN) -> list:
    "The patterns (regular expressions, one a line, `#` comments) of problems known and owned elsewhere."
    if not path.exists(): return []
    return [re.compile(l.strip()) for l in path.read_text().splitlines() if l.strip() and not l.lstrip().startswith('#')]


def split_known(problems: list, known: list) -> tuple:
    "(new problems, known problems, patterns that matched nothing): the known list may only shrink."
    new = [p for p in problems if not any(k.search(p) for k in known)]
    return new, [p for p in problems if p not in new], [k.pattern for k in known if not any(k.search(p) for p in problems)]


def check(proc: Path, cfg, out: Path | None = None) -> list[str]:
    "Every check on every processed notebook in `proc`: the notebooks themselves, then their pages in the browser."
    out = out or cfg.config_path / CHECK_DIR
    problems = []
    for nb in sorted(proc.glob('*.ipynb')): problems += notebook_problems(nb, cfg.nbs_path / nb.name)
    pages = render_pages(proc, out / 'site')
    problems += browser_problems(out / 'site', pages, cfg, shots=out / 'screenshots')
    return problems


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--check-readme', action='store_true', help='fail if README.md differs from nbs/index.ipynb')
    p.add_argument('--html', action='store_true', help='render processed notebooks to _docs_html/')
    p.add_argument('--check', action='store_true', help=f'render every page and check it in headless Chromium (screenshots in {CHECK_DIR}/)')
    p.add_argument('--only', help='process only this notebook (name without .ipynb) and stop')
    args = p.parse_args()
    cfg = get_config()
    if args.only:
        import os
        from nbdev.serve_drv import exec_nb
        from nbdev.processors import FilterDefaults
        src = cfg.nbs_path / f"{args.only}.ipynb"
        dst = cfg.config_path / '_proc' / src.name
        dst.parent.mkdir(exist_ok=True)
        os.environ['IN_TEST'] = '1'
        exec_nb(src, dst, FilterDefaults)
        print('processed', src, '->', dst)
        if args.html: render_html(dst.parent, cfg.config_path / '_docs_html', only=dst.stem)
        return
    proc = Path(proc_nbs(cfg.nbs_path, n_workers=0, force=True))
    print(f"processed {len(list(proc.glob('*.ipynb')))} notebooks into {proc}")
    images = {}
    readme = readme_from(proc / cfg.readme_nb, images)
    target = cfg.config_path / 'README.md'
    if args.check_readme:
        old = target.read_text() if target.exists() else ''
        if old != readme:
            sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), readme.splitlines(True), 'README.md', 'from nbs/index.ipynb', n=1))
            sys.exit("FAIL: README.md differs from nbs/index.ipynb: run `python tools/docs.py` and commit README.md")
        stale = [n for n, b in images.items() if not (cfg.config_path / n).exists() or (cfg.config_path / n).read_bytes() != b]
        if stale: sys.exit(f"FAIL: README figures differ from nbs/index.ipynb's outputs: {stale}; run `python tools/docs.py` and commit them")
        print('README.md and its figures match nbs/index.ipynb')
    elif not args.check:                                   # --check alone leaves README.md as it is
        target.write_text(readme)
        folder = cfg.config_path / README_IMAGES
        for old in folder.glob('*.png') if folder.exists() else []:
            if f"{README_IMAGES}/{old.name}" not in images: old.unlink()
        for n, b in images.items():
            (cfg.config_path / n).parent.mkdir(parents=True, exist_ok=True); (cfg.config_path / n).write_bytes(b)
        print('wrote', target, 'and', len(images), 'figure(s)')
    if args.html: render_html(proc, cfg.config_path / '_docs_html')
    if args.check:
        new, known, stale = split_known(check(proc, cfg), known_issues())
        for pr in known: print('  known (tools/docs_known_issues.txt):', pr)
        for pr in new: print('  -', pr)
        for k in stale: print(f'  - tools/docs_known_issues.txt lists {k!r}, which no page shows any more: remove it')
        if new or stale: sys.exit(f"FAIL: {len(new)} new problem(s) on the docs pages, {len(stale)} stale known issue(s) (screenshots in {CHECK_DIR}/screenshots/)")
        print(f"docs pages: {len(list(proc.glob('*.ipynb')))} checked in Chromium, no new problems, {len(known)} known (screenshots in {CHECK_DIR}/screenshots/)")


if __name__ == '__main__': main()
