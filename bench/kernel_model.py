"""A static performance model of fastopt's Triton step kernels, built without a GPU.

Each kernel is compiled for sm_90 by Triton's CUDA backend (its bundled ptxas, as in
bench/kernel_resources.py) and disassembled with line information (``nvdisasm -g
--print-line-info-inline``): every SASS instruction carries the chain of Python source lines it
was inlined from. The model then

1. reads registers and spills (ptxas) and derives programs per SM (65536 registers, allocated per
   warp in units of 256, at most 64 warps and 32 programs per SM);
2. counts the global accesses by width (LDG/STG .128/.64/32-bit, generic LD/ST, atomics);
3. walks the SASS control-flow graph along the *common path* of a scenario and counts the
   instructions each thread issues, by section. How the path is found: at each conditional
   branch the two successors are compared by the Python ``if``/``for`` arms their first
   instructions lie in (from the line chains and the kernels' AST); the arm a successor enters
   decides, by the scenario's value of that ``if``'s condition (its source text). Branches around
   the IEEE division and square-root slow paths (a ``CALL`` to ``__internal_*slowpath``) are
   never taken into the call; a back edge of a run-time ``for`` is taken ``trips - 1`` times.
   Constexpr conditions need no value (only one arm is compiled). A condition met without a
   scenario value is an error: the path is never guessed;
4. predicts the time of workloads (4 x 4096x4096, ResNet-50's 161 tensors) as the larger of the
   issue time (warp-instructions over 4 schedulers x SMs x clock, one per cycle) and the memory
   time (the roofline's bytes over the achievable bandwidth), against the memory floor.

It is a model, not a measurement: no latency, no cache misses of the halo, no tail effects
beyond whole programs; its machine figures are listed in MACHINES with their sources.

    python bench/kernel_model.py                      # table to stdout
    python bench/kernel_model.py --out bench/results/triton_kernel_model.md

Must run without TRITON_INTERPRET=1.
"""

from __future__ import annotations

import argparse
import ast
import collections
import dataclasses
import functools
import glob
import math
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional, Tuple

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("bench/kernel_model.py compiles the kernels: run it without TRITON_INTERPRET=1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "0")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernel_resources  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL_DIR = os.path.join(ROOT, "kernels")


# -- machines ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Machine:
    name: str
    sms: int
    clock_ghz: float  # sustained SM clock under a memory-bound load
    bandwidth_tbs: float  # achievable DRAM bandwidth (about 90% of the datasheet's peak)
    source: str


MACHINES = [
    Machine("H100 SXM", 132, 1.75, 3.0, "datasheet: 132 SMs, 1.98 GHz boost, 3.35 TB/s HBM3; 90% of peak, 1.75 GHz"),
    Machine("H200 SXM", 132, 1.75, 4.3, "datasheet: 132 SMs, 1.98 GHz boost, 4.8 TB/s HBM3e; 90% of peak, 1.75 GHz"),
]
SCHEDULERS_PER_SM = 4
REGISTERS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
MAX_PROGRAMS_PER_SM = 32


def programs_per_sm(registers: int, warps: int, shared: int = 0) -> int:
    per_warp = math.ceil(registers * 32 / 256) * 256
    by_regs = REGISTERS_PER_SM // (per_warp * warps)
    by_shared = (228 * 1024) // shared if shared else MAX_PROGRAMS_PER_SM
    return max(0, min(by_regs, MAX_WARPS_PER_SM // warps, MAX_PROGRAMS_PER_SM, by_shared))


# -- source structure (the kernels' AST) ---------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Arm:
    """One arm of an ``if`` (body or else) or the body of a run-time ``for`` in a kernel file."""

    file: str
    line: int  # the if's / for's line
    kind: str  # "if", "else", "for"
    condition: str  # the test's source (the for's iterable)
    first: int
    last: int
    constexpr: bool
    function: str


def _is_constexpr(test: ast.expr) -> bool:
    """Conditions on constexprs only (UPPERCASE names, dtypes): resolved when compiling."""
    for node in ast.walk(test):
        if isinstance(node, ast.Name) and not (node.id.isupper() or node.id in ("dtype", "tl", "a")):
            return False
        if isinstance(node, ast.Subscript) or isinstance(node, ast.Call):
            return False
    return True


def _source_key(path: str) -> str:
    """How a source file is named in the model: ``kernels/<file>`` for the kernels, whatever
    checkout compiled them (Triton's cache hands back a cubin whose line information names the
    first checkout that compiled the same source), the path itself for other files."""
    parent, name = os.path.split(path)
    return f"kernels/{name}" if os.path.basename(parent) == "kernels" else path


@functools.lru_cache(maxsize=1)  # the kernels' sources do not change during a run
def source_arms() -> Tuple[Dict[str, List[Arm]], Dict[Tuple[str, int], str], Dict[Tuple[str, int], str]]:
    """(arms per file, enclosing function per (file, line), source text per (file, line))."""
    arms: Dict[str, List[Arm]] = collections.defaultdict(list)
    functions: Dict[Tuple[str, int], str] = {}
    texts: Dict[Tuple[str, int], str] = {}
    for full in glob.glob(os.path.join(KERNEL_DIR, "*.py")):
        path = _source_key(full)
        source = open(full).read()
        for i, text in enumerate(source.splitlines(), 1):
            texts[(path, i)] = text
        for fn in ast.walk(ast.parse(source)):
            if not isinstance(fn, ast.FunctionDef):
                continue
            for line in range(fn.lineno, fn.end_lineno + 1):
                functions.setdefault((path, line), fn.name)
            for node in ast.walk(fn):
                if isinstance(node, ast.If):
                    test = ast.unparse(node.test)
                    const = _is_constexpr(node.test)
                    body = (node.body[0].lineno, node.body[-1].end_lineno)
                    arms[path].append(Arm(path, node.lineno, "if", test, *body, const, fn.name))
                    if node.orelse:
                        orelse = (node.orelse[0].lineno, node.orelse[-1].end_lineno)
                        arms[path].append(Arm(path, node.lineno, "else", test, *orelse, const, fn.name))
                elif isinstance(node, ast.While):
                    body = (node.lineno, node.body[-1].end_lineno)
                    arms[path].append(Arm(path, node.lineno, "for", ast.unparse(node.test), *body, False, fn.name))
                elif isinstance(node, ast.For):
                    iterable = ast.unparse(node.iter)
                    if "static_range" in iterable:
                        continue
                    # the header line too: the loop's latch (its exit test) is compiled from it
                    body = (node.lineno, node.body[-1].end_lineno)
                    arms[path].append(Arm(path, node.lineno, "for", iterable, *body, False, fn.name))
    # innermost functions win: setdefault above met outer functions first for nested defs only
    return arms, functions, texts


# -- SASS ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Instruction:
    address: int
    text: str
    opcode: str
    predicate: Optional[str]
    target: Optional[str]  # label of a BRA / CALL
    chain: Tuple[Tuple[str, int], ...]  # (file, line), innermost first


_LINE = re.compile(r'//## File "([^"]+)", line (\d+)(?: inlined at "([^"]+)", line (\d+))?')
_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z0-9_.]+)([^;]*);")


def disassemble(cubin: bytes) -> Tuple[List[Instruction], Dict[str, int]]:
    """The kernel's instructions (subroutines included) and its labels' instruction indices."""
    nvdisasm = os.path.join(kernel_resources._BIN, "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [nvdisasm, "-c", "-g", "--print-line-info-inline", f.name], capture_output=True, text=True, check=True
        ).stdout
    out: List[Instruction] = []
    labels: Dict[str, int] = {}
    chain: List[Tuple[str, int]] = []
    fresh = False
    for raw in text.splitlines():
        line = raw.strip()
        m = _LINE.search(line)
        if m:
            if not fresh:
                chain, fresh = [], True
            chain.append((_source_key(m.group(1)), int(m.group(2))))
            continue
        label = re.match(r"^(\.L_x_\d+|\$?[A-Za-z_$][\w$]*):$", line)
        if label:
            labels[label.group(1)] = len(out)
            continue
        m = _INSTR.search(line)
        if m:
            fresh = False
            target = re.search(r"`\(([^)]+)\)", m.group(4))
            out.append(
                Instruction(
                    int(m.group(1), 16),
                    m.group(3) + m.group(4),
                    m.group(3),
                    (m.group(2) or "").strip() or None,
                    target.group(1) if target else None,
                    tuple(chain),
                )
            )
    return out, labels


# -- the common path -----------------------------------------------------------------------------------------
class PathError(RuntimeError):
    pass


_MOVES = ("P2R", "R2P", "MOV", "IMAD.MOV", "NOP", "BSSY", "BSYNC", "CS2R", "UMOV", "S2R", "HFMA2.MMA")


def _arms_of(instr: Instruction, arms: Dict[str, List[Arm]]) -> List[Arm]:
    found = []
    for file, line in instr.chain:
        for arm in arms.get(file, ()):
            if arm.first <= line <= arm.last:
                found.append(arm)
    return found


def walk(instrs: List[Instruction], labels: Dict[str, int], arms, scenario: Dict[str, object]) -> List[int]:
    """Instruction indices one thread issues along the scenario's common path (with repeats)."""
    own_arms = [[a for a in _arms_of(ins, arms) if not a.constexpr] for ins in instrs]

    def block_arms(i: int) -> List[Arm]:
        """The arms most of the block's first operations (up to 16, to the next branch) lie in: line
        information is per instruction, and the compiler attributes a register move, a shared
        conversion or a hoisted operation to a line of another statement now and then."""
        votes: Dict[Tuple[Arm, ...], int] = collections.Counter()
        for j in range(i, min(i + 16, len(instrs))):
            op = instrs[j].opcode
            if j > i and op.startswith(("BRA", "EXIT", "CALL", "RET", "BAR")):
                break
            if not op.startswith(_MOVES):
                votes[tuple(own_arms[j])] += 1
        return list(max(votes, key=votes.__getitem__)) if votes else own_arms[i]

    runtime_arms = {i: block_arms(i) for i in range(len(instrs))}
    evaluated: Dict[str, int] = collections.Counter()
    back_edges: Dict[int, int] = collections.Counter()

    def value(arm: Arm) -> bool:
        key = arm.condition
        if key not in scenario:
            raise PathError(f"no scenario value for {arm.kind} `{arm.condition}` ({arm.function}, line {arm.line})")
        v = scenario[key]
        if arm.kind == "for":
            return int(v) > 0
        if v == "once":
            v = evaluated[key] == 0
        truth = bool(v)
        return truth if arm.kind == "if" else not truth

    def consistent(there: int, other: int) -> bool:
        """Whether going to ``there`` (not ``other``) fits the scenario: each arm one successor
        lies in and the other does not is entered exactly when its condition holds."""
        inside = set(runtime_arms[there])
        return all((a in inside) == value(a) for a in inside ^ set(runtime_arms[other]))

    path: List[int] = []
    i = 0
    for _ in range(200000):
        ins = instrs[i]
        path.append(i)
        op = ins.opcode
        if op == "EXIT" and ins.predicate is None:
            return path
        if op == "EXIT":
            # A loop's exit test when a back edge follows (a rotated loop with nothing after it);
            # else an early return that the common path does not take (AMP's found_inf).
            latch = next((j for j in range(i + 1, min(i + 6, len(instrs))) if instrs[j].opcode.startswith("BRA")), None)
            if latch is not None and instrs[latch].target in labels and labels[instrs[latch].target] <= latch:
                if back_edges[latch] + 1 >= _trips(scenario, runtime_arms[labels[instrs[latch].target]], latch):
                    return path
            i += 1
            continue
        if op.startswith("BRA") and ins.target in labels:
            target = labels[ins.target]
            following = i + 1
            if target <= i:  # a back edge: the loop of the for whose body holds the target
                trips = _trips(scenario, runtime_arms[target], ins.address)
                back_edges[i] += 1
                # unconditional: the loop leaves through a predicated EXIT before it (above)
                i = target if back_edges[i] < trips or ins.predicate is None else following
                continue
            if ins.predicate is None:
                i = target
                continue
            if _calls_slow_path(instrs, following):
                i = target
                continue
            if _calls_slow_path(instrs, target):
                i = following
                continue
            decided = [a.condition for a in set(runtime_arms[target]) ^ set(runtime_arms[following])]
            if not decided:
                # Within one statement: a per-lane guard (a masked atomic or store compiled as a
                # branch around it). A warp issues the guarded code when any of its lanes needs it.
                i = following
                continue
            to_target, to_following = consistent(target, following), consistent(following, target)
            for key in set(decided):
                evaluated[key] += 1
            if to_target == to_following:
                # The successors' blocks may start deeper than the branch decides (the compiler
                # moved code across ifs): decide by the if whose line the branch was compiled from.
                own = {line for _, line in ins.chain} | {line for _, line in instrs[i - 1].chain}
                tested = [a for a in set(runtime_arms[target]) ^ set(runtime_arms[following]) if a.line in own]
                if len({a.condition for a in tested}) == 1:
                    arm = tested[0]
                    inside = target if arm in runtime_arms[target] else following
                    i = inside if value(arm) else (following if inside == target else target)
                    continue
                raise PathError(
                    f"branch at {ins.address:#x} ({ins.text}): both successors "
                    f"{'fit' if to_target else 'contradict'} the scenario; arms {sorted(set(decided))}"
                )
            i = target if to_target else following
            continue
        i += 1
    raise PathError("no EXIT reached in 200000 instructions")


def _trips(scenario, arms_at_target, address: int) -> int:
    loops = [a for a in arms_at_target if a.kind == "for"]
    if not loops:
        raise PathError(f"back edge at {address:#x} outside a run-time for")
    if loops[-1].condition not in scenario:
        raise PathError(f"no trip count for `for ... in {loops[-1].condition}`")
    return int(scenario[loops[-1].condition])


def _calls_slow_path(instrs: List[Instruction], start: int) -> bool:
    """Whether the straight run of instructions from ``start`` calls an IEEE slow path."""
    for ins in instrs[start : start + 8]:
        if ins.opcode.startswith("CALL"):
            return "slowpath" in (ins.target or "") or "div_rn" in (ins.target or "")
        if ins.opcode.startswith(("BRA", "EXIT", "RET")):
            return False
    return False


# -- sections ------------------------------------------------------------------------------------------
SECTIONS = [
    # (section, functions whose lines belong to it), the innermost frame decides
    ("table and tile geometry", {"vector_tile", "locate", "load_tile", "adam_tile", "offsets", "learning_rate"}),
    ("bias corrections", {"one_minus_power", "one_minus_powers", "step_of"}),
    (
        "neighbours (stencil)",
        {"accumulator_laplacian", "laplacian", "accumulated", "direction_at", "smoothed", "_old_v", "_adamw_at"},
    ),
    ("border stash and stores", {"store_accumulator_shared", "store_shared", "_border", "_extent", "store"}),
    ("arrivals", {"arrive", "_neighbour_tile"}),
    ("commit", {"_commit", "_commit_accumulator", "_border_lanes"}),
]


def section_of(ins: Instruction, functions, texts) -> str:
    if not ins.chain:
        return "other"
    file, line = ins.chain[0]
    text = texts.get((file, line), "")
    if "div_rn(" in text or "sqrt_rn(" in text or "tl.sqrt(" in text:
        return "divisions and sqrt"
    fn = functions.get((file, line), "")
    for name, members in SECTIONS:
        if fn in members:
            return name
    return "element math and streams"


def access_widths(instrs: List[Instruction]) -> Dict[str, int]:
    widths: Dict[str, int] = collections.Counter()
    for ins in instrs:
        op = ins.opcode
        if op.startswith(("LDG", "STG", "ATOMG", "REDG", "LD.", "ST.", "LD ", "ST ")) or op in ("LD", "ST"):
            kind = op.split(".")[0]
            size = next((p for p in op.split(".")[1:] if p in ("128", "64", "U16", "S16", "U8", "S8")), "32")
            widths[f"{kind}.{size}"] += 1
    return dict(widths)


# -- scenarios ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Scenario:
    """The common path of one program: its tensor's path (vector or generic), Laplacian (a 2-D or
    1-D stencil, or none), whether the tensor has more than one tile (the border protocol), how many
    tiles read this one's border (``readers``), and the step count (the generic path's bias
    correction loop runs floor(log2(step)) + 1 times). Each tile is committed by one of its readers:
    on average one commit per program (one pass of the commit loop)."""

    vector: bool
    stencil: str  # "2d", "1d", "none"
    tiled: bool
    readers: int
    step: int = 1000

    def values(self) -> Dict[str, object]:
        return {
            "tl.load(found_inf) != 0": False,
            "vector": self.vector,
            "mode != LAP_OFF": True,  # use_lap on every tensor (LAdam's default)
            "mode == LAP_STENCIL": self.stencil != "none",
            "rows == 1": self.stencil == "1d",
            "geo[11] > 0": self.tiled,
            "range(readers)": self.readers,
            "last >> n & 1": "once",
            "last != 0": 1,  # one commit per program on average
            "ndim != 0": False,
            "g_strided": False,
            "range(bits)": int(math.floor(math.log2(self.step))) + 1,
            "range(ndim)": 0,
            "has_stencil(geo)": self.stencil != "none",  # update_lap, weight_lap
            "step == 1.0": False,  # wave_variance: the step that records E0 (once per run)
            "p_strided": False,  # weight_lap: the param read at its neighbours is contiguous
        }


INTERIOR = Scenario(vector=True, stencil="2d", tiled=True, readers=9)


@dataclasses.dataclass
class KernelFigures:
    kernel: str
    dtype: str
    variant: str
    registers: int
    spills: int
    warps: int
    programs_per_sm: int
    widths: Dict[str, int]
    per_thread: Optional[int]
    by_section: Dict[str, int]
    elements_per_thread: int
    note: str = ""

    @property
    def per_element(self) -> Optional[float]:
        """Warp-instructions per element along the common path."""
        return None if self.per_thread is None else self.per_thread / (32 * self.elements_per_thread)


class Compiled:
    """One compiled kernel variant, disassembled once, walked for any scenario."""

    def __init__(self, kernel_name: str, dtype: str, vector: Optional[int], stencil: int = 9):
        kernel, constexprs = kernel_resources.KERNELS[kernel_name]
        constexprs = dict(constexprs)
        if vector is not None:
            constexprs["VECTOR"] = vector
        self.kernel_name, self.dtype, self.vector = kernel_name, dtype, vector
        self.compiled = kernel_resources.compile_kernel(kernel, constexprs, 90, dtype, stencil, False)
        self.usage = kernel_resources.resources(self.compiled)
        self.instrs, self.labels = disassemble(self.compiled.asm["cubin"])
        self.arms, self.functions, self.texts = source_arms()
        self.warps = kernel_resources.warps_for(dtype, kernel, 1 if vector is None else vector)
        self._walks: Dict[Scenario, List[int]] = {}

    def path(self, scenario: Scenario) -> List[int]:
        if scenario not in self._walks:
            path = walk(self.instrs, self.labels, self.arms, scenario.values())
            self._check(path, scenario)
            self._walks[scenario] = path
        return self._walks[scenario]

    def _check(self, path: List[int], scenario: Scenario) -> None:
        """A walk that missed what the scenario must execute is an error, not a figure."""
        found = {section_of(self.instrs[i], self.functions, self.texts) for i in path}
        compiled = {section_of(ins, self.functions, self.texts) for ins in self.instrs}
        needed = {"table and tile geometry", "bias corrections", "divisions and sqrt"} & compiled
        if scenario.stencil != "none":
            needed.add("neighbours (stencil)")
        if scenario.tiled:
            needed |= {"border stash and stores", "arrivals", "commit"}
        missing = needed - found
        if missing:
            raise PathError(f"the walk of {scenario} misses {sorted(missing)}")
        if scenario.stencil != "none":
            # at least one load per neighbour and element (the compiler may duplicate code per arm,
            # so the kernel's neighbour loads are not all on one path; a walk that skipped the
            # stencil has almost none)
            per_thread = kernel_resources._multi_tensor.settings().tile // (32 * self.warps)
            neighbours = {"2d": 8, "1d": 2}[scenario.stencil]
            loads = sum(
                1
                for i in path
                if self.instrs[i].opcode.startswith("LDG")
                and section_of(self.instrs[i], self.functions, self.texts) == "neighbours (stencil)"
            )
            if loads < neighbours * per_thread:
                raise PathError(
                    f"the walk of {scenario} issues {loads} neighbour loads, fewer than {neighbours} a lane"
                )

    def figures(self, scenario: Scenario = INTERIOR) -> KernelFigures:
        settings = kernel_resources._multi_tensor.settings()
        per_thread: Optional[int] = None
        by_section: Dict[str, int] = {}
        note = ""
        try:
            path = self.path(scenario)
            per_thread = len(path)
            by_section = dict(collections.Counter(section_of(self.instrs[i], self.functions, self.texts) for i in path))
        except PathError as e:
            note = f"common path not modeled: {e}"
        return KernelFigures(
            self.kernel_name,
            self.dtype,
            {None: "-", 0: "generic", 1: "vector", 2: "mixed"}[self.vector],
            self.usage["registers"],
            self.usage["stack"],
            self.warps,
            programs_per_sm(self.usage["registers"], self.warps, self.usage["shared"]),
            access_widths(self.instrs),
            per_thread,
            by_section,
            settings.tile // (32 * self.warps),
            note,
        )


# -- workloads -------------------------------------------------------------------------------------------------
def resnet50_shapes() -> List[Tuple[int, ...]]:
    """ResNet-50's 161 parameter tensors (torchvision's layout: conv, bn weight, bn bias ... fc)."""
    shapes: List[Tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    cin = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            out = width * 4
            shapes += [(width, cin, 1, 1), (width,), (width,), (width, width, 3, 3), (width,), (width,)]
            shapes += [(out, width, 1, 1), (out,), (out,)]
            if b == 0:
                shapes += [(out, cin, 1, 1), (out,), (out,)]
            cin = out
    return shapes + [(1000, 2048), (1000,)]


BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def scenario_of(shape: Tuple[int, ...], itemsize: int, step: int = 1000) -> Tuple[Scenario, int]:
    """(the scenario of a tensor's programs, how many programs) as the host would launch it,
    taking param, state and grads contiguous and 16-byte aligned (fresh allocations)."""
    from fastopt.kernels._table import tile_grid

    settings = kernel_resources._multi_tensor.settings()
    cut = tile_grid(shape, True, settings)
    width = settings.tile if cut.rows == 1 else settings.tile_width
    vector = cut.cols % (16 // itemsize) == 0 and cut.width == width
    stencil = "none" if cut.mode != 2 else ("1d" if cut.rows == 1 else "2d")
    n_dr = 1 + (cut.tile_rows >= 2) + (cut.tile_rows >= 3)
    n_dc = 1 + (cut.tile_cols >= 2) + (cut.tile_cols >= 3)
    return Scenario(vector, stencil, cut.slots > 0, n_dr * n_dc, step), cut.tiles


WORKLOADS = {
    "4 x 4096x4096": [(4096, 4096)] * 4,
    "ResNet-50 (161 tensors)": None,  # filled by resnet50_shapes()
}


SETTINGS = [
    ("1024 lanes (default)", {}),
    ("2048 lanes, 8 warps", dict(tile=2048, num_warps=8, num_warps_16bit=8)),
]


def predict(shapes, dtype: str, compiled: Dict[int, "Compiled"], machine: Machine) -> Dict[str, float]:
    """Predicted time of one step over ``shapes`` (ms): issue, memory floor, the model's time."""
    itemsize = BYTES[dtype]
    per_program: Dict[Tuple[Scenario, int], int] = {}
    warp_instructions = 0.0
    elements = 0
    kinds = set()
    for shape in shapes:
        scenario, programs = scenario_of(shape, itemsize)
        kinds.add(scenario.vector)
        elements += math.prod(shape)
        per_program[(scenario, programs)] = per_program.get((scenario, programs), 0) + 1
    variant = 1 if kinds == {True} else 0 if kinds == {False} else 2
    kernel = compiled[variant]
    for (scenario, programs), count in per_program.items():
        warp_instructions += count * programs * kernel.warps * len(kernel.path(scenario))
    issue = warp_instructions / (machine.sms * SCHEDULERS_PER_SM * machine.clock_ghz * 1e9) * 1e3
    floor = elements * 7 * itemsize / (machine.bandwidth_tbs * 1e12) * 1e3  # read p g m v, write p m v
    return dict(issue=issue, floor=floor, predicted=max(issue, floor), variant=variant)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="Markdown file to write the tables to")
    parser.add_argument("--all-kernels", action="store_true", help="also the other five kernels' figures")
    parser.add_argument("--json", action="store_true", help="the vector paths' figures as JSON, nothing else")
    args = parser.parse_args(argv)
    import triton

    if args.json:
        import json

        found = {}
        for name in ("ladam_step", "ladagrad_step", "lrmsprop_step"):
            for dtype in ("fp32", "bf16"):
                f = Compiled(name, dtype, 1).figures(INTERIOR)
                found[f"{name} {dtype}"] = dataclasses.asdict(f) | {"per_element": f.per_element}
        print(json.dumps(found))
        return 0

    WORKLOADS["ResNet-50 (161 tensors)"] = resnet50_shapes()
    lines: List[str] = []
    out = lines.append
    out(f"triton {triton.__version__}, sm_90 (ptxas), compiled without a GPU, not run.\n")
    out("## Per kernel: common path of an interior tile of a large 2-D tensor (9-point, step 1000)\n")
    out(
        "| kernel | dtype | path | regs | spills | warps | programs/SM | elem/thread | instr/thread | "
        "warp-instr/elem | global accesses |"
    )
    out("|---|---|---|---|---|---|---|---|---|---|---|")
    compiled: Dict[str, Dict[int, Compiled]] = {}
    section_rows = []
    for dtype in ("fp32", "bf16"):
        compiled[dtype] = {v: Compiled("ladam_step", dtype, v) for v in (1, 0, 2)}
        for v in (1, 0):
            f = compiled[dtype][v].figures(dataclasses.replace(INTERIOR, vector=bool(v)))
            out(_row(f))
            section_rows.append(f)
    others = [k for k in kernel_resources.KERNELS if k != "ladam_step"] if args.all_kernels else []
    for name in others:
        vectorized = "VECTOR" in kernel_resources.KERNELS[name][0].arg_names
        for dtype in ("fp32", "bf16"):
            for v in (1, 0) if vectorized else (None,):
                f = Compiled(name, dtype, v).figures(dataclasses.replace(INTERIOR, vector=v == 1))
                out(_row(f))
                if f.note:
                    out(f"|  | | {f.note} | | | | | | | | |")
    alternatives = []
    with kernel_resources._multi_tensor.use_settings(tile=2048, num_warps=8, num_warps_16bit=8):
        for dtype in ("fp32", "bf16"):
            f = Compiled("ladam_step", dtype, 1).figures(INTERIOR)
            alternatives.append(f)
    out(
        "\nAlternative launch settings (not the default): 2048 lanes (64 x 32 tiles), 8 warps, 8 elements per thread:\n"
    )
    out(
        "| kernel | dtype | path | regs | spills | warps | programs/SM | elem/thread | instr/thread | "
        "warp-instr/elem | global accesses |"
    )
    out("|---|---|---|---|---|---|---|---|---|---|---|")
    for f in alternatives:
        out(_row(f))
    out("\n## ladam_step: warp-instructions per element by section (same path)\n")
    names = [n for n, _ in SECTIONS] + ["divisions and sqrt", "element math and streams", "other"]
    out("| dtype | path | " + " | ".join(names) + " | total |")
    out("|---|---|" + "---|" * (len(names) + 1))
    for f in section_rows:
        scale = 32 * f.elements_per_thread
        cells = [f"{f.by_section.get(n, 0) / scale:.2f}" for n in names]
        out(f"| {f.dtype} | {f.variant} | " + " | ".join(cells) + f" | {f.per_element:.2f} |")
    out("\n## Predicted step time (ms) against the memory floor\n")
    out(
        "Machine figures: " + "; ".join(f"{m.name}: {m.source}" for m in MACHINES) + ". Issue time: "
        "warp-instructions / (4 schedulers x SMs x clock); floor: 7 x itemsize bytes per parameter "
        "(read p, g, m, v; write p, m, v) / bandwidth; predicted = max(issue, floor).\n"
    )
    out(
        "| launch settings | workload | dtype | machine | kernel variant | issue | floor | predicted "
        "| predicted / floor |"
    )
    out("|---|---|---|---|---|---|---|---|---|")
    for label, changes in SETTINGS:
        with kernel_resources._multi_tensor.use_settings(**changes):
            variants = (
                compiled if not changes else {d: {v: Compiled("ladam_step", d, v) for v in (1, 0, 2)} for d in compiled}
            )
            for workload, shapes in WORKLOADS.items():
                for dtype in ("fp32", "bf16"):
                    for machine in MACHINES:
                        try:
                            p = predict(shapes, dtype, variants[dtype], machine)
                        except PathError as e:
                            out(f"| {label} | {workload} | {dtype} | {machine.name} | not modeled: {e} | | | | |")
                            continue
                        variant = {0: "generic", 1: "vector", 2: "mixed"}[int(p["variant"])]
                        out(
                            f"| {label} | {workload} | {dtype} | {machine.name} | {variant} | {p['issue']:.3f} | "
                            f"{p['floor']:.3f} | {p['predicted']:.3f} | {p['predicted'] / p['floor']:.2f} |"
                        )
    text = "\n".join(lines)
    print(text)
    if args.out:
        import torch

        from fastopt.benchmarking import environment

        commit = environment(torch.device("cpu"))["commit"]
        with open(args.out, "w") as fh:
            fh.write(f"# Static model of the Triton step kernels (bench/kernel_model.py), commit {commit}\n\n")
            fh.write(text + "\n")
    return 0


def _row(f: KernelFigures) -> str:
    widths = ", ".join(f"{k} {v}" for k, v in sorted(f.widths.items()))
    per_elem = f"{f.per_element:.2f}" if f.per_element is not None else "-"
    per_thread = f.per_thread if f.per_thread is not None else "-"
    return (
        f"| {f.kernel} | {f.dtype} | {f.variant} | {f.registers} | {f.spills} | {f.warps} | {f.programs_per_sm} | "
        f"{f.elements_per_thread} | {per_thread} | {per_elem} | {widths} |"
    )


if __name__ == "__main__":
    sys.exit(main())
