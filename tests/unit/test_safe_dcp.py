"""amft_lib.checkpoint.safe_dcp: DCP checkpoints load through an allowlisting metadata unpickler and a weights-only
check of non-tensor items, so a crafted `.metadata` or optimizer item cannot run code on resume. Real
`torch.distributed.checkpoint` files (one process, no process group), real crafted pickles."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from amft_lib.checkpoint import CorruptCheckpointError
from amft_lib.checkpoint.safe_dcp import SafeLoadPlanner, SafeReader


def trained(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.9))
    model(torch.randn(3, 4)).square().sum().backward()
    opt.step()
    return model, opt


def saved(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    model, opt = trained(0)
    ms, os_ = get_state_dict(model, opt)
    dcp.save({"model": ms, "optim": os_}, storage_writer=dcp.FileSystemWriter(tmp_path / "dcp"))
    return tmp_path / "dcp", model


def load(path: Path) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model, opt = trained(1)  # other weights and moments, to be overwritten
    ms, os_ = get_state_dict(model, opt)
    state = {"model": ms, "optim": os_}
    dcp.load(state, storage_reader=SafeReader(path), planner=SafeLoadPlanner())
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return model, opt


def test_a_real_checkpoint_round_trips(tmp_path):
    path, original = saved(tmp_path)
    model, opt = load(path)
    for a, b in zip(original.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert opt.param_groups[0]["betas"] == (0.8, 0.9)  # a non-tensor item, through the weights-only check
    assert all(float(s["step"]) == 1.0 for s in opt.state.values())


class Payload:
    """What an attacker would pickle: unpickling calls os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_crafted_metadata_is_refused_before_anything_runs(tmp_path):
    path, _ = saved(tmp_path)
    marker = tmp_path / "pwned"
    (path / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(CorruptCheckpointError, match=r"\.metadata: refused: posix\.system is not part of a DCP"):
        SafeReader(path).read_metadata()  # what checkpoint.sharded.load checks first (a one-line error)
    with pytest.raises(CheckpointException, match=r"posix\.system is not part of a DCP"):
        load(path)  # and inside dcp.load, which wraps the reader's error in its own (a BaseException)
    assert not marker.exists()
    # a dotted name through an allowed class (protocol 4 getattr chains) is refused too
    module, name = b"pathlib", b"PosixPath.home"  # PROTO 4, SHORT_BINUNICODE ×2, STACK_GLOBAL, (), REDUCE, STOP
    (path / ".metadata").write_bytes(b"\x80\x04\x8c" + bytes([len(module)]) + module + b"\x8c" + bytes([len(name)])
                                     + name + b"\x93)R.")
    with pytest.raises(CorruptCheckpointError, match=r"pathlib\.PosixPath\.home is not part"):
        SafeReader(path).read_metadata()


def test_a_crafted_non_tensor_item_is_refused(tmp_path):
    """The stock planner would torch.load this with weights_only=False (running os.system)."""
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save(Payload(marker), buffer)
    buffer.seek(0)
    item = type("Item", (), {"dest_index": type("Index", (), {"fqn": "optim.param_groups.0.lr"})()})()
    with pytest.raises(CorruptCheckpointError, match=r"optim\.param_groups\.0\.lr refused by torch\.load"):
        SafeLoadPlanner().load_bytes(item, buffer)
    assert not marker.exists()


def test_the_library_loads_dcp_only_through_the_safe_reader_and_planner():
    """A later `dcp.load(...)` with DCP's defaults would bring the free unpickling back."""
    root = Path(__file__).resolve().parents[2] / "amft_lib"
    calls = [(path.name, line) for path in root.rglob("*.py") for line in path.read_text().splitlines()
             if "dcp.load(" in line or "FileSystemReader(" in line]
    assert calls, "no DCP load found: the check would pass vacuously"
    for name, line in calls:
        if "class SafeReader(dcp.FileSystemReader)" in line:
            continue
        assert "SafeReader(" in line and "planner=SafeLoadPlanner()" in line, f"{name}: {line.strip()}"
