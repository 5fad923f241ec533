"""What one run of a compiled XLA program does, read from its optimized HLO text: matmul FLOPs, collectives
(kind, bytes, the device groups they span) and the bytes its top-level operations read and write.

Every instruction is counted as many times as the loops around it run: a computation's multiplicity is the sum
over its callers of the caller's multiplicity, times the trip count for a while body (XLA records
`known_trip_count`). XLA's own `cost_analysis()` counts a loop body once, so a layer scan of depth L (and the
gradient-accumulation loop) would be undercounted L-fold (measured: half the FLOPs of the tiny model with its
2-layer scan).

Bytes moved, two ways: as XLA's cost model counts them (each top-level instruction, not those inside a
fusion, reads its operands and writes its result), which depends on how the compiling backend fused the
program (a CPU compile leaves far more unfused than a GPU or TPU one: 3.7x the matmul traffic for d20); and
the matmuls' operands and results alone, the traffic of a compiler that fuses every elementwise operation into
a neighbouring matmul (what XLA:TPU and XLA:GPU mostly achieve for a transformer).
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict

import numpy as np

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
               "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_ARRAY = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([0-9,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\((.*)\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%([\w.\-]+)\s*=\s*(.*?)\s([\w\-]+)\((.*)$")
_CALLEE = re.compile(r"\b(calls|to_apply|body|condition)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')
_FREE = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while", "call", "conditional",
         "after-all", "partition-id", "replica-id", "iota", "all-gather-done", "all-reduce-done",
         "collective-permute-done", "copy-done", "async-done", "opt-barrier"}


def array_bytes(type_text: str) -> int:
    """Bytes of every array in a (possibly tuple) HLO type."""
    return sum(DTYPE_BYTES[d] * math.prod(int(x) for x in dims.split(",") if x) for d, dims in
               _ARRAY.findall(type_text))


def _dims(type_text: str) -> list[int]:
    m = _ARRAY.search(type_text)
    return [int(x) for x in m.group(2).split(",") if x] if m else []


@dataclasses.dataclass
class Instruction:
    name: str
    type: str  # result type text
    op: str
    rest: str  # operands and attributes

    def operands(self) -> list[str]:
        depth, out, cur = 0, [], ""
        for ch in self.rest:
            if ch == "(":
                depth += 1
            elif ch == ")":
                if depth == 0:
                    break
                depth -= 1
            cur += ch
        for piece in cur.split(","):
            m = re.search(r"%([\w.\-]+)", piece)
            if m:
                out.append(m.group(1))
        return out


@dataclasses.dataclass
class Collective:
    kind: str
    bytes: int  # the whole array the collective works on (gathered result / scattered or reduced operand)
    groups: np.ndarray  # (groups, group size) device ids
    count: int  # times per run


@dataclasses.dataclass
class ProgramCosts:
    flops: float  # matmul FLOPs per device per run
    bytes_accessed: float  # HBM bytes per device per run: top-level operands + results, as this backend fused
    matmul_bytes: float  # HBM bytes of the matmuls' operands and results alone (elementwise work fused into them)
    collectives: list[Collective]


def parse_computations(text: str) -> tuple[dict[str, list[Instruction]], str, dict[str, str]]:
    """({computation: instructions}, entry name, {computation: parameter types text})."""
    comps: dict[str, list[Instruction]] = {}
    params: dict[str, str] = {}
    entry, current = None, None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group(2)
            comps[current], params[current] = [], header.group(3)
            if header.group(1):
                entry = current
            continue
        if current is None:
            continue
        if line.startswith("}"):
            current = None
            continue
        m = _INSTR.match(line)
        if m:
            comps[current].append(Instruction(m.group(2), m.group(3), m.group(4), m.group(5)))
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return comps, entry, params


def multiplicities(comps: dict[str, list[Instruction]], entry: str) -> tuple[dict[str, float], set[str]]:
    """Times each computation runs per run of the program, and the names of fused computations."""
    edges: dict[str, list[tuple[str, float]]] = defaultdict(list)
    fused: set[str] = set()
    for name, instrs in comps.items():
        for ins in instrs:
            trip = _TRIP.search(ins.rest)
            for kind, callee in _CALLEE.findall(ins.rest):
                factor = float(trip.group(1)) if (kind == "body" and trip) else 1.0
                edges[name].append((callee, factor))
                if ins.op == "fusion" and kind == "calls":
                    fused.add(callee)
            for group in _BRANCHES.findall(ins.rest):  # a conditional: every branch counted (an upper bound)
                edges[name] += [(c.strip().lstrip("%"), 1.0) for c in group.split(",") if c.strip()]
    order, seen = [], set()

    def visit(c):  # callees after callers: reverse post-order of the call DAG
        if c in seen:
            return
        seen.add(c)
        for callee, _ in edges.get(c, ()):
            visit(callee)
        order.append(c)

    visit(entry)
    mult = defaultdict(float, {entry: 1.0})
    for c in reversed(order):
        for callee, factor in edges.get(c, ()):
            mult[callee] += mult[c] * factor
    return dict(mult), fused


def replica_groups(rest: str, num_devices: int) -> np.ndarray:
    """(groups, size) device ids of a collective, from any of XLA's three spellings."""
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", rest)
    if m:  # Shardy: mesh['a'=2,'b'=4] {'b'}: devices that differ only along the named axes
        axes = [(a.strip().strip("'"), int(n)) for a, n in (x.split("=") for x in m.group(1).split(","))]
        chosen = [a.strip().strip("'") for a in m.group(2).split(",") if a.strip()]
        ids = np.arange(math.prod(n for _, n in axes)).reshape([n for _, n in axes])
        pos = [i for i, (a, _) in enumerate(axes) if a in chosen]
        rest_axes = [i for i in range(len(axes)) if i not in pos]
        return ids.transpose(rest_axes + pos).reshape(-1, math.prod(axes[i][1] for i in pos) if pos else 1)
    m = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", rest)
    if m:  # iota: [groups,size]<=[reshape]T(perm)
        shape = [int(x) for x in m.group(1).split(",")]
        ids = np.arange(math.prod(int(x) for x in m.group(2).split(","))).reshape(
            [int(x) for x in m.group(2).split(",")])
        if m.group(3):
            ids = ids.transpose([int(x) for x in m.group(3).split(",")])
        return ids.reshape(shape[0], -1)
    m = re.search(r"replica_groups=\{(\{[\d,\s]*\}(?:\s*,\s*\{[\d,\s]*\})*)\}", rest)
    if m:
        groups = [[int(x) for x in g.split(",") if x.strip()] for g in re.findall(r"\{([\d,\s]*)\}", m.group(1))]
        if groups and groups[0]:
            return np.array(groups)
    if "source_target_pairs" in rest:
        pairs = re.findall(r"\{(\d+),(\d+)\}", rest.split("source_target_pairs=")[1])
        return np.array([[int(a), int(b)] for a, b in pairs]) if pairs else np.arange(num_devices)[None]
    return np.arange(num_devices)[None]  # empty groups: every device


def program_costs(text: str, num_devices: int) -> ProgramCosts:
    comps, entry, params = parse_computations(text)
    mult, fused = multiplicities(comps, entry)
    flops = bytes_accessed = matmul_bytes = 0.0
    collectives: list[Collective] = []
    for name, instrs in comps.items():
        times = mult.get(name, 0.0)
        if not times:
            continue
        shapes = {i.name: i.type for i in instrs}
        for p in re.finditer(r"([\w.\-]+):\s*([^,()]+(?:\([^)]*\))?)", params.get(name, "")):
            shapes.setdefault(p.group(1), p.group(2))
        for ins in instrs:
            if ins.op == "dot":
                lhs = _dims(shapes.get(ins.operands()[0], ""))
                contract = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.rest)
                k = math.prod(lhs[int(d)] for d in contract.group(1).split(",") if d) if contract and lhs else 1
                flops += times * 2.0 * math.prod(_dims(ins.type)) * k
                matmul_bytes += times * (array_bytes(ins.type) + sum(array_bytes(shapes.get(o, ""))
                                                                     for o in ins.operands()))
            base = ins.op.removesuffix("-start")
            if base in COLLECTIVES and not ins.op.endswith("-done"):
                operand_bytes = sum(array_bytes(shapes.get(o, "")) for o in ins.operands())
                size = array_bytes(ins.type)  # combined collectives have tuple results: all of them
                if base == "reduce-scatter":
                    size = operand_bytes
                elif ins.op in ("all-gather-start", "collective-permute-start"):
                    size -= operand_bytes  # their tuple holds the operands too
                collectives.append(Collective(base, size, replica_groups(ins.rest, num_devices), int(times)))
            if name not in fused and ins.op not in _FREE and base not in COLLECTIVES:
                bytes_accessed += times * _moved_bytes(ins, shapes, comps)
    return ProgramCosts(flops, bytes_accessed, matmul_bytes, collectives)


def _moved_bytes(ins: Instruction, shapes: dict[str, str], comps: dict[str, list[Instruction]]) -> int:
    """Bytes a top-level instruction reads and writes. A slice of a big operand reads only the slice, and an
    update in place writes only the update: without these rules a layer scan's stacked weights (and its
    stacked activations) would count whole on every iteration."""
    operands = ins.operands()
    sizes = [array_bytes(shapes.get(o, "")) for o in operands]
    if ins.op == "dynamic-slice":
        return 2 * array_bytes(ins.type)
    if ins.op == "dynamic-update-slice":
        return 2 * sizes[1]
    result = array_bytes(ins.type)
    callee = re.search(r"calls=%([\w.\-]+)", ins.rest)
    if ins.op == "fusion" and callee and callee.group(1) in comps:
        body = comps[callee.group(1)]
        param = {int(re.match(r"(\d+)", i.rest).group(1)): i.name for i in body if i.op == "parameter"}
        users = defaultdict(list)
        for i in body:
            for o in i.operands():
                users[o].append(i)
        for k, pname in param.items():
            uses = users.get(pname, [])
            if k < len(sizes) and uses and all(u.op == "dynamic-slice" and u.operands()[0] == pname for u in uses):
                sizes[k] = sum(array_bytes(u.type) for u in uses)
            if k < len(sizes) and any(u.op == "dynamic-update-slice" and u.operands()[0] == pname for u in uses):
                update = next(u for u in uses if u.op == "dynamic-update-slice")
                sizes[k] = 0  # updated in place: only the update is written
                result = array_bytes(dict((i.name, i.type) for i in body).get(update.operands()[1], ""))
    return result + sum(sizes)
