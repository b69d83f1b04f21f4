"""Docs without Quarto: process the notebooks as `nbdev_docs` would, and make README.md from nbs/index.ipynb.

Quarto cannot be installed on the course's build machines, so `nbdev_readme` and `nbdev_docs` cannot run
there. This script uses nbdev's own notebook processing (`nbdev.quarto.proc_nbs`, the step before Quarto
renders) and turns the processed index notebook into Markdown with nbconvert.

    python tools/docs.py                 # process notebooks, write README.md
    python tools/docs.py --check-readme  # process notebooks, fail if README.md differs
    python tools/docs.py --html          # also render every processed notebook to _docs_html/*.html
    python tools/docs.py --only 01_data  # process one notebook only (to _proc/), no README
"""
import argparse, json, sys, difflib
from pathlib import Path

from nbdev.config import get_config
from nbdev.quarto import proc_nbs


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


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--check-readme', action='store_true', help='fail if README.md differs from nbs/index.ipynb')
    p.add_argument('--html', action='store_true', help='render processed notebooks to _docs_html/')
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
    else:
        target.write_text(readme)
        folder = cfg.config_path / README_IMAGES
        for old in folder.glob('*.png') if folder.exists() else []:
            if f"{README_IMAGES}/{old.name}" not in images: old.unlink()
        for n, b in images.items():
            (cfg.config_path / n).parent.mkdir(parents=True, exist_ok=True); (cfg.config_path / n).write_bytes(b)
        print('wrote', target, 'and', len(images), 'figure(s)')
    if args.html: render_html(proc, cfg.config_path / '_docs_html')


if __name__ == '__main__': main()
