"""Which config fields a stage read: the work key of a stage, derived from the code instead of listed by hand.

A stage's result depends on the settings its code reads. Rather than each stage listing those settings (and
missing some), `ConfigReads` records them while the stage runs: every field read on the stage's typed `Config`
tree, by any code — the stage, or library code handed a whole section — is recorded as a dotted path with the value
it had when first read (`"train.optim.lr": 0.003`). A field holding a nested dataclass is navigation, not a read;
its own fields are recorded as they are read. Whatever reads every field at once counts every field as read:
`dataclasses.asdict`/`replace`, `==`, `repr`, `copy.deepcopy` and `pickle` (through `__dict__` / `__getstate__`).
A write records the value the field had before it.

The recorded set is stored with the stage's records (`in_progress.json` as it grows, `manifest.json` at the end)
and, on the next launch, re-evaluated against the new config: the same values at the same paths mean the same work
— the code takes the same branches, so it reads the same fields — and any difference re-runs (or does not resume)
the stage. Settings that cannot change a result are excluded by one explicit list (`NOT_WORK` in
`pipeline.stage`: the run's name and root, W&B, the stage list), so a recorded read of them is never part of a key.

How: while a stage runs, the dataclass types of its config tree get a `__getattribute__` / `__setattr__` /
`__getstate__` that report reads of the registered instances (looked up by identity) and change nothing else; the
types are restored when the last recording stops. Reads in worker processes started by `fork` without pickling the
config are not seen (the stage's own process has read what it hands them in every case here).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import PurePath
from typing import Any

_MISSING = "<missing>"

# id(instance) -> (instance, path prefix, recordings); the instance is held so that its id is never reused
_REGISTERED: dict[int, tuple[Any, str, list[ConfigReads]]] = {}
_PATCHED: dict[type, tuple[dict[str, Any], int]] = {}  # type -> (its own dunder attributes before patching, users)
_HOOKS = ("__getattribute__", "__setattr__", "__getstate__")


def plain(value: Any) -> Any:
    """A JSON value for a config value (dataclasses as dicts, paths as strings), read without recording."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(object.__getattribute__(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, PurePath):
        return str(value)
    return json.loads(json.dumps(value, default=str))


def lookup(root: Any, path: str) -> Any:
    """The plain value at a dotted path of a config tree (`_MISSING` when the path no longer exists)."""
    value = root
    for name in path.split("."):
        try:
            value = object.__getattribute__(value, name)
        except AttributeError:
            return _MISSING
    return plain(value)


def _report(obj: Any, name: str, value: Any) -> None:
    entry = _REGISTERED.get(id(obj))
    if entry is None or entry[0] is not obj:
        return
    _, prefix, recordings = entry
    if name == "__dict__":  # everything at once: vars(), copy, pickle
        for f in dataclasses.fields(obj):
            _report(obj, f.name, object.__getattribute__(obj, f.name))
        return
    if id(value) in _REGISTERED:  # a nested section: its own fields are recorded as they are read
        return
    for rec in recordings:
        rec.record(f"{prefix}{name}", value)


def _patch(cls: type) -> None:
    if cls in _PATCHED:
        own, users = _PATCHED[cls]
        _PATCHED[cls] = (own, users + 1)
        return
    own = {h: cls.__dict__[h] for h in _HOOKS if h in cls.__dict__}
    base_get, base_set, base_state = cls.__getattribute__, cls.__setattr__, cls.__getstate__
    names = frozenset(f.name for f in dataclasses.fields(cls)) | {"__dict__"}

    def __getattribute__(self, name):
        value = base_get(self, name)
        if name in names:
            _report(self, name, value)
        return value

    def __setattr__(self, name, value):
        if name in names and hasattr(self, name):
            _report(self, name, base_get(self, name))
        base_set(self, name, value)

    def __getstate__(self):
        _report(self, "__dict__", None)
        return base_state(self)

    cls.__getattribute__, cls.__setattr__, cls.__getstate__ = __getattribute__, __setattr__, __getstate__
    _PATCHED[cls] = (own, 1)


def _unpatch(cls: type) -> None:
    own, users = _PATCHED[cls]
    if users > 1:
        _PATCHED[cls] = (own, users - 1)
        return
    del _PATCHED[cls]
    for hook in _HOOKS:
        if hook in own:
            setattr(cls, hook, own[hook])
        else:
            delattr(cls, hook)


def _sections(obj: Any, prefix: str = "") -> list[tuple[Any, str]]:
    """Every dataclass instance of a config tree with its path prefix (`""` for the root, `"train."`, ...)."""
    out = [(obj, prefix)]
    for f in dataclasses.fields(obj):
        value = object.__getattribute__(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out += _sections(value, f"{prefix}{f.name}.")
    return out


class ConfigReads:
    """The fields read on one config tree between `start()` and `stop()`: {dotted path: plain value}."""

    def __init__(self, root: Any, on_new: Callable[[str], None] | None = None) -> None:
        assert dataclasses.is_dataclass(root), f"a config dataclass is needed, got {type(root).__name__}"
        self.root = root
        self.reads: dict[str, Any] = {}
        self.on_new = on_new
        self._sections: list[tuple[Any, str]] = []
        self._busy = False

    def record(self, path: str, value: Any) -> None:
        if path in self.reads or self._busy:
            return
        self._busy = True  # the callback may touch the config itself
        try:
            self.reads[path] = plain(value)
            if self.on_new is not None:
                self.on_new(path)
        finally:
            self._busy = False

    def start(self) -> ConfigReads:
        assert not self._sections, "already recording"
        self._sections = _sections(self.root)
        for obj, prefix in self._sections:
            _REGISTERED.setdefault(id(obj), (obj, prefix, []))[2].append(self)
            _patch(type(obj))
        return self

    def stop(self) -> None:
        for obj, _ in self._sections:
            _, _, recordings = _REGISTERED[id(obj)]
            recordings.remove(self)
            if not recordings:
                del _REGISTERED[id(obj)]
            _unpatch(type(obj))
        self._sections = []

    @property
    def recording(self) -> bool:
        return bool(self._sections)
