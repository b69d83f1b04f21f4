import os
# Tests never reach the network and never ask for a W&B login.
os.environ.setdefault('WANDB_MODE', 'offline')
os.environ.setdefault('WANDB_SILENT', 'true')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('MPLBACKEND', 'Agg')

import socket
import pytest

_LOCAL = ('127.0.0.1', '::1', 'localhost')

@pytest.fixture(autouse=True)
def one_thread():
    "Every test: one torch thread. The models in tests are tiny, and one thread is fastest, much more so when other work shares the cores."
    import torch
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    "Every test in the suite: a connection to anything but this machine fails the test (subprocesses excepted)."
    real, real_ex = socket.socket.connect, socket.socket.connect_ex
    def guard(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in _LOCAL:
            raise AssertionError(f"a test tried to connect to {address}: tests must not touch the network")
    def connect(self, address): guard(self, address); return real(self, address)
    def connect_ex(self, address): guard(self, address); return real_ex(self, address)
    monkeypatch.setattr(socket.socket, 'connect', connect)
    monkeypatch.setattr(socket.socket, 'connect_ex', connect_ex)

def _refuse(*a, **k): raise AssertionError("pickle, torch.load or the network was used")

@pytest.fixture
def offline_no_pickle(monkeypatch):
    "For tests that load shipped files: pickle, torch.load and any socket use fail the test."
    import pickle, torch
    monkeypatch.setattr(pickle, 'Unpickler', _refuse)
    for mod, name in ((pickle, 'load'), (pickle, 'loads'), (torch, 'load'),
                      (socket.socket, 'connect'), (socket, 'create_connection'), (socket, 'getaddrinfo')):
        monkeypatch.setattr(mod, name, _refuse)
