"""FLOPs and collective traffic of a compiled XLA program, from its HLO text, with loops counted as often as they run.

XLA's `cost_analysis()` counts a while loop's body once, so a model whose layers run under `lax.scan` looks L times
cheaper than it is. `analyze(compiled.as_text())` parses the optimised per-device HLO module and

  * counts the FLOPs of every `dot`, `convolution` and Pallas kernel (inside fusions too):
      dot:          2 * |output| * prod(lhs contracting dims)
      convolution:  2 * |output batch and features| * kernel input features * the (output, tap) pairs of each
                    spatial dimension that read a real input element (padding and lhs-dilation holes skipped,
                    as XLA counts them: TPU writes batched matmuls as dilated convolutions)
      tpu_custom_call:  the FLOPs of the `cost_estimate` the kernel declares (other custom calls: none)
  * counts the bytes each device moves per collective, with n = the size of its replica group (the number of
    devices in `replica_groups`, `[g,n]<=[...]` iota groups, or `mesh[...] {axes}` mesh-axis groups; empty = all):
      all-gather          operand * (n - 1)             (receives the n - 1 shards it lacks)
      reduce-scatter      operand * (n - 1) / n         (ring: sends/receives all but its own block)
      all-reduce          2 * operand * (n - 1) / n     (a reduce-scatter, then an all-gather)
      all-to-all          operand * (n - 1) / n         (keeps 1/n of its rows); ragged-all-to-all: its input
                          buffer, an upper bound on the ragged rows sent
      collective-permute  operand                       (sends its whole buffer once)
    Asynchronous pairs count once, at `-start` (or at the collective an `async-start` wraps); `-done` is free.
  * multiplies both by how often each computation runs: the product of the trip counts of the while loops around
    it, through the call graph (while body and condition, fusion `calls`, `call`, `to_apply`, conditional
    branches, each branch counted as if taken). A loop's trip count is `known_trip_count` in its backend_config
    when present, else the bound its condition compares the induction variable with (`i < N`, start read from the
    loop's initial tuple when it is a constant, else 0). `loop_factor` = corrected / uncorrected FLOPs.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

import numpy as np

_DTYPE_BYTES = {
    'pred': 1, 's2': 0.25, 'u2': 0.25, 's4': 0.5, 'u4': 0.5, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 's32': 4,
    'u32': 4, 's64': 8, 'u64': 8, 'f16': 2, 'bf16': 2, 'f32': 4, 'f64': 8, 'c64': 8, 'c128': 16, 'token': 0,
}
_ARRAY = re.compile(r'\b([a-z]+[0-9]*[a-z0-9]*)\[([^\]]*)\]')
_HEADER = re.compile(r'^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$')
_INSTR = re.compile(r'^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$')
_CALLED = re.compile(r'\b(calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)')
_VALUE = re.compile(r'\s*value: <\d+ ([\w.\-]+)(?:\{[\d,]*\})? @\d+> \(size=(\d+),offset=\d+\): (.*)$')
_BRANCHES = re.compile(r'branch_computations=\{([^}]*)\}')
COLLECTIVES = ('all-gather', 'reduce-scatter', 'all-reduce', 'all-to-all', 'ragged-all-to-all', 'collective-permute')


def dtype_bytes(dtype: str) -> float:
  if dtype.startswith('f8') or dtype.startswith('f4') or dtype.startswith('f6'):
    return 1 if dtype.startswith('f8') else 0.5
  return _DTYPE_BYTES.get(dtype, 0)


def arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
  """'(f32[8,16]{1,0}, bf16[4])' -> [('f32', (8, 16)), ('bf16', (4,))]; layouts and tuple nesting are skipped."""
  out = []
  for dtype, dims in _ARRAY.findall(shape):
    if dtype_bytes(dtype) == 0 and dtype not in _DTYPE_BYTES:
      continue
    out.append((dtype, tuple(int(d.replace('<=', '')) for d in dims.split(',') if d.strip())))
  return out


def shape_bytes(shape: str) -> float:  # all arrays of a (tuple) type
  return sum(dtype_bytes(t) * math.prod(d) for t, d in arrays(shape))


@dataclasses.dataclass
class Instruction:
  name: str
  shape: str  # the result type text: 'f32[8,16]{1,0}' or a tuple '(s32[], f32[8])'
  opcode: str
  operands: list[str]  # operand names (without %); literals for constants
  operand_shapes: list[str | None]  # inline operand types when the text prints them
  attrs: str  # everything after the operand list


@dataclasses.dataclass
class Computation:
  name: str
  is_entry: bool
  instructions: list[Instruction]

  def by_name(self) -> dict[str, Instruction]:
    return {i.name: i for i in self.instructions}


def _balanced(text: str, start: int) -> int:
  """Index just past the bracket group opening at text[start] ('(' or '{')."""
  depth, i = 0, start
  while i < len(text):
    c = text[i]
    if c in '({[':
      depth += 1
    elif c in ')}]':
      depth -= 1
      if depth == 0:
        return i + 1
    i += 1
  return len(text)


def _split_top(text: str) -> list[str]:
  parts, depth, cur = [], 0, []
  for c in text:
    if c in '({[':
      depth += 1
    elif c in ')}]':
      depth -= 1
    if c == ',' and depth == 0:
      parts.append(''.join(cur).strip())
      cur = []
    else:
      cur.append(c)
  return parts + ([''.join(cur).strip()] if ''.join(cur).strip() else [])


def parse_instruction(line: str) -> Instruction | None:
  m = _INSTR.match(line)
  if not m:
    return None
  name, rest = m.group(2), m.group(3)
  if rest.startswith('('):
    end = _balanced(rest, 0)
  else:
    end = rest.find(' ')
    end = len(rest) if end < 0 else end
  shape, rest = rest[:end], rest[end:].lstrip()
  paren = rest.find('(')
  if paren < 0:
    return None
  opcode = rest[:paren].strip()
  close = _balanced(rest, paren)
  operands, operand_shapes = [], []
  for part in _split_top(rest[paren + 1:close - 1]):
    part = re.sub(r'/\*.*?\*/', '', part).strip()
    if '%' in part:
      typed, _, ref = part.rpartition('%')
      operands.append(ref.strip())
      operand_shapes.append(typed.strip() or None)
    else:
      operands.append(part)
      operand_shapes.append(None)
  return Instruction(name, shape, opcode, operands, operand_shapes, rest[close:])


def parse_module(text: str) -> tuple[list[Computation], int]:
  """(computations in text order, num_partitions) of an HLO module's text."""
  comps, current, partitions = [], None, 1
  for line in text.splitlines():
    if line.startswith('HloModule'):
      m = re.search(r'num_partitions=(\d+)', line)
      partitions = int(m.group(1)) if m else 1
      continue
    if current is None:
      m = _HEADER.match(line)
      if m:
        current = Computation(m.group(2), bool(m.group(1)), [])
      continue
    if line.strip() == '}':
      comps.append(current)
      current = None
      continue
    instr = parse_instruction(line)
    if instr is not None:
      current.instructions.append(instr)
  return comps, partitions


# ------------------------------------------------------------------------------------------------------ loops
def _attr_list(attrs: str, key: str) -> list[int]:  # 'lhs_contracting_dims={1,2}' -> [1, 2]
  m = re.search(key + r'=\{([\d,\s]*)\}', attrs)
  return [int(x) for x in m.group(1).split(',') if x.strip()] if m else []


def _constant(name: str, table: dict[str, Instruction]) -> int | None:
  """The integer value of `name` in `table` when it is a constant (through copies and converts)."""
  seen = 0
  while name in table and seen < 16:
    instr = table[name]
    if instr.opcode == 'constant':
      try:
        return int(float(instr.operands[0]))
      except (ValueError, IndexError):
        return None
    if instr.opcode not in ('copy', 'convert', 'bitcast') or not instr.operands:
      return None
    name, seen = instr.operands[0], seen + 1
  return None


def trip_count(while_instr: Instruction, caller: Computation, comps: dict[str, Computation]) -> int:
  """How often a while loop runs: `known_trip_count`, else the bound of its `i < N` / `i <= N` condition."""
  m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', while_instr.attrs)
  if m:
    return int(m.group(1))
  cond = comps.get(_called(while_instr).get('condition', ''))
  if cond is None:
    return 1
  table = cond.by_name()
  root = next((i for i in reversed(cond.instructions) if i.opcode == 'compare'), None)
  if root is None or len(root.operands) != 2:
    return 1
  direction = re.search(r'direction=(\w+)', root.attrs)
  direction = direction.group(1) if direction else 'LT'
  bound, index = None, None
  for k, ref in enumerate(root.operands):
    value = _constant(ref, table)
    if value is not None:
      bound, counter = value, root.operands[1 - k]
      if k == 0:  # N > i is i < N
        direction = {'GT': 'LT', 'GE': 'LE', 'LT': 'GT', 'LE': 'GE'}.get(direction, direction)
      gte = table.get(counter)
      if gte is not None and gte.opcode == 'get-tuple-element':
        index = re.search(r'index=(\d+)', gte.attrs)
        index = int(index.group(1)) if index else None
      break
  if bound is None:
    return 1
  start = 0
  caller_table = caller.by_name()
  init = caller_table.get(while_instr.operands[0]) if while_instr.operands else None
  if init is not None and init.opcode == 'tuple' and index is not None and index < len(init.operands):
    value = _constant(init.operands[index], caller_table)
    start = 0 if value is None else value
  if direction == 'LT':
    return max(bound - start, 0)
  if direction == 'LE':
    return max(bound - start + 1, 0)
  return 1


def _called(instr: Instruction) -> dict[str, str]:
  return dict(_CALLED.findall(instr.attrs))


def multipliers(comps: list[Computation], loops: bool = True) -> dict[str, int]:
  """How many times each computation runs per execution of the entry (1 for all when `loops` is False)."""
  by_name = {c.name: c for c in comps}
  edges: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)
  for comp in comps:
    for instr in comp.instructions:
      if instr.opcode in ('async-done', 'async-update'):
        continue  # the wrapped computation is counted once, at async-start
      called = _called(instr)
      trips = trip_count(instr, comp, by_name) if loops and instr.opcode == 'while' else 1
      for kind, target in called.items():
        edges[comp.name].append((target, trips if kind in ('body', 'condition') else 1))
      m = _BRANCHES.search(instr.attrs)
      if m:
        for target in m.group(1).split(','):
          edges[comp.name].append((target.strip().lstrip('%'), 1))
  entry = next((c.name for c in comps if c.is_entry), comps[-1].name if comps else None)
  order, seen = [], set()

  def visit(name):  # post-order, then reversed: callers before callees
    if name in seen:
      return
    seen.add(name)
    for target, _ in edges.get(name, ()):
      visit(target)
    order.append(name)

  if entry is not None:
    visit(entry)
  mult = collections.defaultdict(int)
  mult[entry] = 1
  for name in reversed(order):
    for target, trips in edges.get(name, ()):
      mult[target] += mult[name] * trips
  return dict(mult)


# ------------------------------------------------------------------------------------------------ the counts
def dot_flops(instr: Instruction, table: dict[str, Instruction]) -> float:
  """FLOPs of one dot, convolution or Pallas kernel (its declared cost estimate); 0 for anything else."""
  if instr.opcode == 'custom-call':
    m = re.search(r'"cost_estimate":\{"flops":"(\d+)"', instr.attrs)
    return float(m.group(1)) if m else 0.0
  if instr.opcode not in ('dot', 'convolution'):
    return 0.0
  out = arrays(instr.shape)
  if not out:
    return 0.0
  out_elems = math.prod(out[0][1])

  def operand_dims(k: int) -> tuple[int, ...] | None:
    typed = instr.operand_shapes[k] if k < len(instr.operand_shapes) else None
    shape = typed or (table[instr.operands[k]].shape if instr.operands[k] in table else None)
    found = arrays(shape) if shape else []
    return found[0][1] if found else None

  if instr.opcode == 'dot':
    lhs = operand_dims(0)
    contracting = _attr_list(instr.attrs, 'lhs_contracting_dims')
    return 0.0 if lhs is None else 2.0 * out_elems * math.prod(lhs[d] for d in contracting)
  lhs, kernel = operand_dims(0), operand_dims(1)
  labels = re.search(r'dim_labels=(\w+)_(\w+)->(\w+)', instr.attrs)
  if lhs is None or kernel is None or labels is None:
    return 0.0
  lhs_labels, kernel_labels, out_labels = labels.groups()
  out_dims = out[0][1]
  if len(lhs_labels) != len(lhs) or len(kernel_labels) != len(kernel) or len(out_labels) != len(out_dims):
    return 0.0
  window = _window(instr.attrs)
  total = 2.0 * kernel[kernel_labels.index('i')]
  for label, size in zip(out_labels, out_dims):
    if label in 'bf':
      total *= size
  for k, label in enumerate(kernel_labels):
    if label.isdigit():
      spatial = int(label)
      total *= _window_pairs(lhs[lhs_labels.index(label)], out_dims[out_labels.index(label)], kernel[k],
                             {key: v[spatial] if spatial < len(v) else None for key, v in window.items()})
  return total


def _window(attrs: str) -> dict[str, list]:
  """`window={size=2x3 stride=1x2 pad=0_0x1_1 lhs_dilate=2x1 rhs_dilate=1x1}` -> per-dimension lists."""
  m = re.search(r'window=\{([^}]*)\}', attrs)
  out: dict[str, list] = {}
  for item in (m.group(1).split() if m else ()):
    key, _, value = item.partition('=')
    parts = value.split('x')
    out[key] = [tuple(int(x) for x in p.split('_')) if key == 'pad' else int(p) for p in parts]
  return out


def _window_pairs(in_size: int, out_size: int, k: int, window: dict) -> int:
  """(output position, kernel tap) pairs of one spatial dimension that read a real (not padded or dilation-hole)
  input element: what a convolution multiplies, as XLA's cost analysis counts it."""
  stride, lhs_dilate, rhs_dilate = (window.get(key) or 1 for key in ('stride', 'lhs_dilate', 'rhs_dilate'))
  pad_lo = (window.get('pad') or (0, 0))[0]
  pos = (np.arange(out_size)[:, None] * stride + np.arange(k)[None, :] * rhs_dilate - pad_lo)
  valid = (pos >= 0) & (pos <= (in_size - 1) * lhs_dilate) & (pos % lhs_dilate == 0)
  return int(valid.sum())


def group_size(attrs: str, partitions: int) -> int:
  """Devices per replica group of a collective: {{0,1},{2,3}} -> 2, [4,2]<=[8] -> 2, mesh[...] {'a'} -> |a|."""
  m = re.search(r'replica_groups=\[(\d+),(\d+)\]<=', attrs)
  if m:
    return int(m.group(2))
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
  if m:
    sizes = {k.strip().strip("'"): int(v) for k, v in re.findall(r"('[^']+'|\w+)=(\d+)", m.group(1))}
    axes = [a.strip().strip("'") for a in m.group(2).split(',') if a.strip()]
    return math.prod(sizes.get(a, 1) for a in axes) if axes else partitions
  m = re.search(r'replica_groups=\{\{([^}]*)\}', attrs)
  if m:
    return len([x for x in m.group(1).split(',') if x.strip()])
  return partitions


def collective_bytes(instr: Instruction, table: dict[str, Instruction], partitions: int) -> tuple[str, float] | None:
  """(kind, bytes this device moves) of one collective instruction (or its -start), None for anything else."""
  kind = instr.opcode[:-len('-start')] if instr.opcode.endswith('-start') else instr.opcode
  if kind not in COLLECTIVES:
    return None
  sizes = [shape_bytes(typed or (table[ref].shape if ref in table else ''))
           for ref, typed in zip(instr.operands, instr.operand_shapes)]
  operand = sizes[0] if kind == 'ragged-all-to-all' and sizes else sum(sizes)
  n = max(group_size(instr.attrs, partitions), 1)
  factor = {'all-gather': n - 1, 'reduce-scatter': (n - 1) / n, 'all-reduce': 2 * (n - 1) / n,
            'all-to-all': (n - 1) / n, 'ragged-all-to-all': (n - 1) / n, 'collective-permute': 1.0}[kind]
  return kind, operand * factor


@dataclasses.dataclass
class HloStats:
  """Per-device counts of one compiled program; `*_flat` count every computation once (XLA's convention)."""
  flops: float
  flops_flat: float
  collective_bytes: dict[str, float]  # kind -> bytes per device, loop-corrected
  collective_bytes_flat: dict[str, float]
  collective_counts: dict[str, int]  # kind -> instructions executed per step, loop-corrected
  loop_trip_counts: list[int]  # every while loop's trip count, in text order
  partitions: int

  @property
  def loop_factor(self) -> float:
    return self.flops / self.flops_flat if self.flops_flat else 1.0


def analyze(text: str) -> HloStats:
  """FLOPs and collective bytes per device of an HLO module's text (`compiled.as_text()`)."""
  comps, partitions = parse_module(text)
  by_name = {c.name: c for c in comps}
  mult, flat = multipliers(comps, loops=True), multipliers(comps, loops=False)
  flops = flops_flat = 0.0
  coll, coll_flat = collections.defaultdict(float), collections.defaultdict(float)
  counts = collections.defaultdict(int)
  trips = []
  for comp in comps:
    table = comp.by_name()
    m, f = mult.get(comp.name, 0), flat.get(comp.name, 0)
    for instr in comp.instructions:
      if instr.opcode == 'while':
        trips.append(trip_count(instr, comp, by_name))
      fl = dot_flops(instr, table)
      flops += m * fl
      flops_flat += f * fl
      moved = collective_bytes(instr, table, partitions)
      if moved is not None:
        coll[moved[0]] += m * moved[1]
        coll_flat[moved[0]] += f * moved[1]
        counts[moved[0]] += m
  return HloStats(flops, flops_flat, dict(coll), dict(coll_flat), dict(counts), trips, partitions)


# ------------------------------------------------------------------------------------------- largest buffers
@dataclasses.dataclass
class Buffer:
  """`count` buffers of `bytes` each with the same shape, allocation kind and JAX op (e.g. one per layer)."""
  name: str  # the first one's HLO name
  shape: str
  bytes: int
  kind: str  # 'parameter 0', 'preallocated-temp', 'maybe-live-out', ...
  op_name: str = ''
  count: int = 1


def buffer_assignment(text: str, hlo_text: str = '', top: int = 10) -> list[Buffer]:
  """The largest values of an XLA buffer-assignment dump (`*buffer-assignment.txt`) with their allocation kind
  and, from `hlo_text`, the JAX op that made them; grouped (`_group`), the `top` largest groups first."""
  found, kind = {}, ''
  for line in text.splitlines():
    m = re.match(r'allocation \d+: size \d+,\s*(.*?):?\s*$', line)
    if m:  # allocations of another color live outside HBM (on-chip memories)
      kind = None if re.search(r'color [1-9]', m.group(1)) else (
          re.sub(r',?\s*(shape \||parameter \d).*$', '', m.group(1)).strip().rstrip(':') or 'parameter')
      continue
    m = kind is not None and _VALUE.match(line)
    if m and int(m.group(2)) > found.get(m.group(1), Buffer('', '', -1, '')).bytes:
      found[m.group(1)] = Buffer(m.group(1), m.group(3).strip(), int(m.group(2)), kind)
  return _group(found.values(), hlo_text, top)


def largest_arrays(hlo_text: str, top: int = 10) -> list[Buffer]:
  """The largest array results of instructions outside fusions (materialised buffers), grouped like
  `buffer_assignment`: what a compiled module's text alone says about its memory."""
  comps, _ = parse_module(hlo_text)
  fused = {t for c in comps for i in c.instructions if i.opcode == 'fusion' for t in _called(i).values()}
  found = []
  for comp in comps:
    if comp.name in fused:
      continue
    for instr in comp.instructions:
      if (instr.shape.startswith('(') or instr.opcode in ('get-tuple-element', 'bitcast', 'tuple')
          or re.search(r'S\([1-9]\)', instr.shape)):  # memory space S(n > 0): not HBM
        continue
      found.append(Buffer(instr.name, instr.shape, int(shape_bytes(instr.shape)), instr.opcode))
  return _group(found, hlo_text, top)


def op_names(hlo_text: str) -> dict[str, str]:
  """{instruction name: the JAX op that made it} from the `op_name` metadata of a module's text, e.g.
  'jit(train_step)/transpose(jvp(moe))/dot_general' (named scopes and transforms included)."""
  return {m.group(1): m.group(2) for m in re.finditer(
      r'^\s*(?:ROOT\s+)?%([\w.\-]+) = [^\n]*?op_name="([^"]*)"', hlo_text, re.MULTILINE)}


def _group(buffers, hlo_text: str, top: int) -> list[Buffer]:
  """Buffers of one shape (layout aside), kind and JAX op merged into one entry; the `top` largest totals."""
  names = op_names(hlo_text) if hlo_text else {}
  groups: dict[tuple, Buffer] = {}
  for b in sorted(buffers, key=lambda b: -b.bytes):
    b.op_name = names.get(b.name, '')
    key = (re.sub(r'\{[^}]*\}', '', b.shape), b.kind, b.op_name)
    if key in groups:
      groups[key].count += 1
    else:
      groups[key] = b
  return sorted(groups.values(), key=lambda b: -b.bytes * b.count)[:top]


def parse_resource_exhausted(message: str) -> dict:
  """The figures of an XLA:TPU out-of-memory compile error: required and available bytes, and the largest
  allocations when the message lists them ('Largest program allocations' blocks)."""
  units = {'': 1, 'B': 1, 'K': 1024, 'M': 1024 ** 2, 'G': 1024 ** 3, 'T': 1024 ** 4}

  def size(value: str, unit: str) -> int:
    return int(float(value) * units[(unit or '').rstrip('iB') or ''])

  out: dict = {'message': message.strip().splitlines()[0] if message.strip() else ''}
  m = re.search(r'\(([\d.]+)([KMGT]?)i?B?\) exceeds available HBM \(([\d.]+)([KMGT]?)i?B?\)', message)
  if m:
    out['required_bytes'], out['available_bytes'] = size(m.group(1), m.group(2)), size(m.group(3), m.group(4))
  m = re.search(r'Used ([\d.]+)([KMGT]?)i?B? of ([\d.]+)([KMGT]?)i?B? hbm', message)
  if m:
    out['required_bytes'], out['available_bytes'] = size(m.group(1), m.group(2)), size(m.group(3), m.group(4))
  allocations = []
  for block in re.split(r'\n\s*\d+\.\s+Size:', message)[1:]:
    m = re.match(r'\s*([\d.]+)([KMGT]?)', block)
    shape = re.search(r'Shape:\s*(\S+)', block)
    op = re.search(r'op_name="([^"]*)"', block)
    label = re.search(r'XLA label:\s*(.*)', block)
    kind = re.search(r'Allocation type:\s*(.*)', block)
    allocations.append({'bytes': size(m.group(1), m.group(2)) if m else 0, 'shape': shape.group(1) if shape else '',
                        'op_name': op.group(1) if op else '', 'label': label.group(1).strip() if label else '',
                        'kind': kind.group(1).strip() if kind else ''})
  out['largest'] = allocations
  return out

