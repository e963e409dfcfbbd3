"""Run `vlora ARGS` in forked children and SIGKILL each at a different moment of writing the store.

    python tests/crash_driver.py STORE OUT -- vlora-args...

For kill point n = 1, 2, ... the child dies with SIGKILL just before the n-th file operation of the
save (an fsync of a written temp file, a rename into place, or an unlink of an old file). Before each
run STORE is reset to its original content; after the kill it is copied to OUT/<n> for the test to
inspect. Stops when a run completes without reaching its kill point. Prints the number of kills.
"""

import os
import shutil
import signal
import sys
from pathlib import Path


def run_child(kill_at: int, args: list[str]) -> None:
    import vlora_core.io.atomic as atomic
    import vlora_core.io.store_files as store_files
    from vlora_core.cli import main

    count = [0]

    def counted(operation):
        def wrapper(*a, **k):
            count[0] += 1
            if count[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return operation(*a, **k)

        return wrapper

    atomic.os = type("os_with_kill_points", (), {})()  # the module's view of os, with counted operations
    for name in dir(os):
        setattr(atomic.os, name, getattr(os, name))
    atomic.os.fsync, atomic.os.replace, atomic.os.unlink = counted(os.fsync), counted(os.replace), counted(os.unlink)
    store_files.Path = type("Path", (type(Path()),), {"unlink": counted(Path.unlink)})
    code = main(args)
    os._exit(100 + code)  # finished without being killed


def main() -> None:
    store, out = Path(sys.argv[1]), Path(sys.argv[2])
    args = sys.argv[sys.argv.index("--") + 1 :]
    pristine = out / "pristine"
    shutil.copytree(store, pristine)
    import torch

    torch.set_num_threads(1)  # forked children must not inherit a busy thread pool
    kills = 0
    for kill_at in range(1, 200):
        shutil.rmtree(store)
        shutil.copytree(pristine, store)
        pid = os.fork()
        if pid == 0:
            run_child(kill_at, args)
        _, status = os.waitpid(pid, 0)
        if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
            print(f"completed at kill point {kill_at} with exit {os.WEXITSTATUS(status) - 100}")
            break
        kills += 1
        shutil.copytree(store, out / str(kill_at))
    print(f"kills={kills}")


if __name__ == "__main__":
    main()
