"tools/start.sh, the first command a learner runs: it sets up (here: finds everything installed) and starts JupyterLab on nbs/."
import json, os, signal, socket, subprocess, time, urllib.request, urllib.error
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
START = ROOT / 'tools' / 'start.sh'

pytestmark = pytest.mark.skipif(not (ROOT / '.venv' / 'bin' / 'jupyter').exists(),
                                reason='needs the installed environment (.venv with JupyterLab): run tools/start.sh or .ci/run first')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def get_json(url:str, timeout:float=5):
    with urllib.request.urlopen(url, timeout=timeout) as r: return json.loads(r.read())


def stop(proc):
    "End the script's whole process group (bash exec'd into jupyter, and the kernels it may have started)."
    if proc.poll() is not None: return
    try: os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError: return
    try: proc.wait(15)
    except subprocess.TimeoutExpired:
        try: os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError: pass
        proc.wait(10)


def test_start_sh_serves_the_notebooks(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ('NO_LAB', 'VIRTUAL_ENV', 'JUPYTER_CONFIG_DIR')}
    env.update(JUPYTER_RUNTIME_DIR=str(tmp_path / 'runtime'), JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / 'workspaces'),
               JUPYTER_CONFIG_DIR=str(tmp_path / 'config'))   # no files left in ~/.jupyter or ~/.local
    log = open(tmp_path / 'lab.log', 'w+')
    # the script's own arguments reach `jupyter lab`: port, no browser, no token (loopback only); as root it adds --allow-root
    proc = subprocess.Popen(['bash', str(START), '--no-browser', f'--port={port}', '--ServerApp.port_retries=0',
                             '--ServerApp.ip=127.0.0.1', "--IdentityProvider.token=", '--ServerApp.password='],
                            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        listing, deadline, last = None, time.time() + 90, None
        while time.time() < deadline and proc.poll() is None:
            try: listing = get_json(f'http://127.0.0.1:{port}/api/contents/'); break
            except (urllib.error.URLError, ConnectionError, OSError, ValueError) as e: last = e; time.sleep(0.5)
        log.seek(0); out = log.read()
        assert listing is not None, f"JupyterLab did not answer on port {port} (exit status {proc.poll()}, last error {last!r}):\n{out[-3000:]}"
        names = {c['name'] for c in listing['content']}
        assert {'00_core.ipynb', 'index.ipynb', '16_cli.ipynb'} <= names, sorted(names)
        assert listing['path'] == '' and not {'diffcourse', 'tests', 'settings.ini'} & names   # the server's root is nbs/
        lab = urllib.request.urlopen(f'http://127.0.0.1:{port}/lab', timeout=10)
        assert lab.status == 200 and b'JupyterLab' in lab.read()
    finally:
        stop(proc); log.close()
    assert proc.poll() is not None
