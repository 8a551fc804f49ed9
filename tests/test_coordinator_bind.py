"""The multi-process coordinator listens where it was told: ``--coordinator 127.0.0.1:PORT``
stays on the loopback interface (JAX's default would be every interface, ``[::]:PORT``).

Checked by the listening socket's bound address, read from ``/proc/net/tcp{,6}`` while a
one-process "cluster" (process 0 of 1, in a subprocess: jax.distributed is process-global)
holds its coordinator service open. Loopback only; nothing leaves the machine.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mfld import sharding
from mfld.errors import ConfigError

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc/net/tcp")

PROBE = r"""
import json, sys
from mfld import sharding

def listening(port):
    out = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(name).read().splitlines()[1:]
        except OSError:
            continue
        for ln in lines:
            f = ln.split()
            addr, p = f[1].rsplit(":", 1)
            if int(p, 16) == port and f[3] == "0A":  # 0A: LISTEN
                out.append(addr)
    return out

port, bind = int(sys.argv[1]), (sys.argv[2].replace("PORT", sys.argv[1]) or None)
sharding.initialize(f"127.0.0.1:{port}", 1, 0, timeout_s=60, bind=bind)
print(json.dumps(listening(port)))
import jax
jax.distributed.shutdown()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening_addresses(bind: str) -> list[str]:
    port = _free_port()
    res = subprocess.run([sys.executable, "-c", PROBE, str(port), bind], capture_output=True, text=True,
                         timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


LOOPBACK_V4 = "0100007F"  # 127.0.0.1 as /proc/net/tcp writes it (little-endian hex)
ANY_V4, ANY_V6 = "00000000", "00000000000000000000000000000000"


def test_coordinator_on_127_0_0_1_listens_on_loopback_only():
    addrs = _listening_addresses("")
    assert addrs, "the coordinator is not listening"
    assert all(a == LOOPBACK_V4 or a.endswith(LOOPBACK_V4) for a in addrs), addrs  # (v4-mapped in tcp6)
    assert ANY_V4 not in addrs and ANY_V6 not in addrs


def test_every_interface_only_when_asked():
    addrs = _listening_addresses("0.0.0.0:PORT")  # --coordinator-bind 0.0.0.0:PORT
    assert addrs and all(a in (ANY_V4, ANY_V6) for a in addrs), addrs  # (gRPC binds 0.0.0.0 dual-stack)


def test_bind_address_rules(monkeypatch):
    monkeypatch.delenv("JAX_COORDINATOR_BIND_ADDRESS", raising=False)
    assert sharding.bind_address("127.0.0.1:1234") == "127.0.0.1:1234"
    assert sharding.bind_address("node7:1234") == "node7:1234"
    assert sharding.bind_address("127.0.0.1:1234", "0.0.0.0:1234") == "0.0.0.0:1234"
    monkeypatch.setenv("JAX_COORDINATOR_BIND_ADDRESS", "[::]:1234")  # the user's explicit choice
    assert sharding.bind_address("127.0.0.1:1234") == "[::]:1234"
    monkeypatch.delenv("JAX_COORDINATOR_BIND_ADDRESS")
    for bad in ("localhost", "host:", ":123", "h:0", "h:65536", "h:12a", "a b:1"):
        with pytest.raises(ConfigError, match="HOST:PORT"):
            sharding.bind_address(bad) if bad != "a b:1" else sharding.bind_address("h:1", bad)
