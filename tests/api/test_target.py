"""The hardware fingerprint: detected fields, stable keys, dict round trip, nearest()."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import platform
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

import attncc
from attncc.errors import BackendError, InputError
from attncc.target import CPU_FLAGS, Target, _cpuinfo, default_target

H200 = Target(kind="cuda", device="NVIDIA H200", arch="cuda", compute_capability=(9, 0),
              shared_memory_per_block=232448, sm_count=132, registers_per_block=65536,
              versions=(("attncc", "0.1.0"), ("torch", "2.13.0"), ("triton", "3.5.0")))


def test_cpu_fingerprint_fields_are_read_from_this_machine():
    target = Target.detect("cpu")
    assert target.kind == "cpu"
    assert target.device and target.device == " ".join(target.device.split())
    assert target.cores == os.cpu_count()
    assert target.arch == platform.machine()
    assert list(target.isa) == sorted(target.isa)
    assert set(target.isa) <= set(CPU_FLAGS)
    assert target.compute_capability is None and target.sm_count is None
    versions = dict(target.versions)
    assert versions["python"] == platform.python_version()
    assert versions["numpy"] == np.__version__
    assert versions["attncc"] == attncc.__version__
    for optional in ("torch", "triton"):
        assert (optional in versions) == (importlib.util.find_spec(optional) is not None)
        if optional in versions:
            assert versions[optional] == metadata.version(optional)


def test_isa_flags_match_proc_cpuinfo():
    model, flags = _cpuinfo()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags on this machine")
    target = Target.detect("cpu")
    assert set(target.isa) == {f for f in CPU_FLAGS if f in flags}
    if model:
        assert target.device == model


def test_cpuinfo_of_an_arm_machine_without_model_name(tmp_path: Path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd sve bf16 i8mm\n"
                    "CPU implementer\t: 0x41\nCPU part\t: 0xd40\n\nprocessor\t: 1\n"
                    "Features\t: fp\n")
    model, flags = _cpuinfo(info)
    assert model == "arm implementer 0x41 part 0xd40"
    assert {"asimd", "neon", "sve", "bf16", "i8mm"} <= flags
    assert _cpuinfo(tmp_path / "missing") == ("", set())


def test_keys_are_layered_and_stable():
    first, second = Target.detect("cpu"), Target.detect("cpu")
    assert first == second
    assert [first.key(n) for n in (1, 2, 3)] == [second.key(n) for n in (1, 2, 3)]
    assert first.key() == first.key(3)
    assert first.key(3).startswith(first.key(2) + "/")
    assert first.key(2).startswith(first.key(1) + "/")
    assert first.key(1) == f"cpu:{first.device} x{first.cores}"
    assert first.key(3).count("/") == 2
    with pytest.raises(ValueError, match="expected 1, 2 or 3"):
        first.key(4)


def test_cuda_key_and_separators_in_names():
    assert H200.key(1) == "cuda:NVIDIA H200"
    assert H200.key(2) == "cuda:NVIDIA H200/sm_90+smem232448+sms132+regs65536"
    assert H200.key(3).endswith("/attncc-0.1.0,torch-2.13.0,triton-3.5.0")
    odd = dataclasses.replace(H200, device="Odd/GPU+x")
    assert odd.key(1) == "cuda:Odd-GPU-x"
    assert odd.key(3).count("/") == 2


def test_dict_round_trip_through_json():
    for target in (Target.detect("cpu"), H200):
        data = json.loads(json.dumps(target.to_dict()))
        assert Target.from_dict(data) == target
        assert Target.from_dict(data).key() == target.key()


@pytest.mark.parametrize("data, field", [
    ({"kind": "tpu", "device": "x"}, "kind"),
    ({"kind": "cpu"}, "device"),
    ({"kind": "cpu", "device": "x", "color": "red"}, "color"),
    ({"kind": "cpu", "device": "x", "versions": ["torch"]}, "versions"),
    ({"kind": "cpu", "device": "x", "cores": "many"}, "malformed"),
])
def test_from_dict_rejects_malformed_records(data, field):
    with pytest.raises(InputError, match=field):
        Target.from_dict(data)


def test_describe_names_every_layer():
    text = Target.detect("cpu").describe()
    assert Target.detect("cpu").device in text
    for label in ("device:", "architecture:", "ISA flags:", "versions:", "key:"):
        assert label in text
    cuda_text = H200.describe()
    assert "compute cap.:  9.0" in cuda_text and "232448 bytes per block" in cuda_text
    assert len(cuda_text.splitlines()) >= 6


def test_nearest_exact_then_deepest_shared_layer():
    here = H200
    new_torch = dataclasses.replace(here, versions=(("attncc", "0.1.0"), ("torch", "2.14.0"),
                                                    ("triton", "3.5.0")))
    other_arch = dataclasses.replace(here, shared_memory_per_block=101376, versions=())
    other_device = dataclasses.replace(here, device="NVIDIA A100")

    match, depth, message = here.nearest([other_device, other_arch, new_torch, here])
    assert (match, depth) == (here, 3) and "exact" in message

    match, depth, message = here.nearest([other_device, other_arch, new_torch])
    assert (match, depth) == (new_torch, 2)
    assert "torch 2.14.0 vs 2.13.0 here" in message and "triton" not in message

    match, depth, message = here.nearest([other_device, other_arch])
    assert (match, depth) == (other_arch, 1)
    assert "smem101376" in message and "smem232448" in message

    match, depth, message = here.nearest([other_device])
    assert (match, depth) == (None, 0)
    assert "no record for this device" in message
    assert here.nearest([])[:2] == (None, 0)


def test_default_target_is_cached_and_is_the_cpu():
    assert default_target() is default_target()
    assert default_target() == Target.detect("cpu")


def test_unknown_or_missing_devices_are_user_errors():
    with pytest.raises(BackendError, match="expected 'cpu', 'cuda' or 'cuda:N'"):
        Target.detect("tpu")
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        cuda = Target.detect("cuda")
        assert cuda.kind == "cuda" and cuda.compute_capability is not None
        assert cuda.device == torch.cuda.get_device_name(0)
        assert cuda.sm_count == torch.cuda.get_device_properties(0).multi_processor_count
    else:
        with pytest.raises(BackendError, match="no CUDA device"):
            Target.detect("cuda")


def test_cuda_fields_map_from_torch_device_properties(monkeypatch):
    """The CUDA layer from (mocked) torch device properties (the opt-in shared memory and the
    register file, as Triton's driver reports them), and from an older torch without them."""
    from types import SimpleNamespace


    torch = pytest.importorskip("torch")
    old = SimpleNamespace(name="NVIDIA H200", major=9, minor=0, multi_processor_count=132,
                          shared_memory_per_block=49152)
    props = SimpleNamespace(**vars(old), shared_memory_per_block_optin=232448,
                            regs_per_multiprocessor=65536)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    found = Target.detect("cuda:0")
    assert found.key(2) == "cuda:NVIDIA H200/sm_90+smem232448+sms132+regs65536"
    assert found.cores is None and found.isa == ()
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: old)
    older_torch = Target.detect("cuda")
    assert older_torch.shared_memory_per_block == 49152
    assert older_torch.registers_per_block is None
    with pytest.raises(BackendError, match="only 1 CUDA device"):
        Target.detect("cuda:1")
