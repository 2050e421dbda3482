"""Reproducers on disk (``--qref-artifacts``) and on the reports: tensors never travel to the
xdist controller, only their shapes."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest


def portable(key: str, value):
    if key != "qref_reproducer" or not isinstance(value, dict):
        return (key, value)
    tensors = value.get("tensors") or {}
    return (
        key,
        {
            "script": value.get("script"),
            "tensors": {name: describe(t) for name, t in tensors.items()},
        },
    )


def describe(t) -> dict | str:
    shape, dtype = getattr(t, "shape", None), getattr(t, "dtype", None)
    if shape is None:
        return type(t).__name__
    return {"shape": list(shape), "dtype": str(dtype)}


def safe_name(nodeid: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid).strip("_.")
    if len(name) > 120:  # keep paths short; the hash keeps truncated names apart
        name = name[:110] + "_" + hashlib.sha1(nodeid.encode()).hexdigest()[:8]
    return name or "test"


def write_artifact(root: Path, item: pytest.Item) -> Path | None:
    found = [v for k, v in item.user_properties if k == "qref_reproducer" and isinstance(v, dict)]
    if not found:
        return None
    reproducer = found[-1]  # the last recorded: Hypothesis replays the shrunk example last
    import torch

    directory = root / safe_name(item.nodeid)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "repro.py").write_text(reproducer.get("script") or "", encoding="utf-8")
    torch.save(dict(reproducer.get("tensors") or {}), directory / "inputs.pt")
    return directory
