"""The instruction mix of a kernel's main loop, read from its SASS (``cuobjdump -sass`` or
``nvdisasm`` text of one function): instructions -> basic blocks -> natural loops -> one
steady-state iteration of the innermost loop that holds tensor-core mma.

**Which loop.** Back edges are edges to a block that dominates their source; each one closes a
natural loop (loops sharing a header are one loop). The candidates are the innermost loops that
hold HMMA/HGMMA (no loop inside them does). Of those, the one whose iteration does the most mma
FLOP, then the fewest instructions: a kernel that gives its masked tiles a loop of their own runs
the leaner copy in steady state. With no loop holding mma (a fully unrolled kernel, or one without
mma), the whole kernel from its entry to an exit is counted the same way.

**Which blocks of it.** A full tile runs every mma and copies the next tile's data; of the paths
from the loop header to a back edge that do both (the most mma FLOP, then the most global-load
instructions: LDGSTS, LDG, TMA), the count follows the one with the fewest instructions. The blocks
it does not pass are *left out* and reported: tail masks, divergence fallbacks (``BRA.DIV``),
first/last-tile branches and slow paths, i.e. side blocks that a branch bypasses and that hold
neither mma nor loads. A loop nested in the main loop (a runtime copy loop, say) counts one trip,
its shortest (its own slow paths left out too). Limits: a static count cannot tell a first-tile-only
block that loads (e.g. staging q) from per-tile work, and one trip of a nested loop stands for
however many it runs.

**FLOP per warp.** HMMA.MNK is a warp instruction: 2*M*N*K FLOP (HMMA.16816 = 16x8x16 -> 4096).
HGMMA.64xNx16 is issued by each of the 4 warps of a warpgroup for one 64xNx16 product: 2*64*N*16 / 4
per warp. Instructions are counted per warp too, so instructions per kFLOP compares any two kernels.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

_LINE = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s+(?:@(!?U?P[0-9T])\s+)?([A-Z][\w.]*)\s*([^;]*?)\s*;")
_LABEL = re.compile(r"^\s*([.\w$]+):\s*(?://.*)?$")
_TARGET = re.compile(r"`?\(?(\.L_x_\d+|\.L_\w+)\)?`?|(?<![\w.])(0x[0-9a-fA-F]+)\b")

BRANCHES = {"BRA", "JMP"}  # direct: one target, fall through when conditional
INDIRECT = {"BRX", "JMX"}  # targets only where the disassembler lists them
ENDS = {"EXIT", "RET", "KILL"}
MMA = {"HMMA", "HGMMA"}
COPIES = {"LDGSTS", "LDG", "UTMALDG", "UBLKCP"}  # global loads: the tile data a loop moves

# One category per mnemonic (the part before the first dot); whatever is not listed is "other".
CATEGORIES = {
    "ldsm": {"LDSM"},
    "ldgsts": {"LDGSTS"},
    "ldg": {"LDG"},
    "memory_other": {
        "LDS", "STS", "STSM", "LD", "ST", "STG", "LDL", "STL", "LDC", "ULDC", "ATOM", "ATOMG",
        "ATOMS", "RED", "UTMALDG", "UTMASTG", "UBLKCP", "UTMAPF", "UTMACCTL", "CCTL",
    },
    "ffma": {"FFMA"},
    "fmul": {"FMUL"},
    "fadd": {"FADD"},
    "float_other": {
        "FMNMX", "FSETP", "FSEL", "FSET", "FCHK", "FRND", "FSWZADD", "F2F", "F2FP", "F2I", "I2F",
        "I2FP", "F2IP", "HADD2", "HFMA2", "HMUL2", "HMNMX2", "HSETP2", "HSET2", "DADD", "DMUL",
        "DFMA", "DSETP",
    },
    "int_addr": {
        "IMAD", "IADD3", "IADD", "LEA", "SHF", "SHL", "SHR", "LOP3", "LOP", "ISETP", "IMNMX",
        "IABS", "SEL", "MOV", "PRMT", "POPC", "FLO", "BREV", "BMSK", "SGXT", "VIADD", "VIMNMX",
        "VIADDMNMX", "IDP", "PLOP3", "P2R", "R2P", "CS2R", "S2R", "S2UR", "R2UR", "UIADD3", "UIMAD",
        "UMOV", "ULEA", "USHF", "ULOP3", "ULOP", "UISETP", "USEL", "UPRMT", "UPLOP3", "UIMNMX",
        "UFLO", "UPOPC", "UBREV", "USGXT", "UBMSK", "UP2UR", "UR2UP", "UIABS", "UVIADD",
    },
    "barriers": {
        "BAR", "DEPBAR", "LDGDEPBAR", "WARPSYNC", "BSSY", "BSYNC", "MEMBAR", "FENCE", "ERRBAR",
        "SYNCS", "ARRIVES", "WARPGROUP", "ACQBULK",
    },
    "control": {
        "BRA", "BRX", "JMP", "JMX", "CALL", "RET", "EXIT", "KILL", "BREAK", "BPT", "YIELD",
        "NANOSLEEP", "VOTE", "VOTEU", "ELECT", "MATCH", "ENDCOLLECTIVE",
    },
}  # fmt: skip
_CATEGORY = {name: category for category, names in CATEGORIES.items() for name in names}
MUFU = ("ex2", "sin", "cos")  # MUFU.EX2 / .SIN / .COS apart; the other MUFU ops are "mufu_other"


@dataclass(frozen=True)
class Instruction:
    """One SASS instruction: ``guard`` is its predicate ("" when unpredicated, e.g. "!P0")."""

    address: int
    opcode: str  # with modifiers, e.g. "HMMA.16816.F32.BF16"
    operands: str = ""
    guard: str = ""
    targets: tuple[int, ...] = ()  # resolved branch (or BSSY reconvergence) targets

    @property
    def mnemonic(self) -> str:
        """The opcode without modifiers ("HMMA")."""
        return self.opcode.split(".")[0]

    @property
    def conditional(self) -> bool:
        """Whether a branch or exit may fall through: a guard other than PT, or a branch with a
        condition operand before its target (``BRA !P4, 0x..``, ``BRA.DIV ~URZ, 0x..``)."""
        return self.guard not in ("", "PT") or (self.mnemonic in BRANCHES and "," in self.operands)

    @property
    def category(self) -> str:
        """The mix category (see CATEGORIES; "mma", "ex2", "sin", "cos", "mufu_other")."""
        if self.mnemonic in MMA:
            return "mma"
        if self.mnemonic == "MUFU":
            kind = self.opcode.split(".")[1].lower() if "." in self.opcode else ""
            return kind if kind in MUFU else "mufu_other"
        return _CATEGORY.get(self.mnemonic, "other")

    @property
    def copies(self) -> int:
        """1 for a global load (the data a main loop moves), else 0."""
        return int(self.mnemonic in COPIES)


def mma_shape(opcode: str) -> tuple[str, int] | None:
    """The shape name and FLOP per warp of an mma opcode (None for anything else):
    "HMMA.16816.F32.BF16" -> ("HMMA.16816", 4096); "HGMMA.64x96x16.F32.BF16" ->
    ("HGMMA.64x96x16", 2*64*96*16 // 4), a warpgroup's product shared by its 4 warps."""
    parts = opcode.split(".")
    if parts[0] == "HGMMA" and (m := re.fullmatch(r"(\d+)x(\d+)x(\d+)", parts[1])):
        rows, cols, depth = map(int, m.groups())
        return f"HGMMA.{parts[1]}", 2 * rows * cols * depth // 4
    if parts[0] == "HMMA" and len(parts) > 1 and (m := re.fullmatch(r"(16|8)(8)(\d+)", parts[1])):
        rows, cols, depth = map(int, m.groups())
        return f"HMMA.{parts[1]}", 2 * rows * cols * depth
    return None


def parse(lines: Iterable[str]) -> list[Instruction]:
    """The instructions of one function's SASS text, branch targets resolved to addresses (hex
    targets as cuobjdump writes them, ``.L_x_N`` labels as nvdisasm does)."""
    raw: list[tuple[int, str, str, str]] = []
    labels: dict[str, int] = {}
    pending: list[str] = []
    for line in lines:
        if m := _LINE.match(line):
            address = int(m.group(1), 16)
            labels.update(dict.fromkeys(pending, address))
            pending = []
            raw.append((address, m.group(3), m.group(4), m.group(2) or ""))
        elif m := _LABEL.match(line):
            pending.append(m.group(1))
    out = []
    for address, opcode, operands, guard in raw:
        mnemonic = opcode.split(".")[0]
        targets: tuple[int, ...] = ()
        if mnemonic in BRANCHES | INDIRECT | {"BSSY", "CALL"}:
            found = []
            for label, number in _TARGET.findall(operands):
                if label and label in labels:
                    found.append(labels[label])
                elif number and mnemonic not in INDIRECT:  # BRX's number is an offset
                    found.append(int(number, 16))
            # A direct branch names one target, its last operand; BRX lists all of them.
            targets = tuple(found) if mnemonic in INDIRECT else tuple(found[-1:])
        out.append(Instruction(address, opcode, operands, guard, targets))
    return out


@dataclass
class Block:
    """A basic block: straight-line instructions from ``start`` to ``end`` (exclusive)."""

    start: int
    instructions: list[Instruction]
    successors: list[int] = field(default_factory=list)

    @property
    def end(self) -> int:
        """The address after the last instruction (16 bytes each from sm_70 on)."""
        return self.instructions[-1].address + 16


def blocks(instructions: list[Instruction]) -> dict[int, Block]:
    """Basic blocks by start address: a block starts at the entry, at every branch or BSSY
    target and after every branch or exit; it falls through unless it ends in an unconditional
    branch or exit. CALL falls through (the callee returns), so subroutines are never entered."""
    if not instructions:
        return {}
    addresses = {i.address for i in instructions}
    leaders = {instructions[0].address}
    for index, insn in enumerate(instructions):
        if insn.mnemonic in BRANCHES | INDIRECT | {"BSSY"}:
            leaders.update(t for t in insn.targets if t in addresses)
        if insn.mnemonic in BRANCHES | INDIRECT | ENDS and index + 1 < len(instructions):
            leaders.add(instructions[index + 1].address)
    found: dict[int, Block] = {}
    current = None
    for insn in instructions:
        if insn.address in leaders:
            current = found[insn.address] = Block(insn.address, [])
        current.instructions.append(insn)
    starts = list(found)
    for index, start in enumerate(starts):
        block = found[start]
        last = block.instructions[-1]
        after = starts[index + 1] if index + 1 < len(starts) else None
        never = last.guard == "!PT"  # a branch that is never taken
        if last.mnemonic in BRANCHES | INDIRECT and not never:
            block.successors = [t for t in last.targets if t in found]
            falls = last.conditional
        else:
            falls = not (last.mnemonic in ENDS and not last.conditional)
        if falls and after is not None and after not in block.successors:
            block.successors.append(after)
    return found


def dominators(graph: dict[int, Block], entry: int) -> dict[int, int]:
    """Immediate dominators of the blocks reachable from ``entry`` (Cooper, Harvey and Kennedy's
    iteration over reverse postorder); the entry maps to itself."""
    order: list[int] = []
    seen = {entry}
    stack = [(entry, iter(graph[entry].successors))]
    while stack:
        node, successors = stack[-1]
        nxt = next((s for s in successors if s not in seen), None)
        if nxt is None:
            order.append(node)
            stack.pop()
        else:
            seen.add(nxt)
            stack.append((nxt, iter(graph[nxt].successors)))
    rpo = order[::-1]
    index = {node: i for i, node in enumerate(rpo)}
    predecessors: dict[int, list[int]] = {node: [] for node in rpo}
    for node in rpo:
        for successor in graph[node].successors:
            predecessors[successor].append(node)
    idom = {entry: entry}
    changed = True
    while changed:
        changed = False
        for node in rpo[1:]:
            done = [p for p in predecessors[node] if p in idom]
            new = done[0]
            for other in done[1:]:
                a, b = new, other
                while a != b:
                    while index[a] > index[b]:
                        a = idom[a]
                    while index[b] > index[a]:
                        b = idom[b]
                new = a
            if idom.get(node) != new:
                idom[node] = new
                changed = True
    return idom


@dataclass(frozen=True)
class Loop:
    """A natural loop: its header and body (block starts, the header included)."""

    header: int
    body: frozenset[int]


def natural_loops(graph: dict[int, Block], entry: int) -> list[Loop]:
    """The natural loops of the blocks reachable from ``entry``, one per header."""
    idom = dominators(graph, entry)

    def dominates(a: int, b: int) -> bool:
        while b != a and idom[b] != b:
            b = idom[b]
        return a == b

    predecessors: dict[int, list[int]] = {node: [] for node in idom}
    for node in idom:
        for successor in graph[node].successors:
            predecessors[successor].append(node)
    bodies: dict[int, set[int]] = {}
    for node in idom:
        for header in graph[node].successors:
            if dominates(header, node):  # a back edge node -> header
                body = bodies.setdefault(header, {header})
                work = [node]
                while work:
                    current = work.pop()
                    if current not in body:
                        body.add(current)
                        work.extend(predecessors[current])
    return [Loop(header, frozenset(body)) for header, body in sorted(bodies.items())]


@dataclass(frozen=True)
class Span:
    """An address range of blocks and how many instructions it holds."""

    start: int
    end: int
    instructions: int

    def to_dict(self) -> dict[str, Any]:
        """As hex addresses, e.g. {"start": "0x2fc0", "end": "0x33c0", "instructions": 64}."""
        return {"start": hex(self.start), "end": hex(self.end), "instructions": self.instructions}


@dataclass
class Iteration:
    """One steady-state iteration of a kernel's main loop (``scope`` "loop") or, without a loop
    that holds mma, one pass through the kernel (``scope`` "kernel"), per warp."""

    scope: str
    start: int  # the loop header (or kernel entry) ...
    end: int  # ... to the end of its last block
    instructions: int
    mma_shapes: dict[str, int]
    flop_per_warp: int
    counts: dict[str, int]
    left_out: list[Span]
    inner_loops: list[Span]  # loops nested in the main loop, one trip each

    @property
    def mma(self) -> int:
        """HMMA + HGMMA instructions."""
        return sum(self.mma_shapes.values())

    @property
    def instr_per_kflop(self) -> float | None:
        """Instructions per 1000 FLOP of mma (None without mma)."""
        return self.instructions * 1000 / self.flop_per_warp if self.flop_per_warp else None

    def to_dict(self) -> dict[str, Any]:
        """The ``loop`` fields of inspect.json."""
        ratio = self.instr_per_kflop
        return {
            "scope": self.scope,
            "start": hex(self.start),
            "end": hex(self.end),
            "instructions": self.instructions,
            "mma": self.mma,
            "mma_shapes": self.mma_shapes,
            "flop_per_warp": self.flop_per_warp,
            "instr_per_kflop": round(ratio, 3) if ratio is not None else None,
            **self.counts,
            "left_out": [span.to_dict() for span in self.left_out],
            "inner_loops": [span.to_dict() for span in self.inner_loops],
        }


def _block_score(block: Block) -> tuple[int, int, int]:
    flop = sum(shape[1] for i in block.instructions if (shape := mma_shape(i.opcode)))
    return flop, sum(i.copies for i in block.instructions), len(block.instructions)


@dataclass
class _Path:
    """The blocks one pass through a region runs, with its totals (mma FLOP, global loads,
    instructions) and the nested loops it enters, each with its own trip."""

    flop: int = 0
    copies: int = 0
    instructions: int = 0
    blocks: list[int] = field(default_factory=list)
    loops: list[tuple[Loop, _Path]] = field(default_factory=list)

    def all_blocks(self) -> set[int]:
        found = set(self.blocks)
        for _, trip in self.loops:
            found |= trip.all_blocks()
        return found


def _best_path(
    graph: dict[int, Block],
    entry: int,
    body: frozenset[int],
    loops: list[Loop],
    is_loop: bool,
    prefer_copies: bool,
) -> _Path:
    """The pass through ``body`` from ``entry`` with the most mma FLOP, then (``prefer_copies``)
    the most global loads, then the fewest instructions, to a back edge to ``entry``
    (``is_loop``) or to an exit. A loop nested in ``body`` is one step: its shortest trip."""
    inner = [loop for loop in loops if loop.header != entry and loop.body < body]
    outermost = [a for a in inner if not any(a.body < b.body for b in inner)]
    owner = {block: loop for loop in outermost for block in loop.body}
    trips = {
        loop.header: _best_path(graph, loop.header, loop.body, inner, True, prefer_copies=False)
        for loop in outermost
    }

    def members(step: int) -> frozenset[int]:
        return owner[step].body if step in trips else frozenset((step,))

    def successors(step: int) -> list[int]:
        found: list[int] = []
        for member in sorted(members(step)):
            for successor in graph[member].successors:
                if successor in body and successor not in members(step) and successor != entry:
                    target = owner[successor].header if successor in owner else successor
                    if target not in found:
                        found.append(target)
        return found

    def ends(step: int) -> bool:
        if is_loop:
            return any(entry in graph[m].successors for m in members(step))
        return any(not graph[m].successors for m in members(step))

    def score(step: int) -> tuple[int, int, int]:
        if step in trips:
            trip = trips[step]
            return trip.flop, trip.copies, trip.instructions
        return _block_score(graph[step])

    # Steps in topological order (depth-first postorder, reversed); an edge that closes a cycle
    # other than through the entry (an irreducible graph) is ignored.
    order: list[int] = []
    state = {entry: False}  # False while on the stack, True when finished
    stack = [(entry, iter(successors(entry)))]
    while stack:
        step, pending = stack[-1]
        nxt = next((s for s in pending if s not in state), None)
        if nxt is None:
            state[step] = True
            order.append(step)
            stack.pop()
        else:
            state[nxt] = False
            stack.append((nxt, iter(successors(nxt))))
    order.reverse()
    position = {step: i for i, step in enumerate(order)}

    def key(total: tuple[int, int, int]) -> tuple[int, int, int]:
        flop, copies, instructions = total
        return flop, copies if prefer_copies else 0, -instructions

    best: dict[int, tuple[tuple[int, int, int], int | None]] = {entry: (score(entry), None)}
    finish = None
    for step in order:
        if step not in best:
            continue
        total = best[step][0]
        if ends(step) and (finish is None or key(total) > key(best[finish][0])):
            finish = step
        for successor in successors(step):
            if position[successor] <= position[step]:
                continue
            candidate = tuple(a + b for a, b in zip(total, score(successor), strict=True))
            if successor not in best or key(candidate) > key(best[successor][0]):
                best[successor] = (candidate, step)
    steps = []
    at: int | None = entry if finish is None else finish
    while at is not None:
        steps.append(at)
        at = best[at][1]
    steps.reverse()
    flop, copies, instructions = best[steps[-1]][0]
    return _Path(
        flop,
        copies,
        instructions,
        [s for s in steps if s not in trips],
        [(owner[s], trips[s]) for s in steps if s in trips],
    )


def _spans(graph: dict[int, Block], starts: Iterable[int]) -> list[Span]:
    """Blocks merged into address ranges where one ends where the next starts."""
    spans: list[Span] = []
    for start in sorted(starts):
        block = graph[start]
        if spans and spans[-1].end == block.start:
            last = spans.pop()
            spans.append(Span(last.start, block.end, last.instructions + len(block.instructions)))
        else:
            spans.append(Span(block.start, block.end, len(block.instructions)))
    return spans


def _iteration(graph: dict[int, Block], scope: str, region: Loop, path: _Path) -> Iteration:
    counted = path.all_blocks()
    shapes: dict[str, int] = {}
    counts = dict.fromkeys([*CATEGORIES, *MUFU, "mufu_other", "other"], 0)
    for start in sorted(counted):
        for insn in graph[start].instructions:
            if insn.category == "mma":  # a shape mma_shape does not know counts, without FLOP
                shape = mma_shape(insn.opcode)
                name = shape[0] if shape else ".".join(insn.opcode.split(".")[:2])
                shapes[name] = shapes.get(name, 0) + 1
            else:
                counts[insn.category] += 1
    return Iteration(
        scope=scope,
        start=region.header,
        end=max(graph[b].end for b in region.body),
        instructions=path.instructions,
        mma_shapes=dict(sorted(shapes.items())),
        flop_per_warp=path.flop,
        counts=counts,
        left_out=_spans(graph, region.body - counted),
        inner_loops=[
            Span(min(loop.body), max(graph[b].end for b in loop.body), trip.instructions)
            for loop, trip in path.loops
        ],
    )


def main_loop(instructions: list[Instruction]) -> Iteration | None:
    """One steady-state iteration of the kernel's main loop (see the module's rules), or None
    for a function without instructions."""
    graph = blocks(instructions)
    if not graph:
        return None
    entry = next(iter(graph))
    loops = natural_loops(graph, entry)
    has_mma = {
        loop.header: any(i.mnemonic in MMA for b in loop.body for i in graph[b].instructions)
        for loop in loops
    }
    candidates = [
        loop
        for loop in loops
        if has_mma[loop.header]
        and not any(other.body < loop.body and has_mma[other.header] for other in loops)
    ]
    if candidates:
        passes = [
            (loop, _best_path(graph, loop.header, loop.body, loops, True, True))
            for loop in candidates
        ]
        loop, path = max(passes, key=lambda pair: (pair[1].flop, -pair[1].instructions))
        return _iteration(graph, "loop", loop, path)
    reachable = frozenset(dominators(graph, entry))
    kernel = Loop(entry, reachable)
    return _iteration(
        graph, "kernel", kernel, _best_path(graph, entry, reachable, loops, False, True)
    )


def iteration_of(text: str) -> Iteration | None:
    """``main_loop`` of one function's SASS text."""
    return main_loop(parse(text.splitlines()))
