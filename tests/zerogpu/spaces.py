"""A stand-in for the ``spaces`` package on ZeroGPU hardware, for tests/test_gpu.py (put this folder first on
``sys.path``). Like ``spaces.GPU`` there, the decorator runs the function in another process: its arguments are
pickled in and its result pickled back, and the worker calls the undecorated function. Stricter than ZeroGPU,
which forks its worker from the app, each call here gets a fresh *spawned* process: it shares nothing with the
caller's memory, so whatever the function needs must come by its arguments or be found from them."""

import functools
import importlib
import multiprocessing
import os

CALLS = []  # one dict per call: the worker's process id and the duration asked for


def GPU(fn=None, *, duration=None, size=None):
    if fn is None:
        return lambda f: GPU(f, duration=duration, size=size)

    @functools.wraps(fn)
    def in_a_worker(*args, **kwargs):
        seconds = duration(*args, **kwargs) if callable(duration) else duration
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            pid, result = pool.apply(_call, (fn.__module__, fn.__qualname__, args, kwargs))
        CALLS.append({"pid": pid, "duration": seconds})
        return result

    return in_a_worker


def _call(module: str, name: str, args: tuple, kwargs: dict):
    decorated = getattr(importlib.import_module(module), name)  # this module decorated it there too
    return os.getpid(), decorated.__wrapped__(*args, **kwargs)
