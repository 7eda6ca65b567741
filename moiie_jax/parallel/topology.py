"""Accelerator slices by their usual names (`v5p-64`, `v5e-16`, `8xh100`) and the one table of hardware figures.

A TPU slice becomes its devices without a TPU: libtpu's `get_topology_desc` describes any slice shape on a CPU
machine (`devices(slice)`), and a jitted function lowered with `NamedSharding`s over those devices compiles for it.
Naming follows Cloud TPU: v4 and v5p count TensorCores (two per chip, used as one "megacore" device: v5p-64 is 32
chips, a 2x4x4 cube), v5e and v6e count chips (one TensorCore each, 2-D shapes). Hosts are the distinct
`process_index` values libtpu gives the devices (4 chips per host on v4/v5p, 8 on the single-host v5e-8/v6e-8
slices, otherwise 4).

A GPU host (`8xh100`, `8xh200`) has no XLA:TPU compiler here: its step is compiled for an 8-chip TPU stand-in
(`compile_on`) with one host's batch, so its memory figure is a TPU-compiler estimate of the same program, set
against the GPU's HBM; its roofline uses the GPU's own figures.

`HARDWARE` holds every figure the reports use: assumptions from vendor spec sheets, cited per row.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from moiie_jax.models.config import ConfigError

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator chip. Bandwidths in bytes/s; `ici` is per chip and per direction (all links together)."""
  name: str
  hbm_gib: float  # HBM capacity per chip
  peak_flops: float  # dense bf16 FLOP/s per chip
  hbm_bw: float  # HBM bytes/s per chip
  ici_bw: float  # interconnect bytes/s per chip, one direction (ICI for TPUs, NVLink for GPUs)
  chips_per_host: int
  source: str
  device_kinds: tuple[str, ...] = ()  # prefixes of `jax.devices()[0].device_kind` on this chip (MFU of real runs)

  @property
  def hbm_bytes(self) -> int:
    return int(self.hbm_gib * GiB)


# Assumptions, from the vendors' spec sheets (checked 2026-12). Cloud TPU pages give ICI as "bidirectional per chip";
# the table holds half of that, the bytes a chip can send (or receive) per second over all its links at once.
HARDWARE: dict[str, Chip] = {c.name: c for c in (
    Chip('v4', 32, 275e12, 1200e9, 300e9, 4,
         'cloud.google.com/tpu/docs/v4: 275 TF bf16, 32 GiB HBM2 at 1200 GBps; ICI 6 links x 50 GB/s (TPU v4 paper)',
         ('TPU v4',)),
    Chip('v5e', 16, 197e12, 819e9, 200e9, 4,
         'cloud.google.com/tpu/docs/v5e: 197 TF bf16, 16 GB HBM2 at 819 GBps, ICI 400 GBps bidirectional',
         ('TPU v5 lite', 'TPU v5e')),
    Chip('v5p', 95, 459e12, 2765e9, 600e9, 4,
         'cloud.google.com/tpu/docs/v5p: 459 TF bf16, 95 GiB HBM2e at 2765 GBps, ICI 1200 GBps bidirectional',
         ('TPU v5p', 'TPU v5')),
    Chip('v6e', 32, 918e12, 1638e9, 400e9, 4,
         'cloud.google.com/tpu/docs/v6e: 918 TF bf16, 32 GB HBM at 1638 GBps, ICI 800 GBps bidirectional',
         ('TPU v6 lite', 'TPU v6e')),
    Chip('h100', 80, 989e12, 3350e9, 450e9, 8,
         'NVIDIA H100 SXM datasheet: 989 TF bf16 dense, 80 GB HBM3 at 3.35 TB/s, NVLink 900 GB/s (450 each way)',
         ('NVIDIA H100',)),
    Chip('h200', 141, 989e12, 4800e9, 450e9, 8,
         'NVIDIA H200 SXM datasheet: 989 TF bf16 dense, 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s (450 each way)',
         ('NVIDIA H200',)),
    Chip('a100', 80, 312e12, 2039e9, 300e9, 8,
         'NVIDIA A100 SXM 80GB datasheet: 312 TF bf16 dense, 2039 GB/s, NVLink 600 GB/s (300 each way)',
         ('NVIDIA A100',)),
)}


def chip_of_device_kind(device_kind: str) -> Chip | None:
  """The HARDWARE row of a `jax.devices()[0].device_kind` ('TPU v5p', 'NVIDIA H100 80GB HBM3', ...), or None."""
  matches = [(len(prefix), chip) for chip in HARDWARE.values() for prefix in chip.device_kinds
             if device_kind.startswith(prefix)]
  return max(matches, key=lambda m: m[0])[1] if matches else None

# TPU slice shapes libtpu 0.0.42 accepts (Cloud TPU's names -> `get_topology_desc` topology strings).
_CUBES = {8: '2x2x1', 16: '2x2x2', 32: '2x2x4', 64: '2x4x4', 128: '4x4x4', 256: '4x4x8', 512: '4x8x8'}
_PLANES = {1: '1x1', 4: '2x2', 8: '2x4', 16: '4x4', 32: '4x8', 64: '8x8', 128: '8x16', 256: '16x16'}
# libtpu's default host is 2x2 chips; single-host slices of the 2-D chips put up to 8 chips on one host.
_SINGLE_HOST = {1: (1, 1, 1), 4: (2, 2, 1), 8: (2, 4, 1)}
_GPU_STAND_IN = 'v5p-16'  # 8 chips, the largest HBM of the TPUs: the GPU hosts' compile target


@dataclasses.dataclass(frozen=True)
class Slice:
  """A named slice: its chip, chip count and how to get its devices."""
  name: str
  chip: Chip
  chips: int
  topology: str | None  # `get_topology_desc` name; None for a GPU host
  chips_per_host_bounds: tuple[int, int, int] | None = None
  compile_on: str | None = None  # GPU hosts: the TPU slice whose compiler stands in

  @property
  def is_gpu(self) -> bool:
    return self.compile_on is not None


def _slices() -> dict[str, Slice]:
  out = {}
  for chip in ('v4', 'v5p'):
    for cores, shape in _CUBES.items():
      out[f'{chip}-{cores}'] = Slice(f'{chip}-{cores}', HARDWARE[chip], cores // 2, f'{chip}:{shape}')
  for chip in ('v5e', 'v6e'):
    for chips, shape in _PLANES.items():
      out[f'{chip}-{chips}'] = Slice(f'{chip}-{chips}', HARDWARE[chip], chips, f'{chip}:{shape}',
                                     _SINGLE_HOST.get(chips))
  for gpu in ('h100', 'h200'):
    out[f'8x{gpu}'] = Slice(f'8x{gpu}', HARDWARE[gpu], 8, None, compile_on=_GPU_STAND_IN)
  return out


SLICES: dict[str, Slice] = _slices()


def get(name: str) -> Slice:
  """The slice called `name` (case-insensitive); a ConfigError listing the known names otherwise."""
  key = name.strip().lower()
  if key not in SLICES:
    raise ConfigError(f'unknown topology {name!r}; known: {", ".join(SLICES)}')
  return SLICES[key]


def _quiet_libtpu() -> None:
  # libtpu looks for a TPU VM's metadata server and worker list when it loads; none exist on a CPU machine. These
  # defaults skip the look-ups and their warnings, and let a second process load libtpu alongside a first.
  os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
  os.environ.setdefault('TPU_ACCELERATOR_TYPE', 'v5p-8')
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')


def devices(s: Slice) -> list[Any]:
  """The TPU devices of slice `s` (of its TPU stand-in for a GPU host), from libtpu; no TPU needed."""
  if s.is_gpu:
    return devices(get(s.compile_on))[:s.chips]
  _quiet_libtpu()
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  kwargs = {'chip_config_name': 'megacore'} if s.chip.name in ('v4', 'v5p') else {}
  if s.chips_per_host_bounds:
    kwargs['chips_per_host_bounds'] = s.chips_per_host_bounds
  found = list(topologies.get_topology_desc(topology_name=s.topology, platform='tpu', **kwargs).devices)
  if len(found) != s.chips:
    raise ConfigError(f'topology {s.name}: libtpu gave {len(found)} devices for {s.topology}, expected {s.chips}')
  return found


def hosts(s: Slice, devs: list[Any] | None = None) -> int:
  """Hosts feeding the batch: distinct process indices of the devices (1 for a GPU host)."""
  if s.is_gpu:
    return 1
  if devs:
    return len({d.process_index for d in devs})
  return max(1, math.ceil(s.chips / s.chip.chips_per_host))
