"""The main-loop reader (bench/sass_loop.py) on small hand-written SASS: which loop it picks,
which blocks of it count as one steady-state iteration, and the mix it reports."""

import pytest

from bench import sass_loop

HMMA = "HMMA.16816.F32.BF16 R8, R4, R6, R8"


def sass(*lines: str) -> str:
    """cuobjdump-style text of one function: each line an instruction 16 bytes after the last
    (with its encoding line below, as cuobjdump prints it); "name:" labels the next instruction
    and "{name}" in an instruction stands for that label's address."""
    labels, address = {}, 0
    for line in lines:
        if line.endswith(":"):
            labels[line[:-1]] = address
        else:
            address += 16
    out, address = ["\t\tFunction : kernel"], 0
    for line in lines:
        if line.endswith(":"):
            continue
        text = line.format(**{name: hex(at) for name, at in labels.items()})
        out.append(
            f"        /*{address:04x}*/                   {text} ;   /* 0x000fe200078e00ff */"
        )
        out.append(" " * 90 + "/* 0x000fe20000000000 */")
        address += 16
    return "\n".join(out)


def address_of(lines: tuple[str, ...], label: str) -> int:
    """The address the label ``label`` gives in ``sass(*lines)``."""
    index = lines.index(f"{label}:")
    return 16 * sum(not line.endswith(":") for line in lines[:index])


TAIL_MASK_LOOP = (
    "MOV R0, RZ",
    "loop:",
    "LDSM.16.M88.4 R4, [R2]",
    HMMA,
    HMMA,
    "@P0 BRA {join}",  # full tiles skip the mask
    "FSEL R8, R8, -INF , P1",
    "FSEL R9, R9, -INF , P1",
    "FSEL R10, R10, -INF , P1",
    "join:",
    "MUFU.EX2 R8, R8",
    "FFMA R9, R8, R3, R9",
    "LDGSTS.E.BYPASS.128 [R3], [R4.64]",
    "IADD3 R0, R0, 0x1, RZ",
    "ISETP.GE.AND P2, PT, R0, R5, PT",
    "@!P2 BRA {loop}",
    "EXIT",
)


def test_a_tail_mask_that_full_tiles_bypass_is_left_out():
    lines = TAIL_MASK_LOOP
    it = sass_loop.iteration_of(sass(*lines))
    assert it.scope == "loop"
    assert it.start == address_of(lines, "loop")
    assert it.instructions == 10  # LDSM, 2 HMMA, the guard, then the 6 of the join block
    assert it.mma_shapes == {"HMMA.16816": 2}
    assert it.flop_per_warp == 2 * 4096
    assert it.instr_per_kflop == pytest.approx(10 / 8.192)
    mask = address_of(lines, "loop") + 4 * 16
    assert it.left_out == [sass_loop.Span(mask, mask + 3 * 16, 3)]
    counts = it.counts
    assert (counts["ldsm"], counts["ex2"], counts["ffma"], counts["ldgsts"]) == (1, 1, 1, 1)
    assert (counts["int_addr"], counts["control"], counts["float_other"]) == (2, 2, 0)
    assert sum(counts.values()) + it.mma == it.instructions


def test_a_branch_around_the_next_tiles_copy_is_taken_and_a_divergence_fallback_is_not():
    lines = (
        "loop:",
        HMMA,
        "BRA.DIV ~URZ, {fallback}",
        "SHFL.BFLY PT, R3, R2, 0x1, 0x1f",
        "back:",
        "@!P3 BRA {no_prefetch}",  # the last tile copies nothing
        "LDGSTS.E.BYPASS.128 [R3], [R4.64]",
        "LDGSTS.E.BYPASS.128 [R3+0x800], [R4.64+0x80]",
        "LDGDEPBAR",
        "no_prefetch:",
        "BAR.SYNC.DEFER_BLOCKING 0x0",
        "@P2 BRA {loop}",
        "EXIT",
        "fallback:",  # out of line, as nvcc places it
        "WARPSYNC.ALL",
        "SHFL.BFLY PT, R3, R2, 0x1, 0x1f",
        "MOV R4, R3",
        "BRA {back}",
    )
    it = sass_loop.iteration_of(sass(*lines))
    assert it.counts["ldgsts"] == 2
    assert it.instructions == 9
    fallback = address_of(lines, "fallback")
    assert it.left_out == [sass_loop.Span(fallback, fallback + 4 * 16, 4)]
    assert it.counts["barriers"] == 2  # LDGDEPBAR and BAR; the fallback's WARPSYNC is left out


def test_nested_loops_the_innermost_with_mma_is_the_main_one():
    lines = (
        "outer:",
        "IADD3 R0, R0, 0x1, RZ",
        "inner:",
        HMMA,
        "ISETP.NE.AND P0, PT, R1, RZ, PT",
        "@P0 BRA {inner}",
        "LDG.E R2, [R4.64]",
        HMMA,  # the outer loop does more mma in all, yet its iteration is not the steady state
        "@P1 BRA {outer}",
        "EXIT",
    )
    it = sass_loop.iteration_of(sass(*lines))
    assert it.scope == "loop"
    assert it.start == address_of(lines, "inner")
    assert it.instructions == 3
    assert it.counts["ldg"] == 0  # the outer loop's load is not part of it
    assert it.inner_loops == []


def test_a_copy_loop_inside_the_main_loop_counts_one_trip():
    lines = (
        "loop:",
        HMMA,
        HMMA,
        "@!P0 BRA {done}",  # the copy loop's zero-trip guard
        "copy:",
        "LDGSTS.E.BYPASS.128 [R3], [R4.64]",
        "IADD3 R4, R4, 0x10, RZ",
        "@P1 BRA {copy}",
        "done:",
        "@P2 BRA {loop}",
        "EXIT",
    )
    it = sass_loop.iteration_of(sass(*lines))
    assert it.start == address_of(lines, "loop")
    copy = address_of(lines, "copy")
    assert it.inner_loops == [sass_loop.Span(copy, copy + 3 * 16, 3)]
    assert it.instructions == 7
    assert it.counts["ldgsts"] == 1
    assert it.left_out == []


def test_of_two_loops_with_the_same_mma_the_leaner_is_the_steady_state():
    lines = (
        "masked:",  # the masked tiles' loop, as FA2 peels it
        HMMA,
        "FSEL R8, R8, -INF , P1",
        "FSEL R9, R9, -INF , P1",
        "@P0 BRA {masked}",
        "plain:",
        HMMA,
        "@P3 BRA {plain}",
        "EXIT",
    )
    it = sass_loop.iteration_of(sass(*lines))
    assert it.start == address_of(lines, "plain")
    assert it.instructions == 2


def test_a_kernel_without_a_loop_is_counted_whole_but_its_side_blocks():
    lines = (
        "@P0 EXIT",  # rows past the end leave; the others run on
        "LDSM.16.M88.4 R4, [R2]",
        HMMA,
        HMMA,
        "@P1 BRA {store}",
        "FSEL R8, R8, -INF , P1",
        "store:",
        "STG.E.128 [R2.64], R8",
        "EXIT",
    )
    it = sass_loop.iteration_of(sass(*lines))
    assert it.scope == "kernel"
    assert it.start == 0
    assert it.instructions == 7
    assert it.counts["memory_other"] == 1
    assert it.left_out == [sass_loop.Span(5 * 16, 6 * 16, 1)]


def test_hgmma_flop_per_warp_is_a_quarter_of_the_warpgroups():
    lines = (
        "loop:",
        "WARPGROUP.ARRIVE",
        *["HGMMA.64x144x16.F32.BF16 R24, gdesc[UR4], R24, gsb0"] * 2,
        *["HGMMA.64x96x16.F32.BF16 R88, R120, gdesc[UR8], R88"] * 3,
        "WARPGROUP.DEPBAR.LE gsb0, 0x0",
        "MUFU.SIN R2, R3",
        "MUFU.COS R4, R3",
        "MUFU.RCP R5, R3",
        "@P0 BRA {loop}",
        "EXIT",
    )
    it = sass_loop.iteration_of(sass(*lines))
    assert it.mma_shapes == {"HGMMA.64x144x16": 2, "HGMMA.64x96x16": 3}
    assert it.flop_per_warp == 2 * (2 * 64 * 144 * 16 // 4) + 3 * (2 * 64 * 96 * 16 // 4)
    assert (it.counts["sin"], it.counts["cos"], it.counts["mufu_other"]) == (1, 1, 1)
    assert it.counts["barriers"] == 2


@pytest.mark.parametrize(
    ("opcode", "shape"),
    [
        ("HMMA.16816.F32.BF16", ("HMMA.16816", 4096)),
        ("HMMA.1688.F32.TF32", ("HMMA.1688", 2048)),
        ("HGMMA.64x16x16.F32.BF16", ("HGMMA.64x16x16", 8192)),
        ("IMAD.WIDE.U32", None),
    ],
)
def test_mma_shapes(opcode, shape):
    assert sass_loop.mma_shape(opcode) == shape


def test_nvdisasm_labels_read_like_cuobjdump_addresses():
    labeled = "\n".join(
        [
            ".L_x_0:",
            "        /*0000*/                   HMMA.16816.F32.BF16 R8, R4, R6, R8 ;",
            "        /*0010*/                   @P0 BRA `(.L_x_0) ;",
            "        /*0020*/                   EXIT ;",
        ]
    )
    plain = sass(HMMA, "@P0 BRA 0x0", "EXIT")
    assert sass_loop.iteration_of(labeled) == sass_loop.iteration_of(plain)
    assert sass_loop.iteration_of(labeled).scope == "loop"


def test_branch_forms():
    instructions = sass_loop.parse(
        sass(
            "BRA !P4, {end}", "@!PT BRA {end}", "BRA.DIV ~URZ, {end}", "BRA {end}", "end:", "EXIT"
        ).splitlines()
    )
    graph = sass_loop.blocks(instructions)
    assert [graph[a].successors for a in sorted(graph)] == [
        [0x40, 0x10],  # a condition operand: taken or not
        [0x20],  # never taken
        [0x40, 0x30],  # divergent or not
        [0x40],
        [],
    ]
