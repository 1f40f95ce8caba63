"""x86 tensor intrinsics."""

from __future__ import annotations

import functools

__all__ = [
    "DOT_INT16_LANES",
    "dot_int16_pairs",
    "dot_u8s8_quads",
    "dot_u8s7_quads",
    "SEVEN_BIT_WEIGHT",
    "dot_bf16_pairs",
    "bf16_dot_llvm",
    "bf16_bits",
    "bf16_value",
    "transpose_block",
    "AMX_TILES",
    "AMX_ROWS",
    "AMX_ROW_BYTES",
    "AMX_PRODUCTS",
    "amx_tile_config",
    "amx_dot",
]

#: int32 lanes of a 256-bit register: the output channels one :func:`dot_int16_pairs` call updates.
DOT_INT16_LANES = 8


@functools.cache
def dot_int16_pairs() -> str:
    """The name of the AVX2 tensor intrinsic ``c[0:8] += sum_k a[k] * b[0:8, k]`` over ``k < 2``, int16 operands
    into int32: one ``vpmaddwd`` of the broadcast pair ``a`` by eight channels' pairs ``b``. Exact: unlike
    ``vpmaddubsw``, its pair sums cannot saturate. Registered with TVM on the first call."""
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    name = "fxopt_avx2_dot_8x2_i16"

    @T.prim_func(s_tir=True)
    def description(
        a: T.Buffer((2,), "int16", offset_factor=1),
        b: T.Buffer((8, 2), "int16", offset_factor=1),
        c: T.Buffer((8,), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(c[0:8], a[0:2], b[0:8, 0:2])
            T.writes(c[0:8])
            for i in T.serial(0, 8):
                for k in T.serial(0, 2):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        c[vi] = c[vi] + T.cast(a[vk], "int32") * T.cast(b[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def implementation(
        a: T.Buffer((2,), "int16", offset_factor=1),
        b: T.Buffer((8, 2), "int16", offset_factor=1),
        c: T.Buffer((8,), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(c[0:8], a[0:2], b[0:8, 0:2])
            T.writes(c[0:8])
            pair = T.reinterpret(a.vload([0], "int16x2"), dtype="int32")
            c[T.ramp(T.int32(0), 1, 8)] += T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                T.reinterpret(T.broadcast(pair, 8), dtype="int16x16"),
                b.vload([0, 0], dtype="int16x16"),
                dtype="int32x8",
            )

    TensorIntrin.register(name, description, implementation)
    return name


@functools.cache
def dot_u8s8_quads(lanes: int, a_scope: str = "global") -> str:
    """The name of the VNNI tensor intrinsic ``c[0:lanes] += sum_k a[k] * b[0:lanes, k]`` over ``k < 4``, ``a``
    uint8 and ``b`` int8 into int32: one ``vpdpbusd`` of the broadcast quad ``a`` by ``lanes`` channels' quads
    (16: AVX-512 VNNI; 8: AVX-VNNI or AVX-512 VNNI's 256-bit form). Exact: its four products (at most 255 x 128)
    are summed into int32 without saturation (``vpdpbusds`` would saturate). ``a_scope``: where ``a`` lives (a
    kernel's own ``"local"`` tile, as attention's softmax weights). Registered with TVM on the first call."""
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    name = f"fxopt_vnni_dot_{lanes}x4_u8s8" + ("" if a_scope == "global" else f"_{a_scope}")
    llvm_intrinsic = {16: "llvm.x86.avx512.vpdpbusd.512", 8: "llvm.x86.avx512.vpdpbusd.256"}[lanes]

    @T.prim_func(s_tir=True)
    def description(
        a: T.Buffer((4,), "uint8", offset_factor=1, scope=a_scope),
        b: T.Buffer((lanes, 4), "int8", offset_factor=1),
        c: T.Buffer((lanes,), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(c[0:lanes], a[0:4], b[0:lanes, 0:4])
            T.writes(c[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        c[vi] = c[vi] + T.cast(a[vk], "int32") * T.cast(b[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def implementation(
        a: T.Buffer((4,), "uint8", offset_factor=1, scope=a_scope),
        b: T.Buffer((lanes, 4), "int8", offset_factor=1),
        c: T.Buffer((lanes,), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(c[0:lanes], a[0:4], b[0:lanes, 0:4])
            T.writes(c[0:lanes])
            quad = T.reinterpret(a.vload([0], "uint8x4"), dtype="int32")
            # The byte operands as bytes: the LLVM TVM 0.27 links declares them <64 x i8> (TVM's own
            # dot_16x4_vnni, passing <16 x i32>, no longer verifies).
            c[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(llvm_intrinsic),
                c.vload([0], dtype=f"int32x{lanes}"),
                T.reinterpret(T.broadcast(quad, lanes), dtype=f"int8x{lanes * 4}"),
                b.vload([0, 0], dtype=f"int8x{lanes * 4}"),
                dtype=f"int32x{lanes}",
            )

    # override: dot_u8s8_quads(16) and dot_u8s8_quads(16, "global") are one intrinsic the cache keys apart
    TensorIntrin.register(name, description, implementation, override=True)
    return name


#: The largest weight magnitude :func:`dot_u8s7_quads` multiplies exactly: a pair of products of unsigned bytes
#: (at most 255) by weights of at most 64 sums to at most 32640, inside ``vpmaddubsw``'s int16.
SEVEN_BIT_WEIGHT = 64


@functools.cache
def dot_u8s7_quads() -> str:
    """The name of the AVX2 tensor intrinsic ``c[0:8] += sum_k a[k] * b[0:8, k]`` over ``k < 4``, ``a`` uint8 and
    ``b`` int8 weights of at most :data:`SEVEN_BIT_WEIGHT` in magnitude, into int32: VNNI's ``vpdpbusd`` as AVX2
    has it, ``vpmaddubsw`` (the broadcast quad by eight channels' quads: adjacent products summed into int16),
    ``vpmaddwd`` by ones (the two int16 sums of a lane into int32), ``vpaddd``: four multiply-adds a lane in three
    instructions where :func:`dot_int16_pairs` gives two in two. Exact only for such weights: ``vpmaddubsw``
    saturates its int16 sums, which full-range weights (255 x 128 x 2) overflow. Registered with TVM on the first
    call."""
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    name = "fxopt_avx2_dot_8x4_u8s7"
    description = TensorIntrin.get(dot_u8s8_quads(8)).desc  # the same sums as VNNI's 8 lanes

    @T.prim_func(s_tir=True)
    def implementation(
        a: T.Buffer((4,), "uint8", offset_factor=1),
        b: T.Buffer((8, 4), "int8", offset_factor=1),
        c: T.Buffer((8,), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(c[0:8], a[0:4], b[0:8, 0:4])
            T.writes(c[0:8])
            quad = T.reinterpret(a.vload([0], "uint8x4"), dtype="int32")
            pairs = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
                T.reinterpret(T.broadcast(quad, 8), dtype="int8x32"),
                b.vload([0, 0], dtype="int8x32"),
                dtype="int16x16",
            )
            c[T.ramp(T.int32(0), 1, 8)] += T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                pairs,
                T.broadcast(T.int16(1), 16),
                dtype="int32x8",
            )

    TensorIntrin.register(name, description, implementation)
    return name


@functools.cache
def dot_bf16_pairs(lanes: int) -> str:
    """The name of the AVX-512 BF16 tensor intrinsic ``c[0:lanes] += sum_k a[k] * b[0:lanes, k]`` over ``k < 2``,
    bfloat16 operands (their bits, as uint16) into float32: one ``vdpbf16ps`` of the broadcast pair ``a`` by
    ``lanes`` channels' pairs ``b``; each product is exact in float32, added in turn (denormals flushed to zero). A
    kernel using it links :func:`bf16_dot_llvm` (``pragma_import_llvm`` on a loop around it). Registered with TVM
    on the first call."""
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    name = f"fxopt_avx512_bf16_dot_{lanes}x2"

    @T.prim_func(s_tir=True)
    def description(
        a: T.Buffer((2,), "uint16", offset_factor=1),
        b: T.Buffer((lanes, 2), "uint16", offset_factor=1),
        c: T.Buffer((lanes,), "float32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(c[0:lanes], a[0:2], b[0:lanes, 0:2])
            T.writes(c[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, 2):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        c[vi] = c[vi] + bf16_value(a[vk]) * bf16_value(b[vi, vk])

    @T.prim_func(s_tir=True)
    def implementation(
        a: T.Buffer((2,), "uint16", offset_factor=1),
        b: T.Buffer((lanes, 2), "uint16", offset_factor=1),
        c: T.Buffer((lanes,), "float32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(c[0:lanes], a[0:2], b[0:lanes, 0:2])
            T.writes(c[0:lanes])
            pair = T.reinterpret(a.vload([0], "uint16x2"), dtype="int32")
            c[T.ramp(T.int32(0), 1, lanes)] = T.call_pure_extern(
                f"float32x{lanes}",
                _BF16_DOT_FUNCTION.format(lanes=lanes),
                c.vload([0], dtype=f"float32x{lanes}"),
                T.broadcast(pair, lanes),
                T.reinterpret(b.vload([0, 0], dtype=f"uint16x{lanes * 2}"), dtype=f"int32x{lanes}"),
            )

    TensorIntrin.register(name, description, implementation)
    return name


def bf16_value(bits):
    """The float32 value of bfloat16 ``bits`` (a uint16 TIR expression): its 16 bits, then 16 zero bits."""
    from tvm import tirx

    return tirx.reinterpret("float32", tirx.shift_left(bits.astype("uint32"), tirx.const(16, "uint32")))


def bf16_bits(value):
    """The bits of float32 ``value`` (a TIR expression) rounded to bfloat16, to nearest with ties to even as
    PyTorch rounds (NaN stays a NaN), as uint16. (TVM's own cast, by its bfloat16 legalization, rounds
    differently.)"""
    from tvm import tirx

    bits = tirx.reinterpret("uint32", value)
    odd = tirx.bitwise_and(tirx.shift_right(bits, tirx.const(16, "uint32")), tirx.const(1, "uint32"))
    rounded = tirx.shift_right(bits + tirx.const(0x7FFF, "uint32") + odd, tirx.const(16, "uint32"))
    return tirx.Select(value != value, tirx.const(0x7FC0, "uint32"), rounded).astype("uint16")


_BF16_DOT_FUNCTION = "fxopt_vdpbf16ps_{lanes}"


def bf16_dot_llvm(lanes: int) -> str:
    """LLVM IR defining the function :func:`dot_bf16_pairs` calls: ``vdpbf16ps`` on its operands as bfloat16
    vectors. TVM's TIR has no LLVM ``bfloat`` type (it legalizes bfloat16 to uint16 storage and float32 arithmetic,
    and crashes emitting it), so the intrinsic passes int32 vectors to this inlined function, which bitcasts them."""
    bits = lanes * 32
    vector, pairs, words = f"<{lanes} x float>", f"<{lanes * 2} x bfloat>", f"<{lanes} x i32>"
    intrinsic = f"@llvm.x86.avx512bf16.dpbf16ps.{bits}"
    function = _BF16_DOT_FUNCTION.format(lanes=lanes)
    return f"""
define linkonce_odr {vector} @{function}({vector} %c, {words} %a, {words} %b) alwaysinline {{
  %a_pairs = bitcast {words} %a to {pairs}
  %b_pairs = bitcast {words} %b to {pairs}
  %sum = call {vector} {intrinsic}({vector} %c, {pairs} %a_pairs, {pairs} %b_pairs)
  ret {vector} %sum
}}
declare {vector} {intrinsic}({vector}, {pairs}, {pairs})
"""


@functools.cache
def transpose_block(lanes: int) -> str:
    """The name of the tensor intrinsic ``dst[j, i] = src[i, j]`` for a ``lanes`` x ``lanes`` float32 block: the
    source rows (a local copy, whole vectors) loaded as ``lanes`` vectors and transposed in registers
    (:func:`_transposed`), each result row one vector store. A transpose written as a loop reads a column a float
    at a time (one ``vinsertps`` per float: 92 of them in BERT's attention on AVX2, 135 on Sapphire Rapids).
    Registered with TVM on the first call."""
    from tvm import tirx
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    name = f"fxopt_transpose_{lanes}x{lanes}_f32"

    @T.prim_func(s_tir=True)
    def description(a: T.handle, b: T.handle) -> None:
        src = T.match_buffer(a, (lanes, lanes), "float32", offset_factor=1, scope="local")
        stride = T.int32()
        dst = T.match_buffer(b, (lanes, lanes), "float32", offset_factor=1, strides=[stride, 1])
        with T.sblock("root"):
            T.reads(src[0:lanes, 0:lanes])
            T.writes(dst[0:lanes, 0:lanes])
            for i, j in T.grid(lanes, lanes):
                with T.sblock("transpose"):
                    vi, vj = T.axis.remap("SS", [i, j])
                    dst[vi, vj] = src[vj, vi]

    @T.prim_func(s_tir=True)
    def implementation(a: T.handle, b: T.handle) -> None:
        src = T.match_buffer(a, (lanes, lanes), "float32", offset_factor=1, scope="local")
        stride = T.int32()
        dst = T.match_buffer(b, (lanes, lanes), "float32", offset_factor=1, strides=[stride, 1])
        with T.sblock("root"):
            T.reads(src[0:lanes, 0:lanes])
            T.writes(dst[0:lanes, 0:lanes])
            columns = _transposed([src.vload([r, 0], f"float32x{lanes}") for r in range(lanes)], lanes)
            # Row j of the result picked out of all of them: unrolled, each pick's lanes are constants and LLVM
            # keeps only the one row (and computes the shuffles once).
            for j in T.unroll(lanes):
                dst.vstore([j, 0], tirx.Shuffle(columns, [j * lanes + lane for lane in range(lanes)]))

    TensorIntrin.register(name, description, implementation)
    return name


def _transposed(rows: list, lanes: int) -> list:
    """The columns of the matrix whose rows are the vectors ``rows``, by log2(lanes) rounds of two-vector shuffles
    (Eklundh's transpose: round k swaps the off-diagonal k x k blocks of each 2k x 2k block), each of which x86
    has one instruction for (``vunpck*``, ``vshufps``, ``vperm2f128``/``vshuff32x4``): a shuffle of all rows at
    once became a long chain of single-lane moves."""
    from tvm import tirx

    k = 1
    while k < lanes:
        low = [j if j & k == 0 else lanes + j - k for j in range(lanes)]
        high = [j + k if j & k == 0 else lanes + j for j in range(lanes)]
        swapped = list(rows)
        for i in (i for i in range(lanes) if i & k == 0):
            pair = [rows[i], rows[i + k]]
            swapped[i], swapped[i + k] = tirx.Shuffle(pair, low), tirx.Shuffle(pair, high)
        rows, k = swapped, 2 * k
    return rows


#: AMX's tile registers (``tmm0``-``tmm7``), each of up to 16 rows of 64 bytes.
AMX_TILES = 8
AMX_ROWS = 16
AMX_ROW_BYTES = 64


def amx_tile_config(tiles: int) -> list[int]:
    """The 64-byte operand of ``ldtilecfg`` (palette 1) that makes tiles ``0..tiles-1`` 16 rows of 64 bytes, as
    eight little-endian 64-bit words: byte 0 the palette, bytes 16-47 each tile's bytes per row (16 bits), bytes
    48-63 each tile's rows (8 bits); the other tiles unused (zero)."""
    if not 0 < tiles <= AMX_TILES:
        raise ValueError(f"AMX has {AMX_TILES} tiles, not {tiles}")
    config = bytearray(64)
    config[0] = 1
    for tile in range(tiles):
        config[16 + 2 * tile : 18 + 2 * tile] = AMX_ROW_BYTES.to_bytes(2, "little")
        config[48 + tile] = AMX_ROWS
    return [int.from_bytes(config[i : i + 8], "little") for i in range(0, 64, 8)]


#: The AMX tile products: operand and accumulator types, inputs per 32-bit element (the VNNI packing's depth), the
#: instruction, and each product as the description computes it.
AMX_PRODUCTS = {
    "u8s8": ("uint8", "int8", "int32", 4, "tdpbusd"),
    "bf16": ("uint16", "uint16", "float32", 2, "tdpbf16ps"),
}


@functools.cache
def amx_dot(kind: str, row_tiles: int, column_tiles: int, steps: int) -> str:
    """The name of the AMX tensor intrinsic ``c[m, j, 0:16] += sum_k a[m, k] * b[j, k // d, 0:16, k % d]`` for
    ``row_tiles`` x 16 rows ``m``, ``column_tiles`` blocks ``j`` of 16 channels and ``steps`` x ``d`` inputs
    ``k`` (``steps`` a multiple of 16), as :data:`AMX_PRODUCTS` ``kind`` has them: ``"u8s8"``, ``a`` uint8 and
    ``b`` int8 quads (``d = 4``, VNNI's packing) into int32, exact; ``"bf16"``, bfloat16 pairs (their bits,
    uint16; ``d = 2``) into float32. The whole reduction in tile registers: ``row_tiles x column_tiles``
    accumulator tiles loaded from ``c`` and stored back, each 16 steps one ``tdpbusd``/``tdpbf16ps`` per
    accumulator (16 x 16 x 64 bytes of products). It configures the tiles itself (``ldtilecfg``) and releases
    them (``tilerelease``), so a kernel needs nothing around it but the OS's permission
    (:func:`fxopt.targets.request_amx`). Registered with TVM on the first call."""
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    a_type, b_type, c_type, depth, instruction = AMX_PRODUCTS[kind]
    accumulators = row_tiles * column_tiles
    if accumulators + row_tiles + column_tiles > AMX_TILES or steps % AMX_ROWS:
        raise ValueError(f"an AMX tile of {row_tiles} x {column_tiles} tiles over {steps} steps does not fit")
    rows, chunks, inputs = row_tiles * AMX_ROWS, steps // AMX_ROWS, steps * depth
    name = f"fxopt_amx_{kind}_{row_tiles}x{column_tiles}_{steps}"
    config_words = amx_tile_config(accumulators + row_tiles + column_tiles)
    operand_bytes = {"uint8": 1, "uint16": 2}[a_type]  # a's and b's elements alike; the accumulators' are 4

    def product(a, b):
        if kind == "bf16":
            return bf16_value(a) * bf16_value(b)
        return a.astype("int32") * b.astype("int32")

    @T.prim_func(s_tir=True)
    def description(a_handle: T.handle, b_handle: T.handle, c_handle: T.handle) -> None:
        a_stride = T.int32()
        b_block, b_step = T.int32(), T.int32()
        c_row, c_block = T.int32(), T.int32()
        a = T.match_buffer(a_handle, (rows, inputs), a_type, offset_factor=1, strides=[a_stride, 1])
        b = T.match_buffer(
            b_handle, (column_tiles, steps, 16, depth), b_type, offset_factor=1, strides=[b_block, b_step, depth, 1]
        )
        c = T.match_buffer(
            c_handle, (rows, column_tiles, 16), c_type, offset_factor=1, scope="local", strides=[c_row, c_block, 1]
        )
        with T.sblock("root"):
            T.reads(c[0:rows, 0:column_tiles, 0:16], a[0:rows, 0:inputs], b[0:column_tiles, 0:steps, 0:16, 0:depth])
            T.writes(c[0:rows, 0:column_tiles, 0:16])
            for m, j, lane, step, within in T.grid(rows, column_tiles, 16, steps, depth):
                with T.sblock("update"):
                    vm, vj, vl, vs, vw = T.axis.remap("SSSRR", [m, j, lane, step, within])
                    c[vm, vj, vl] = c[vm, vj, vl] + product(a[vm, vs * depth + vw], b[vj, vs, vl, vw])

    @T.prim_func(s_tir=True)
    def implementation(a_handle: T.handle, b_handle: T.handle, c_handle: T.handle) -> None:
        a_stride = T.int32()
        b_block, b_step = T.int32(), T.int32()
        c_row, c_block = T.int32(), T.int32()
        a = T.match_buffer(a_handle, (rows, inputs), a_type, offset_factor=1, strides=[a_stride, 1])
        b = T.match_buffer(
            b_handle, (column_tiles, steps, 16, depth), b_type, offset_factor=1, strides=[b_block, b_step, depth, 1]
        )
        c = T.match_buffer(
            c_handle, (rows, column_tiles, 16), c_type, offset_factor=1, scope="local", strides=[c_row, c_block, 1]
        )
        with T.sblock("root"):
            T.reads(c[0:rows, 0:column_tiles, 0:16], a[0:rows, 0:inputs], b[0:column_tiles, 0:steps, 0:16, 0:depth])
            T.writes(c[0:rows, 0:column_tiles, 0:16])
            tile_config = T.alloc_buffer((8,), "uint64", scope="local")
            tile_config[0] = T.uint64(config_words[0])
            tile_config[1] = T.uint64(config_words[1])
            tile_config[2] = T.uint64(config_words[2])
            tile_config[3] = T.uint64(config_words[3])
            tile_config[4] = T.uint64(config_words[4])
            tile_config[5] = T.uint64(config_words[5])
            tile_config[6] = T.uint64(config_words[6])
            tile_config[7] = T.uint64(config_words[7])
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.ldtilecfg", T.address_of(tile_config[0])))
            # Tiles 0.. the accumulators (row tile i, column tile j at i * column_tiles + j), then a's row tiles,
            # then b's column tiles; tile numbers are immediates, so the loops over them are unrolled. Strides
            # are in bytes.
            for i in T.unroll(row_tiles):
                for j in T.unroll(column_tiles):
                    T.evaluate(
                        T.call_llvm_intrin(
                            "void",
                            "llvm.x86.tileloadd64",
                            T.uint8(i * column_tiles + j),
                            T.address_of(c[i * AMX_ROWS, j, 0]),
                            T.int64(c_row * 4),
                        )
                    )
            for chunk in T.serial(chunks):
                for i in T.unroll(row_tiles):
                    T.evaluate(
                        T.call_llvm_intrin(
                            "void",
                            "llvm.x86.tileloadd64",
                            T.uint8(accumulators + i),
                            T.address_of(a[i * AMX_ROWS, chunk * AMX_ROWS * depth]),
                            T.int64(a_stride * operand_bytes),
                        )
                    )
                for j in T.unroll(column_tiles):
                    T.evaluate(
                        T.call_llvm_intrin(
                            "void",
                            "llvm.x86.tileloadd64",
                            T.uint8(accumulators + row_tiles + j),
                            T.address_of(b[j, chunk * AMX_ROWS, 0, 0]),
                            T.int64(b_step * operand_bytes),
                        )
                    )
                for i in T.unroll(row_tiles):
                    for j in T.unroll(column_tiles):
                        T.evaluate(
                            T.call_llvm_intrin(
                                "void",
                                f"llvm.x86.{instruction}",
                                T.uint8(i * column_tiles + j),
                                T.uint8(accumulators + i),
                                T.uint8(accumulators + row_tiles + j),
                            )
                        )
            for i in T.unroll(row_tiles):
                for j in T.unroll(column_tiles):
                    T.evaluate(
                        T.call_llvm_intrin(
                            "void",
                            "llvm.x86.tilestored64",
                            T.uint8(i * column_tiles + j),
                            T.address_of(c[i * AMX_ROWS, j, 0]),
                            T.int64(c_row * 4),
                        )
                    )
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilerelease"))

    TensorIntrin.register(name, description, implementation)
    return name
