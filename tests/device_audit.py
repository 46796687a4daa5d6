"""The device audit: catches, on a CPU-only machine, a Triton-leg test that
would hand a kernel a CPU tensor on a CUDA machine.

Here the ``device`` fixture is ``cpu`` and so is torch's default device, so a
test that forgets ``device=device`` passes here and errors on the GPU (the
backend refuses the Triton kernels on CPU tensors there). The audit tells the
two apart by where each tensor came from, not where it lives:

* a ``TorchFunctionMode``, active while a test runs (setup, call, teardown),
  marks every tensor that would be on the CPU on a CUDA machine: born without
  an explicit device (``torch.randn(3)``, ``nn.Linear(4, 5)``), with
  ``device="cpu"``, ``.cpu()``, a device taken from such a tensor
  (``device=x.device``), or computed only from such tensors. The ``device``
  fixture's own ``torch.device`` object, and ``x.device`` of an unmarked
  tensor, count as the fixture's device: ``.to(device)`` unmarks.
* every Triton launch (``JITFunction.run`` / ``InterpretedFunction.run``, which
  all ``kernel[grid](...)`` calls and autotuners reach) looks at its tensor
  arguments. A marked tensor fails the test when the Triton backend is forced
  (the ``backend`` fixture's triton leg, ``qt.force_backend("triton")``), and
  so does a launch that mixes marked and unmarked tensors. Under the default
  rule a launch of marked tensors only is allowed: on a CUDA machine those CPU
  tensors would run the torch reference, which is no error.

Marks are cleared after each test, so a tensor a cache kept from one test does
not trouble the next. ``QLORA_TRITON_DEVICE_AUDIT=0`` turns the audit off.
"""

from __future__ import annotations

import contextlib
import os
import sys
import weakref
from typing import Iterator

import torch
from torch.overrides import TorchFunctionMode

ENABLED: bool = os.environ.get("QLORA_TRITON_DEVICE_AUDIT", "1") not in ("", "0")

_MARK = "_qlora_triton_audit_host"  # attribute: where a would-be-CPU tensor was born
_DEVICE_GET = torch._C.TensorBase.__dict__["device"]
_DATA = torch._C.TensorBase.__dict__["data"]
_MOVES = {torch.Tensor.to, torch.Tensor.cpu, torch.Tensor.cuda}
_PARSE_TO = torch._C._nn._parse_to
_TESTS = os.path.dirname(os.path.abspath(__file__))
_SKIP_FILES = (os.path.dirname(torch.__file__), os.path.abspath(__file__),
               os.path.dirname(contextlib.__file__))


class DeviceAuditError(AssertionError):
    """A Triton launch got a tensor that would be on another device on a GPU machine."""


def _birth_frame():
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_SKIP_FILES):
        frame = frame.f_back
    return frame


def _birth_site() -> str:
    frame = _birth_frame()
    if frame is None:
        return "?"
    name = frame.f_code.co_filename
    for root in sys.path:
        if root and name.startswith(root + os.sep):
            name = name[len(root) + 1:]
            break
    return f"{name}:{frame.f_lineno}"


FIXTURE = ""  # the mark of a tensor on the fixture's side; a non-empty mark is a birth site


def _mark(t: torch.Tensor) -> str | None:
    """None: not seen in this test (a cached constant follows whoever uses it);
    FIXTURE: on the fixture's device; otherwise where it was born on the CPU."""
    return t.__dict__.get(_MARK)


def _is_host(mark: str | None) -> bool:
    return bool(mark)


def _tensors(args, kwargs) -> list[torch.Tensor]:
    found = []
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(v for v in value if isinstance(v, torch.Tensor))
    return found


class _Tracker(TorchFunctionMode):
    """Marks each tensor a test makes: on the fixture's side, or born on the CPU."""

    def __init__(self, audit: "_Audit"):
        super().__init__()
        self.audit = audit

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.compiler.is_compiling():  # Dynamo traces this handler: stay out of its graph
            return func(*args, **kwargs)
        target = _move_target(func, args, kwargs) if func in _MOVES else None
        out = func(*args, **kwargs)
        owner = getattr(func, "__self__", None)
        if owner is _DEVICE_GET:  # x.device: remember which side it names
            self.audit.remember_device(out, _mark(args[0]))
            return out
        if func is _PARSE_TO:  # Module.to(...): the device it parsed names the same side
            target = _move_target(func, (None, *args), kwargs)
            if isinstance(out[0], torch.device) and target is not _KEEP:
                mark = _mark(target) if isinstance(target, torch.Tensor) else self.audit.device_mark(target)
                self.audit.remember_device(out[0], mark)
            return out
        if owner is _DATA and getattr(func, "__name__", "") == "__set__":  # p.data = v
            self.audit.set_mark(args[0], _mark(args[1]))
            return out
        if isinstance(out, torch.Tensor):
            outs = (out,)
        elif isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
            outs = tuple(o for o in out if isinstance(o, torch.Tensor))
        else:
            return out
        if func in _MOVES:
            return self.audit.moved(out, args[0], target)
        inputs = _tensors(args, kwargs)
        mark = self.audit.mark_of(kwargs, inputs)
        for o in outs:
            if not any(o is t for t in inputs):  # in place ops keep their tensor's mark
                self.audit.set_mark(o, mark)
        return out


class _Audit:
    def __init__(self):
        self.fixture_devices: list[torch.device] = []
        self.devices: dict[int, tuple[torch.device, str | None]] = {}
        self.marked: list[weakref.ref] = []
        self.violations: list[str] = []
        self.tracker: _Tracker | None = None

    # -- marks -------------------------------------------------------------
    def set_mark(self, t: torch.Tensor, mark: str | None) -> None:
        if mark is None:
            t.__dict__.pop(_MARK, None)
            return
        if _MARK not in t.__dict__:
            self.marked.append(weakref.ref(t))
        t.__dict__[_MARK] = mark

    def remember_device(self, device: torch.device, mark: str | None) -> None:
        self.devices[id(device)] = (device, mark)  # keeps it alive: ids stay unique

    def device_mark(self, device) -> str | None:
        """The mark of a tensor made with ``device=device``."""
        if isinstance(device, torch.device):
            known = self.devices.get(id(device))
            if known is not None and known[0] is device:
                return known[1]
            if any(device is d for d in self.fixture_devices) or device.type != "cpu":
                return FIXTURE
            # A torch.device("cpu") of the test's own: the CPU on any machine. One
            # the package or a benchmark made may well be "cuda if available":
            # unknown, like a cached tensor.
            frame = _birth_frame()
            if frame is None or not frame.f_code.co_filename.startswith(_TESTS):
                return None
            return _birth_site() + " (an explicit CPU device)"
        if isinstance(device, str):
            return _birth_site() + f" (device={device!r})" if device.startswith("cpu") else FIXTURE
        return FIXTURE  # a CUDA index

    def mark_of(self, kwargs, inputs) -> str | None:
        """The mark of a new tensor made from ``inputs``."""
        if kwargs.get("device") is not None:
            return self.device_mark(kwargs["device"])
        if not inputs:  # a factory on the default device
            return _birth_site() if torch.get_default_device().type == "cpu" else FIXTURE
        marks = [_mark(t) for t in inputs]
        if FIXTURE in marks:  # a CUDA tensor wins over CPU scalars
            return FIXTURE
        return next((m for m in marks if m), None)

    def moved(self, out: torch.Tensor, source: torch.Tensor, target) -> torch.Tensor:
        """``.to(...)``, ``.cpu()``, ``.cuda()``: the mark follows the target device."""
        if target is _KEEP:
            mark = _mark(source)
        elif target is _HOST:
            mark = _birth_site() + " (.cpu())"
        elif isinstance(target, torch.Tensor):
            mark = _mark(target)
        else:
            mark = self.device_mark(target)
        if out is source and mark != _mark(source) and not out.requires_grad:
            # Same device here, another one on the GPU: an alias carries the
            # new mark and the source keeps its own.
            out = out.view_as(out)  # the mode is off inside its own handler
        self.set_mark(out, mark)
        return out

    # -- launches ------------------------------------------------------------
    def check_launch(self, kernel, args, kwargs) -> None:
        tensors = [t for t in _tensors(args, kwargs) if not t.is_meta]
        marks = [_mark(t) for t in tensors]
        host = [(t, m) for t, m in zip(tensors, marks) if _is_host(m)]
        if not host:
            return
        from qlora_triton.backend import forced_backend

        forced = forced_backend() == "triton"
        if not forced and FIXTURE not in marks:
            return
        name = getattr(getattr(kernel, "fn", kernel), "__name__", repr(kernel))
        t, site = host[0]
        why = ("the Triton backend is forced" if forced
               else "the launch mixes it with tensors on the fixture's device")
        message = (
            f"device audit: Triton kernel {name} got a {tuple(t.shape)} {t.dtype} tensor "
            f"born on the CPU at {site}, and {why}. On a CUDA machine it would be a CPU tensor "
            f"while the `device` fixture is cuda: create it with device=device or move it "
            f"with .to(device) ({len(host)} of {len(tensors)} tensor arguments)."
        )
        self.violations.append(message)
        raise DeviceAuditError(message)

    def clear(self) -> None:
        for ref in self.marked:
            t = ref()
            if t is not None:
                t.__dict__.pop(_MARK, None)
        self.marked.clear()
        self.devices.clear()


_KEEP, _HOST = object(), object()


def _move_target(func, args, kwargs):
    """What a move names: _KEEP (dtype only), _HOST (.cpu()), a tensor, or a device."""
    if func is torch.Tensor.cpu:
        return _HOST
    if func is torch.Tensor.cuda:
        return "cuda"
    if kwargs.get("device") is not None:
        return kwargs["device"]
    for a in args[1:]:
        if isinstance(a, (torch.device, str, int)) and not isinstance(a, bool):
            return a
        if isinstance(a, torch.Tensor):
            return a
    return _KEEP


_AUDIT = _Audit()


def register_fixture_device(device: torch.device) -> torch.device:
    """The ``device`` fixture's object: tensors made on it are on the fixture's side."""
    _AUDIT.fixture_devices.append(device)
    return device


_installed = False


def _install_launch_hook() -> None:
    global _installed
    if _installed:
        return
    _installed = True
    classes = []
    from triton.runtime.jit import JITFunction

    classes.append(JITFunction)
    try:
        from triton.runtime.interpreter import InterpretedFunction

        classes.append(InterpretedFunction)
    except ImportError:  # pragma: no cover - older Triton
        pass
    # Parameter(data) makes a new tensor object outside torch function modes:
    # it carries its data's mark.
    new_parameter = torch.nn.Parameter.__new__

    def parameter(cls, data=None, requires_grad=True):
        param = new_parameter(cls, data, requires_grad)
        if _AUDIT.tracker is not None and isinstance(data, torch.Tensor):
            _AUDIT.set_mark(param, _mark(data))
        return param

    torch.nn.Parameter.__new__ = staticmethod(parameter)
    for cls in classes:
        original = cls.run

        def run(self, *args, _original=original, **kwargs):
            if _AUDIT.tracker is not None:
                _AUDIT.check_launch(self, args, kwargs)
            return _original(self, *args, **kwargs)

        cls.run = run


_forcing_modules: dict[str, bool] = {}


def watches(item) -> bool:
    """Whether a test can hand a kernel a wrong-device tensor: it takes the
    ``backend`` or ``device`` fixture, or its module forces a backend itself.
    Other tests run unwatched (the audit costs about 5% of a torch-heavy test)."""
    names = getattr(item, "fixturenames", ())
    if "backend" in names or "device" in names:
        return True
    path = str(getattr(item, "path", ""))
    if path not in _forcing_modules:
        try:
            with open(path, encoding="utf-8") as f:
                _forcing_modules[path] = "force_backend" in f.read()
        except OSError:
            _forcing_modules[path] = True
    return _forcing_modules[path]


@contextlib.contextmanager
def tracking(watch: bool = True) -> Iterator[list[str]]:
    """Audit the block (one test); yields the list its violations go to."""
    if not watch or not ENABLED or torch.cuda.is_available():
        yield []
        return
    _install_launch_hook()
    _AUDIT.violations = []
    _AUDIT.tracker = _Tracker(_AUDIT)
    try:
        with _AUDIT.tracker:
            yield _AUDIT.violations
    finally:
        _AUDIT.tracker = None
        _AUDIT.clear()
