"""Create bench/.venv-peers with the peer tools, pinned, on CPU torch 2.13.0 (their import names clash with ours).

    python bench/peers.py

vlora-dev 1.0.0 installs as ``vlora`` — the same import name as this project — so the peers never share
our venv: bench/peer_driver.py runs inside this one. pip is told torch==2.13.0 explicitly so that it
keeps the local CPU build and never pulls a CUDA wheel.
"""

from __future__ import annotations

import subprocess
import sys

from common import PEERS_PYTHON

VENV = PEERS_PYTHON.parent.parent
PINS = ("torch==2.13.0", "vlora-dev==1.0.0", "lorashare==0.1.3")


def main() -> None:
    if not PEERS_PYTHON.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(PEERS_PYTHON), "-m", "pip", "install", *PINS], check=True)
    out = subprocess.run(
        [str(PEERS_PYTHON), "-c", "import torch, vlora, lorashare; print(torch.__version__)"],
        check=True,
        capture_output=True,
        text=True,
        cwd=VENV,
    )
    print(f"{VENV}: torch {out.stdout.strip()}, {', '.join(PINS[1:])}")


if __name__ == "__main__":
    main()
