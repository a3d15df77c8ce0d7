"""[6] The hardware fingerprint: what a tuned config is valid for, in three layers.

1. **device**: the device model: the CPU model name and its logical core count, or the CUDA
   device name (``NVIDIA H200``).
2. **architecture**: CPU machine architecture and the ISA flags kernels care about (avx2,
   avx512f, amx, neon, sve...); CUDA compute capability, shared memory per block, SM count and
   register file.
3. **versions**: python, numpy, torch, triton and attncc (only those installed).

``Target.key(layers)`` is a stable string of the first ``layers`` layers; a tuning record stored
under one target is found for another by ``nearest``: exactly, else at the deepest shared layer,
and the message says which layers differ. Every value is read from the machine; a value that
cannot be read is ``None`` (or omitted), never guessed.
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import asdict, dataclass, fields
from functools import cache
from importlib import metadata
from pathlib import Path

from attncc.errors import BackendError, InputError

KINDS = ("cpu", "cuda")

#: CPU flags (as /proc/cpuinfo names them) that change which kernels are fast.
CPU_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
             "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8",
             "asimd", "asimdhp", "neon", "fphp", "sve", "sve2", "bf16", "i8mm")
PACKAGES = ("numpy", "torch", "triton", "attncc")


@dataclass(frozen=True)
class Target:
    """A hardware fingerprint (see the module docstring for the three layers).

    ``kind`` is ``cpu`` or ``cuda``. ``cores`` is the CPU's logical core count (None for CUDA).
    ``isa`` holds CPU ISA flags, sorted; the CUDA fields are None on a CPU target.
    ``shared_memory_per_block`` is the most shared memory one block can opt in to, in bytes, and
    ``registers_per_block`` the register file one block may use (both from torch's CUDA device
    properties; a torch too old to report the opt-in limit or the register file gives the
    default per-block shared memory and no register count). ``versions`` is a
    sorted tuple of ``(package, version)`` pairs.
    """

    kind: str
    device: str
    cores: int | None = None
    arch: str = ""
    isa: tuple[str, ...] = ()
    compute_capability: tuple[int, int] | None = None
    shared_memory_per_block: int | None = None
    sm_count: int | None = None
    registers_per_block: int | None = None
    versions: tuple[tuple[str, str], ...] = ()

    @staticmethod
    def detect(device: str = "cpu") -> Target:
        """The fingerprint of this machine's ``cpu``, or of CUDA device ``cuda`` / ``cuda:N``.

        Raises BackendError when a CUDA device is asked for and torch cannot see one.
        """
        if device == "cpu":
            return _detect_cpu()
        match = re.fullmatch(r"cuda(?::(\d+))?", device)
        if match is None:
            raise BackendError(f"target: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}")
        return _detect_cuda(int(match.group(1) or 0))

    @property
    def torch_device(self) -> str | None:
        """Where torch tensors for this target live: ``"cuda"``, or None (torch's default CPU)."""
        return "cuda" if self.kind == "cuda" else None

    @property
    def sync(self):
        """``torch.cuda.synchronize`` on a CUDA target (a clock read waits for the device), else
        None."""
        if self.kind != "cuda":
            return None
        import torch

        return torch.cuda.synchronize

    def key(self, layers: int = 3) -> str:
        """The first ``layers`` layers as one stable string, layers joined by ``/``.

        e.g. ``cpu:AMD EPYC x2/x86_64+avx2+avx512f/attncc-0.1.0,numpy-2.1.0,python-3.11.9``.
        """
        if layers not in (1, 2, 3):
            raise ValueError(f"layers: expected 1, 2 or 3, got {layers!r}")
        return "/".join(self._layer_keys()[:layers])

    def _layer_keys(self) -> list[str]:
        device = f"{self.kind}:{_clean(self.device)}"
        if self.cores is not None:
            device += f" x{self.cores}"
        if self.kind == "cuda":
            parts = [f"sm_{self.compute_capability[0]}{self.compute_capability[1]}"
                     if self.compute_capability else "sm_unknown"]
            for label, value in (("smem", self.shared_memory_per_block),
                                 ("sms", self.sm_count), ("regs", self.registers_per_block)):
                if value is not None:
                    parts.append(f"{label}{value}")
        else:
            parts = [_clean(self.arch) or "unknown", *self.isa]
        versions = ",".join(f"{name}-{version}" for name, version in self.versions)
        return [device, "+".join(parts), versions]

    def to_dict(self) -> dict:
        """A JSON-able dict; ``Target.from_dict`` inverts it."""
        data = asdict(self)
        data["isa"] = list(self.isa)
        data["compute_capability"] = (list(self.compute_capability)
                                      if self.compute_capability else None)
        data["versions"] = dict(self.versions)
        return data

    @staticmethod
    def from_dict(data: dict) -> Target:
        """The Target that ``to_dict`` wrote; InputError naming the field when malformed."""
        if not isinstance(data, dict):
            raise InputError(f"target: expected a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(Target)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"target: unknown field '{unknown[0]}'; expected {sorted(known)}")
        for name in ("kind", "device"):
            if not isinstance(data.get(name), str):
                raise InputError(f"target.{name}: expected text, got {data.get(name)!r}")
        if data["kind"] not in KINDS:
            raise InputError(f"target.kind: expected one of {KINDS}, got {data['kind']!r}")
        cc = data.get("compute_capability")
        versions = data.get("versions") or {}
        if not isinstance(versions, dict):
            raise InputError(f"target.versions: expected a mapping, got {versions!r}")
        counts = ("cores", "shared_memory_per_block", "sm_count", "registers_per_block")
        try:
            return Target(
                kind=data["kind"], device=data["device"],
                **{name: _opt_int(data.get(name)) for name in counts},
                arch=str(data.get("arch") or ""), isa=tuple(sorted(data.get("isa") or ())),
                compute_capability=tuple(int(x) for x in cc) if cc else None,
                versions=tuple(sorted((str(k), str(v)) for k, v in versions.items())))
        except (TypeError, ValueError) as err:
            raise InputError(f"target: malformed field: {err}") from None

    def describe(self) -> str:
        """Several human-readable lines: one per fact, grouped by layer, then the key."""
        lines = [f"device:        {self.device}" + (f" ({self.cores} logical cores)"
                                                    if self.cores is not None else ""),
                 f"kind:          {self.kind}"]
        if self.kind == "cuda":
            cc = self.compute_capability
            lines.append(f"compute cap.:  {cc[0]}.{cc[1]}" if cc else "compute cap.:  unknown")
            for label, value, unit in (("shared mem:", self.shared_memory_per_block,
                                        " bytes per block"),
                                       ("SMs:", self.sm_count, ""),
                                       ("registers:", self.registers_per_block, " per block")):
                lines.append(f"{label:<15}{'unknown' if value is None else f'{value}{unit}'}")
        else:
            lines.append(f"architecture:  {self.arch or 'unknown'}")
            lines.append(f"ISA flags:     {' '.join(self.isa) or 'none detected'}")
        lines.append("versions:      " + ", ".join(f"{n} {v}" for n, v in self.versions))
        lines.append(f"key:           {self.key()}")
        return "\n".join(lines)

    def nearest(self, candidates: list[Target]) -> tuple[Target | None, int, str]:
        """The candidate that best matches this target: ``(target, depth, message)``.

        ``depth`` is 3 for an exact match, else the deepest layer whose key is shared (2: same
        device and architecture, other versions; 1: same device model only); ``(None, 0, msg)``
        when no candidate shares even the device. Among equals the first candidate wins.
        """
        for depth in (3, 2, 1):
            mine = self.key(depth)
            for candidate in candidates:
                if candidate.key(depth) == mine:
                    return candidate, depth, _match_message(self, candidate, depth)
        return None, 0, (f"no record for this device ({self.key(1)}); "
                         f"{len(candidates)} candidate(s) from other devices")


@cache
def default_target(device: str | None = None) -> Target:
    """This machine's fingerprint, detected once per process.

    ``device=None`` is the CPU: the target ``attncc.compile`` uses unless told otherwise, and
    cheap (it does not import torch). Pass ``"cuda"`` for the GPU.
    """
    return Target.detect(device or "cpu")


def _match_message(mine: Target, other: Target, depth: int) -> str:
    if depth == 3:
        return f"exact match for {mine.key(1)}"
    if depth == 2:
        ours, theirs = dict(mine.versions), dict(other.versions)
        differ = [f"{name} {theirs.get(name, 'absent')} vs {ours.get(name, 'absent')} here"
                  for name in sorted(set(ours) | set(theirs)) if ours.get(name) != theirs.get(name)]
        return (f"no exact match; using a record from the same device and architecture with "
                f"other versions ({'; '.join(differ)})")
    return (f"no exact match; using a record from the same device model ({mine.key(1)}) with a "
            f"different architecture layer ({other.key(2).split('/')[1]} vs "
            f"{mine.key(2).split('/')[1]} here)")


def _detect_cpu() -> Target:
    model, flags = _cpuinfo()
    return Target(kind="cpu", device=model or platform.processor() or "unknown cpu",
                  cores=os.cpu_count(), arch=platform.machine(),
                  isa=tuple(sorted(f for f in CPU_FLAGS if f in flags)),
                  versions=_versions())


def _cpuinfo(path: Path = Path("/proc/cpuinfo")) -> tuple[str, set[str]]:
    """(model name, flags) of the first CPU in ``path``; ("", set()) where it cannot be read.

    ARM kernels often print no model name; the implementer and part codes stand in for it.
    """
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "", set()
    fields_: dict[str, str] = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        fields_.setdefault(name.strip().lower(), value.strip())
    model = next((fields_[k] for k in ("model name", "hardware", "cpu model") if fields_.get(k)),
                 "")
    if not model and fields_.get("cpu implementer") and fields_.get("cpu part"):
        model = f"arm implementer {fields_['cpu implementer']} part {fields_['cpu part']}"
    flags = set((fields_.get("flags") or fields_.get("features") or "").split())
    if "asimd" in flags:
        flags.add("neon")
    return model, flags


def _detect_cuda(index: int) -> Target:
    try:
        import torch
    except ImportError:
        raise BackendError("target cuda: torch is not installed, so no CUDA device can be "
                           "seen; use --target cpu") from None
    if not torch.cuda.is_available():
        raise BackendError("target cuda: torch sees no CUDA device on this machine; use "
                           "--target cpu")
    if index >= torch.cuda.device_count():
        raise BackendError(f"target cuda:{index}: only {torch.cuda.device_count()} CUDA "
                           "device(s) visible")
    props = torch.cuda.get_device_properties(index)
    # the opt-in shared memory is the CUDA attribute Triton's driver reports as max_shared_mem;
    # one block may use the whole register file of an SM on every arch since sm_50 (64K)
    smem = (getattr(props, "shared_memory_per_block_optin", None)
            or getattr(props, "shared_memory_per_block", None))
    return Target(kind="cuda", device=props.name, cores=None, arch="cuda",
                  compute_capability=(int(props.major), int(props.minor)),
                  shared_memory_per_block=_opt_int(smem),
                  sm_count=int(props.multi_processor_count),
                  registers_per_block=_opt_int(getattr(props, "regs_per_multiprocessor", None)),
                  versions=_versions())


def _versions() -> tuple[tuple[str, str], ...]:
    found = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return tuple(sorted(found.items()))


def _clean(text: str) -> str:
    """Collapse whitespace and drop the characters the key uses as separators."""
    return " ".join(text.replace("/", "-").replace("+", "-").split())


def _opt_int(value) -> int | None:
    return None if value is None else int(value)
