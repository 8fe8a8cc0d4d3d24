"""The Triton kernels behind :mod:`.triton_attention` (imported only when Triton is there and a kernel runs).

``attend`` is one tile of context for a block of query rows (online softmax); ``attend_rows`` loads
the rows and runs the whole loop over their context. ``paged_decode`` runs the query heads of one KV
group of one decoding sequence, ``paged_prefill`` one head of up to ``BLOCK_Q`` queries of one prefill
chunk. Shapes and layouts are in the comments of each kernel.
"""

import triton
import triton.language as tl


@triton.jit
def attend(
    q, acc, m_i, l_i, k_ptr, v_ptr, table_ptr, t0, end, pos, h,
    HKV: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, BLOCK_T: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr, CAUSAL: tl.constexpr,
):  # fmt: skip
    # one tile of context positions [t0, t0 + BLOCK_T) < end for the query rows q [R, D] (scaled);
    # the online softmax state: acc [R, D], row max m_i [R], row sum l_i [R]; CAUSAL: row r sees t <= pos[r]
    t = t0 + tl.arange(0, BLOCK_T)  # [BLOCK_T] positions
    ok = t < end
    block = tl.load(table_ptr + t // BS, mask=ok, other=0).to(tl.int64)
    offset = ((block * BS + t % BS) * HKV + h) * D  # [BLOCK_T]
    d = tl.arange(0, D)
    k = tl.load(k_ptr + offset[:, None] + d[None, :], mask=ok[:, None], other=0.0)  # [BLOCK_T, D]
    v = tl.load(v_ptr + offset[:, None] + d[None, :], mask=ok[:, None], other=0.0)  # [BLOCK_T, D]
    if UPCAST:  # the interpreter's tl.dot mishandles bf16 operands
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")  # [R, BLOCK_T]
    else:
        s = tl.dot(q, tl.trans(k))  # [R, BLOCK_T]
    if CAUSAL:
        s = tl.where(ok[None, :] & (t[None, :] <= pos[:, None]), s, float("-inf"))
    else:
        s = tl.where(ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))  # [R]
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new[:, None])  # [R, BLOCK_T]
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if IEEE:
        pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")  # [R, D]
    else:
        pv = tl.dot(p.to(v.dtype), v)  # [R, D]
    return acc * alpha[:, None] + pv, m_new, l_i


@triton.jit
def attend_rows(
    q_ptrs, rows_ok, k_ptr, v_ptr, table_ptr, end, pos, h, scale,
    ROWS: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, BLOCK_T: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr, CAUSAL: tl.constexpr,
):  # fmt: skip
    # the queries at q_ptrs [ROWS, D] (rows_ok [ROWS] masks padding) over context positions < end of KV head h
    q = tl.load(q_ptrs, mask=rows_ok[:, None], other=0.0)
    q = q.to(tl.float32) * scale
    if not UPCAST:
        q = q.to(k_ptr.dtype.element_ty)  # [ROWS, D]
    m_i = tl.full((ROWS,), float("-inf"), tl.float32)
    l_i = tl.zeros((ROWS,), tl.float32)
    acc = tl.zeros((ROWS, D), tl.float32)
    for t0 in range(0, end, BLOCK_T):
        acc, m_i, l_i = attend(
            q, acc, m_i, l_i, k_ptr, v_ptr, table_ptr, t0, end, pos, h, HKV, D, BS, BLOCK_T, IEEE, UPCAST, CAUSAL
        )
    return acc / l_i[:, None]  # [ROWS, D]


@triton.jit
def paged_decode(
    q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, out_ptr,
    WIDTH, scale,
    HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
    BLOCK_T: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    # q and out [n, HKV * G, D]; k and v [NB * BS, HKV, D]; table [n, WIDTH]; lens [n]
    n = tl.program_id(0)
    h = tl.program_id(1)
    length = tl.load(lens_ptr + n).to(tl.int32)
    g = tl.arange(0, G_PAD)  # [G_PAD] the query heads of KV head h
    offsets = (n * HKV * G + h * G + g)[:, None] * D + tl.arange(0, D)[None, :]  # [G_PAD, D]
    out = attend_rows(
        q_ptr + offsets, g < G, k_ptr, v_ptr, table_ptr + n * WIDTH, length, g, h, scale,
        G_PAD, HKV, D, BS, BLOCK_T, IEEE, UPCAST, False,
    )  # fmt: skip
    tl.store(out_ptr + offsets, out, mask=(g < G)[:, None])


@triton.jit
def paged_prefill(
    q_ptr, k_ptr, v_ptr, table_ptr, out_ptr, tile_chunk_ptr, tile_first_ptr, row_ptr, start_ptr, len_ptr,
    WIDTH, scale,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_T: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    # q and out [T, H, D]; k and v [NB * BS, HKV, D]; table [m, WIDTH]; per work tile: its chunk and the
    # chunk's first query of the tile; per chunk: first row in q, first position, length
    w = tl.program_id(0)
    head = tl.program_id(1)
    c = tl.load(tile_chunk_ptr + w)
    first = tl.load(tile_first_ptr + w).to(tl.int32)
    row = tl.load(row_ptr + c).to(tl.int32)
    start = tl.load(start_ptr + c).to(tl.int32)
    length = tl.load(len_ptr + c).to(tl.int32)
    i = first + tl.arange(0, BLOCK_Q)  # [BLOCK_Q] queries of the chunk
    valid = i < length
    offsets = ((row + i) * H + head)[:, None] * D + tl.arange(0, D)[None, :]  # [BLOCK_Q, D]
    end = start + tl.minimum(first + BLOCK_Q, length)  # the tile's last query sees positions < end
    out = attend_rows(
        q_ptr + offsets, valid, k_ptr, v_ptr, table_ptr + c * WIDTH, end, start + i, head // (H // HKV), scale,
        BLOCK_Q, HKV, D, BS, BLOCK_T, IEEE, UPCAST, True,
    )  # fmt: skip
    tl.store(out_ptr + offsets, out, mask=valid[:, None])
