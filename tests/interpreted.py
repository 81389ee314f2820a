"""The Triton kernel modules built for Triton's CPU interpreter, whatever this process imported before.

``TRITON_INTERPRET=1`` is read when a ``@triton.jit`` function is defined, so a kernel module imported
without it (by a GPU test, or by anything that ran a kernel first) can never be interpreted. So that test
order can never turn a kernel test into a skip, ``modules()`` imports fresh copies of every kernel module
under the interpreter, beside whatever ``sys.modules`` holds; ``installed()`` puts them where ``selfextend``
imports them from (``load_kernel``, ``from ...backends import triton_paged``) for the length of a test, so
backends reach them too; and ``counting()`` lets a test fail when a kernel it meant to test never launched.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from types import ModuleType

PACKAGE = "selfextend.backends"
NAMES = ("triton_common", "triton_kernel", "triton_paged", "triton_merge")  # the shared module first
KERNELS = {"triton_kernel": "_selfextend_fwd", "triton_paged": "_paged_selfextend_fwd",
           "triton_merge": "_merge_kernel"}


def build(interpret: bool) -> dict[str, ModuleType]:
    """Fresh copies of every kernel module, built for the interpreter or compiled, beside (not in)
    ``sys.modules``."""
    package = importlib.import_module(PACKAGE)
    saved = {n: sys.modules.pop(f"{PACKAGE}.{n}") for n in NAMES if f"{PACKAGE}.{n}" in sys.modules}
    saved_attrs = {n: package.__dict__.pop(n) for n in NAMES if n in package.__dict__}
    previous = os.environ.pop("TRITON_INTERPRET", None)
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        return {n: importlib.import_module(f"{PACKAGE}.{n}") for n in NAMES}
    finally:
        os.environ.pop("TRITON_INTERPRET", None)
        if previous is not None:
            os.environ["TRITON_INTERPRET"] = previous
        _restore(package, saved, saved_attrs)


@functools.cache
def modules() -> dict[str, ModuleType] | None:
    """Every kernel module of ``selfextend.backends`` built for the interpreter; None without triton.

    If none was imported yet, the interpreted builds also become the process's (the CPU test process has no
    other use for the modules); otherwise they are reached through ``installed()`` or this dict only."""
    if importlib.util.find_spec("triton") is None:
        return None
    built = build(interpret=True)
    for name, kernel in KERNELS.items():
        if type(getattr(built[name], kernel)).__name__ != "InterpretedFunction":
            raise RuntimeError(f"{name}.{kernel} was built compiled under TRITON_INTERPRET=1")
    if not any(f"{PACKAGE}.{n}" in sys.modules for n in NAMES):
        _install(built)
    return built


@functools.cache
def compiled() -> dict[str, ModuleType]:
    """Every kernel module built for a GPU (to compile, not run, on a machine without one)."""
    return build(interpret=False)


def _install(built: dict[str, ModuleType]) -> None:
    package = importlib.import_module(PACKAGE)
    for name, module in built.items():
        sys.modules[f"{PACKAGE}.{name}"] = module
        setattr(package, name, module)


def _restore(package: ModuleType, saved: dict[str, ModuleType], saved_attrs: dict[str, ModuleType]) -> None:
    for name in NAMES:
        key = f"{PACKAGE}.{name}"
        if name in saved:
            sys.modules[key] = saved[name]
        else:
            sys.modules.pop(key, None)
        if name in saved_attrs:
            setattr(package, name, saved_attrs[name])
        else:
            package.__dict__.pop(name, None)


@contextlib.contextmanager
def installed() -> Iterator[dict[str, ModuleType]]:
    """The interpreted builds as ``selfextend.backends.triton_*`` while the block runs (then the modules
    that were there before)."""
    built = modules()
    if built is None:
        raise RuntimeError("triton is not installed")
    package = importlib.import_module(PACKAGE)
    saved = {n: sys.modules[f"{PACKAGE}.{n}"] for n in NAMES if f"{PACKAGE}.{n}" in sys.modules}
    saved_attrs = {n: package.__dict__[n] for n in NAMES if n in package.__dict__}
    _install(built)
    try:
        yield built
    finally:
        _restore(package, saved, saved_attrs)


class Counted:
    """A ``@triton.jit`` kernel that counts its launches (``kernel[grid](...)``)."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self.launches = 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]

    def __getattr__(self, name):
        return getattr(self.kernel, name)


@contextlib.contextmanager
def counting(module: ModuleType, name: str) -> Iterator[Counted]:
    """``module.<name>`` replaced by a launch counter while the block runs."""
    kernel = getattr(module, name)
    counted = Counted(kernel)
    setattr(module, name, counted)
    try:
        yield counted
    finally:
        setattr(module, name, kernel)


def launching(module_name: str, kernel: str) -> Iterator[ModuleType]:
    """A fixture body: the interpreted module ``module_name`` installed, and the test failed if its ``kernel``
    never launched (a test that silently ran another backend proves nothing about the kernel)."""
    with installed() as built, counting(built[module_name], kernel) as counted:
        yield built[module_name]
    assert counted.launches, f"{module_name}.{kernel} never launched"
