"Importing the package opens no network connection."
import subprocess, sys, textwrap

def test_import_without_network():
    code = textwrap.dedent('''
        import socket
        def refuse(*a, **k): raise RuntimeError("network access during import")
        socket.socket.connect = refuse
        socket.create_connection = refuse
        socket.getaddrinfo = refuse
        import importlib, pkgutil, diffcourse
        mods = [m.name for m in pkgutil.iter_modules(diffcourse.__path__) if not m.name.startswith('_')]
        for m in mods: importlib.import_module('diffcourse.' + m)
        print('imported', len(mods), 'modules')
    ''')
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'imported' in r.stdout


def test_the_suite_wide_guard_refuses_connections():
    "tests/conftest.py guards every test: a connection off this machine fails instead of reaching the network."
    import socket
    import pytest
    s = socket.socket()
    try:
        with pytest.raises(AssertionError, match='tests must not touch the network'): s.connect(('192.0.2.1', 80))
        with pytest.raises(AssertionError, match='tests must not touch the network'): s.connect_ex(('192.0.2.1', 80))
    finally: s.close()
