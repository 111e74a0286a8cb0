// FlashAttention-2 forward and backward on NVIDIA tensor cores through WMMA 16x16x16 fragments,
// laid out for Volta (sm_70) and running unchanged on Turing, Ampere and Hopper.
//
// Compiled at run time by cupy.RawModule (portattn/backends/cupy/__init__.py) with the tile plan as
// compile-time constants (-D...):
//   HEAD_DIM      the true head dim; HEAD_DIM_PAD: it rounded up to 16 (padding columns are zero)
//   FWD_WARPS, FWD_BLOCK_K, FWD_STAGES          forward: a block owns 16*FWD_WARPS query rows
//   BWD_WARPS, BWD_BLOCK_N, BWD_STAGES          backward: a block owns 16*BWD_WARPS rows (keys for
//                                               dK/dV, queries for dQ) and streams BWD_BLOCK_N of the other
//   Q_IN_REGISTERS  keep the forward's Q operand fragments in registers (head dims <= 128)
//   CAUSAL, WINDOW (sliding-window bounds, passed at run time), BF16, VECTOR_LOADS (16-byte global loads: head dim, row strides and pointers are multiples
//   of 8 elements), FWD_SMEM_BYTES / BWD_SMEM_BYTES (the planner's figures: static_asserts below
//   check that this file lays shared memory out exactly as portattn/backends/cupy/plan.py predicts).
//   MASK (0 none, 1 bool attn_mask, 2 additive), MASK_FLOAT32 (an additive mask's values are float32,
//   else the inputs' dtype), KEY_PADDING: the score masks (ScoreMask below); with all three 0 the
//   kernels take no mask arguments and compile to the code they had before masks existed.
//
// Why WMMA and not inline mma.sync.m8n8k4: portattn/backends/cupy/__init__.py (MMA_CHOICE) and
// benchmarks/mma_shapes.py, which times both. In short: on the H100 WMMA runs 28x faster (it compiles
// to the native m16n8k16 instruction; m8n8k4 is emulated from sm_80 on), and on Volta a WMMA product
// is executed as the same m8n8k4 quad-pair steps (HMMA.884) that inline PTX would issue.
//
// The one thing WMMA hides is which accumulator element a thread holds. Online softmax needs to
// scale rows of O, so every warp *probes* the layout once: it loads a 16x16 tile whose every entry
// is its row index into an accumulator fragment and keeps, per element, the row that came back
// (`row_of`, `col_of`). That is portable across architectures, where the layout differs.
//
// Shared-memory layout of an operand tile (fp16/bf16, row-major, row stride LD = HEAD_DIM_PAD + 8):
//
//        16 B  16 B  16 B  16 B ...          16 B (pad)
//   row0 [c0 ][c1 ][c2 ][c3 ] ... [cD/8-1]  [pad]      bank slot of c0 (8 slots of 16 B):  0
//   row1  [pad'][c0 ][c1 ][c2 ] ...                                                         1 (+16 B)
//   row2        [c0 ][c1 ] ...                                                              2 ...
//   ...                                                                                     7, then 0
//
// A fragment load reads 8 rows x 16 B in one shared-memory phase (ldmatrix on sm_75+; on Volta
// HMMA.884 operands are read as 8-byte pieces of 4 consecutive rows per quad-pair). An unpadded
// row stride of 2*HEAD_DIM_PAD bytes is a multiple of 128 B, so all 8 rows would start in the same
// bank slot: an 8-way conflict. Padding by 8 elements makes the stride an odd multiple of 16 B, so
// the 8 rows of a phase start in 8 different slots and the load is conflict-free, with no swizzle
// arithmetic on the addresses (WMMA takes only a pointer and a stride). Score tiles in float32 use
// stride COLUMNS + 4 for the same reason.

#include <cuda_fp16.h>
#if BF16
#include <cuda_bf16.h>
#endif
#include <mma.h>

using namespace nvcuda;

#if BF16
typedef __nv_bfloat16 elem_t;
__device__ __forceinline__ float to_float(elem_t x) { return __bfloat162float(x); }
__device__ __forceinline__ elem_t from_float(float x) { return __float2bfloat16(x); }
#else
typedef __half elem_t;
__device__ __forceinline__ float to_float(elem_t x) { return __half2float(x); }
__device__ __forceinline__ elem_t from_float(float x) { return __float2half(x); }
#endif

#define ASYNC_COPY (__CUDA_ARCH__ >= 800)
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f
#ifndef INFINITY  // NVRTC has no <math.h>
#define INFINITY __int_as_float(0x7f800000)
#endif

// ---- tile geometry shared by all kernels ----------------------------------------------------------
constexpr int LD = HEAD_DIM_PAD + 8;             // operand tile row stride, elements
constexpr int CHUNKS = HEAD_DIM_PAD / 8;          // 16-byte pieces per padded row
constexpr int FRAGS_D = HEAD_DIM_PAD / 16;        // 16-wide column fragments across the head dim
constexpr int OUT_LD = HEAD_DIM_PAD + 4;          // float32 epilogue staging row stride

__host__ __device__ constexpr int align_up(int bytes) { return (bytes + 127) / 128 * 128; }
__host__ __device__ constexpr int max_of(int a, int b) { return a > b ? a : b; }
__host__ __device__ constexpr int tile_bytes(int rows) { return align_up(rows * LD * 2); }
// per warp: a float32 score tile, its 16-bit probabilities, and one float per row
__host__ __device__ constexpr int scratch_bytes(int columns) {
    return align_up(16 * (columns + 4) * 4) + align_up(16 * (columns + 8) * 2) + align_up(16 * 4);
}
__host__ __device__ constexpr int staging_bytes(int warps) { return align_up(warps * 16 * OUT_LD * 4); }

// Which keys a query sees: the keys that exist, those at or before its position when CAUSAL, and
// those in [position - left, position + right] when WINDOW (an unbounded side is a huge number).
// A query's position is its index plus `offset` (Nk - Nq when aligned bottom-right).
struct Visibility {
    int seqlen_q, seqlen_k, offset, left, right;

    // the forward's test: rows past the queries are never stored, so only the keys are checked
    __device__ __forceinline__ bool key_hidden(int query, int key) const {
        const int pos = query + offset;
        return key >= seqlen_k || (CAUSAL && key > pos) || (WINDOW && (key < pos - left || key > pos + right));
    }
    __device__ __forceinline__ bool hidden(int query, int key) const { return query >= seqlen_q || key_hidden(query, key); }
    // keys [x, y) that any of the queries first..last sees: the rest are never loaded
    __device__ __forceinline__ int2 key_range(int first, int last) const {
        int lo = 0, hi = seqlen_k;
        if (CAUSAL) hi = min(hi, last + offset + 1);
        if (WINDOW) lo = max(lo, first + offset - left), hi = min(hi, last + offset + right + 1);
        return make_int2(lo, max(lo, hi));
    }
    // queries [x, y) that see any of the keys first..last
    __device__ __forceinline__ int2 query_range(int first, int last) const {
        int lo = 0, hi = seqlen_q;
        if (CAUSAL) lo = max(lo, first - offset);
        if (WINDOW) lo = max(lo, first - offset - right), hi = min(hi, last - offset + left + 1);
        return make_int2(lo, max(lo, hi));
    }
    // whether some key of k0..k1 is hidden from some query of q0..q1: the tile needs the elementwise mask
    __device__ __forceinline__ bool cuts_keys(int q0, int q1, int k0, int k1) const {
        return k1 >= seqlen_k || (CAUSAL && k1 > q0 + offset) || (WINDOW && (k0 < q1 + offset - left || k1 > q0 + offset + right));
    }
    // the same, counting the queries' end too (the backward reads LSE and dO of every row)
    __device__ __forceinline__ bool cuts(int q0, int q1, int k0, int k1) const {
        return q1 >= seqlen_q || cuts_keys(q0, q1, k0, k1);
    }
};

// The scores' own masks (portattn/extras.py has the semantics): attn_mask -- MASK 1: a byte per score,
// nonzero = attend; MASK 2: a value added to the score -- and key_padding_mask (KEY_PADDING: a byte per
// (batch, key), nonzero = a real key). Both are read in place through their strides in elements, as
// the API hands them over: the mask is a (B, H, Nq, Nk) broadcast view whose broadcast axes (batch,
// head, and also query or key for masks such as (B, 1, 1, Nk)) have stride 0, never expanded. Every
// tile of a variant with a mask is checked per score; which tiles are loaded is still decided by
// Visibility alone.
#define SCORE_MASK (MASK || KEY_PADDING)
#if SCORE_MASK
#if MASK == 2 && MASK_FLOAT32
typedef float mask_t;
#elif MASK == 2
typedef elem_t mask_t;  // the inputs' dtype: a model's float16/bfloat16 mask is read as it is, not converted
#else
typedef unsigned char mask_t;  // bool: one byte, 0 or 1
#endif
__device__ __forceinline__ float mask_value(float x) { return x; }
__device__ __forceinline__ float mask_value(elem_t x) { return to_float(x); }

struct ScoreMask {
#if MASK
    const mask_t *mask;
    long mask_sb, mask_sh, mask_sq, mask_sk;
#endif
#if KEY_PADDING
    const unsigned char *padding;
    long padding_sb, padding_sk;
#endif
    // the masks of one (batch, head): `apply` then indexes them by query and key alone
    __device__ __forceinline__ ScoreMask at(int batch, int head) const {
        ScoreMask moved = *this;
#if MASK
        moved.mask += batch * mask_sb + head * mask_sh;
#endif
#if KEY_PADDING
        moved.padding += batch * padding_sb;
#endif
        return moved;
    }
    // x = s * scale_log2 of a (query, key) that exists -> its score in log2 units; -INFINITY where masked
    __device__ __forceinline__ float apply(float x, int query, int key) const {
#if KEY_PADDING
        if (!padding[key * padding_sk]) return -INFINITY;
#endif
#if MASK == 1
        if (!mask[query * mask_sq + key * mask_sk]) return -INFINITY;
#elif MASK == 2
        x += mask_value(mask[query * mask_sq + key * mask_sk]) * LOG2E;  // an additive -inf hides the key
#endif
        return x;
    }
};

// The score of (query, key) in log2 units from x = s * scale_log2, -INFINITY where hidden. `cut`: the
// tile reaches past the queries or keys or across a causal/window edge (Visibility::cuts); then those
// are checked first, so the masks are only read where the query and the key exist.
__device__ __forceinline__ float masked_score(float x, int query, int key, bool cut, const Visibility &vis,
                                              const ScoreMask &masks) {
    return cut && vis.hidden(query, key) ? -INFINITY : masks.apply(x, query, key);
}
#endif

// The masks as the forward, dK/dV and dQ kernels' last parameters (none without them), and the
// ScoreMask made of those parameters.
#if MASK
#define MASK_PARAMS , const mask_t *__restrict__ mask, long mask_sb, long mask_sh, long mask_sq, long mask_sk
#define MASK_FIELDS mask, mask_sb, mask_sh, mask_sq, mask_sk,
#else
#define MASK_PARAMS
#define MASK_FIELDS
#endif
#if KEY_PADDING
#define PADDING_PARAMS , const unsigned char *__restrict__ padding, long padding_sb, long padding_sk
#define PADDING_FIELDS padding, padding_sb, padding_sk,
#else
#define PADDING_PARAMS
#define PADDING_FIELDS
#endif
#define SCORE_MASK_PARAMS MASK_PARAMS PADDING_PARAMS
#define SCORE_MASK_FROM_PARAMS (ScoreMask{MASK_FIELDS PADDING_FIELDS})

typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, elem_t, wmma::row_major> frag_a;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, elem_t, wmma::row_major> frag_b_row;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, elem_t, wmma::col_major> frag_b_col;
typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> frag_acc;

// Per-warp scratch: scores (float32, 16 x columns), probabilities (16-bit), one float per row.
template <int COLUMNS>
struct WarpScratch {
    static constexpr int SLD = COLUMNS + 4;
    static constexpr int PLD = COLUMNS + 8;
    float *scores;
    elem_t *probs;
    float *row;
    __device__ WarpScratch(char *base, int warp) {
        char *mine = base + warp * scratch_bytes(COLUMNS);
        scores = reinterpret_cast<float *>(mine);
        probs = reinterpret_cast<elem_t *>(mine + align_up(16 * SLD * 4));
        row = reinterpret_cast<float *>(mine + align_up(16 * SLD * 4) + align_up(16 * PLD * 2));
    }
};

// The row and column (0..15) of each accumulator element this thread holds: load tiles of indices.
__device__ __forceinline__ void probe_layout(float *scratch, int ld, int lane, int row_of[8], int col_of[8]) {
    static_assert(frag_acc::num_elements == 8, "a 16x16 float accumulator is 8 elements per thread");
    frag_acc probe;
    for (int i = lane; i < 256; i += 32) scratch[(i / 16) * ld + i % 16] = float(i / 16);
    __syncwarp();
    wmma::load_matrix_sync(probe, scratch, ld, wmma::mem_row_major);
#pragma unroll
    for (int i = 0; i < 8; ++i) row_of[i] = int(probe.x[i]);
    __syncwarp();
    for (int i = lane; i < 256; i += 32) scratch[(i / 16) * ld + i % 16] = float(i % 16);
    __syncwarp();
    wmma::load_matrix_sync(probe, scratch, ld, wmma::mem_row_major);
#pragma unroll
    for (int i = 0; i < 8; ++i) col_of[i] = int(probe.x[i]);
    __syncwarp();
}

#if REGISTER_SOFTMAX
// Register softmax: where the host's probe of this device (fragment_layout.cu) found that each lane
// holds whole elements of ACC_ROWS rows -- element i in row slot ACC_SLOT[i], the same for every
// lane -- and that the lanes sharing a row are an XOR group spanned by ACC_SHUFFLE (on sm_80+: two
// rows per lane, shared by the 4 lanes of a quad, masks 1 and 2), row maxima and sums are reduced
// with shuffles in registers: the scores never pass through shared memory, only the 16-bit P that
// the next product reads as an operand fragment.
constexpr int ACC_SLOT[8] = {ACC_SLOTS};
constexpr int ACC_SHUFFLE[ACC_SHUFFLE_COUNT] = {ACC_SHUFFLES};

__host__ __device__ constexpr int first_element_of_slot(int slot) {
    for (int i = 0; i < 8; ++i)
        if (ACC_SLOT[i] == slot) return i;
    return 0;
}

__device__ __forceinline__ float row_max_across_lanes(float x) {
#pragma unroll
    for (int s = 0; s < ACC_SHUFFLE_COUNT; ++s) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, ACC_SHUFFLE[s]));
    return x;
}

__device__ __forceinline__ float row_sum_across_lanes(float x) {
#pragma unroll
    for (int s = 0; s < ACC_SHUFFLE_COUNT; ++s) x += __shfl_xor_sync(0xffffffffu, x, ACC_SHUFFLE[s]);
    return x;
}

#if SCORE_MASK
// The register softmax leaves a warp's float32 score scratch unused after the layout probe, so there the
// warp first stages its tile's masks as one bias per score (log2 units: 0 or the additive value where
// visible, -inf where hidden; `bias(row, col)`), its lanes walking the key axis (coalesced reads of a
// row-major mask). Each accumulator element then adds its bias from shared memory: read straight from
// global memory by the fragment layout, ptxas would hoist a tile's worth of scattered loads into
// registers (measured on sm_80: the dK/dV kernel at 255 registers). Two reads in flight per lane: more
// take the bfloat16 forward from 168 to 255 registers (ptxas 12.9, sm_80, d64).
template <int COLUMNS, bool KEYS_ARE_ROWS, class Bias>
__device__ __forceinline__ void stage_bias(float *scores, int lane, Bias bias) {
#pragma unroll 2
    for (int i = lane; i < 16 * COLUMNS; i += 32) {
        const int row = KEYS_ARE_ROWS ? i % 16 : i / COLUMNS, col = KEYS_ARE_ROWS ? i / 16 : i % COLUMNS;
        scores[row * (COLUMNS + 4) + col] = bias(row, col);
    }
    __syncwarp();
}
#endif
#endif

// acc[c] (16 x 16 each, COLUMNS/16 of them) = rows(16 x D) @ tile(COLUMNS x D)^T. The head-dim loop
// is outside, so each A fragment is loaded once and only one is live.
template <int COLUMNS>
__device__ __forceinline__ void rows_times_tile_t(frag_acc (&acc)[COLUMNS / 16], const elem_t *rows, const elem_t *tile) {
#pragma unroll
    for (int c = 0; c < COLUMNS / 16; ++c) wmma::fill_fragment(acc[c], 0.f);
#pragma unroll
    for (int d = 0; d < FRAGS_D; ++d) {
        frag_a a;
        wmma::load_matrix_sync(a, rows + d * 16, LD);
#pragma unroll
        for (int c = 0; c < COLUMNS / 16; ++c) {
            frag_b_col b;  // a row-major tile is its transpose column-major
            wmma::load_matrix_sync(b, tile + c * 16 * LD + d * 16, LD);
            wmma::mma_sync(acc[c], a, b, acc[c]);
        }
    }
}

// Stage scores as float32 rows in the warp's scratch (the shared-memory softmax path).
template <int COLUMNS>
__device__ __forceinline__ void stage_scores(float *scores, frag_acc (&acc)[COLUMNS / 16]) {
#pragma unroll
    for (int c = 0; c < COLUMNS / 16; ++c) wmma::store_matrix_sync(scores + c * 16, acc[c], COLUMNS + 4, wmma::mem_row_major);
    __syncwarp();
}

// ---- global <-> shared copies ---------------------------------------------------------------------
// Copy `rows` rows of a (rows x HEAD_DIM) tile, row stride `stride` elements, into a padded shared
// tile of `tile_rows` rows; rows past `rows` and columns past HEAD_DIM are zero-filled.
__device__ __forceinline__ void copy_chunk(elem_t *dst, const elem_t *src, bool valid) {
#if ASYNC_COPY
    unsigned smem = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    int bytes = valid ? 16 : 0;  // the zero-fill form: bytes past src-size are written as zeros
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(src), "r"(bytes));
#else
    *reinterpret_cast<uint4 *>(dst) = valid ? *reinterpret_cast<const uint4 *>(src) : make_uint4(0, 0, 0, 0);
#endif
}

__device__ __forceinline__ void commit_copies() {
#if ASYNC_COPY
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}

template <int PENDING>
__device__ __forceinline__ void wait_copies() {
#if ASYNC_COPY
    asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING));
#endif
}

static_assert(!VECTOR_LOADS || HEAD_DIM % 8 == 0, "16-byte loads need whole 8-element pieces per row");

template <int TILE_ROWS, int THREADS>
__device__ __forceinline__ void load_tile(elem_t *tile, const elem_t *src, long stride, int rows, int tid) {
#if VECTOR_LOADS
    for (int i = tid; i < TILE_ROWS * CHUNKS; i += THREADS) {
        int r = i / CHUNKS, c = i % CHUNKS;
        bool valid = r < rows && c * 8 < HEAD_DIM;
        copy_chunk(tile + r * LD + c * 8, valid ? src + r * stride + c * 8 : src, valid);
    }
#else  // element by element: any head dim, stride and alignment
    for (int i = tid; i < TILE_ROWS * HEAD_DIM_PAD; i += THREADS) {
        int r = i / HEAD_DIM_PAD, c = i % HEAD_DIM_PAD;
        tile[r * LD + c] = (r < rows && c < HEAD_DIM) ? src[r * stride + c] : from_float(0.f);
    }
#endif
}

// Write a warp's 16 x HEAD_DIM float32 rows (staged in shared memory) to global memory, `rows` valid.
__device__ __forceinline__ void store_rows(elem_t *dst, long stride, const float *staged, int rows, int lane) {
    for (int i = lane; i < 16 * HEAD_DIM; i += 32) {
        int r = i / HEAD_DIM, c = i % HEAD_DIM;
        if (r < rows) dst[r * stride + c] = from_float(staged[r * OUT_LD + c]);
    }
}

// Stage a warp's accumulators (16 x HEAD_DIM_PAD) as float32 rows for store_rows.
__device__ __forceinline__ void stage_rows(float *staged, frag_acc *acc) {
#pragma unroll
    for (int j = 0; j < FRAGS_D; ++j) wmma::store_matrix_sync(staged + j * 16, acc[j], OUT_LD, wmma::mem_row_major);
    __syncwarp();
}

__device__ __forceinline__ void scale_all(frag_acc *acc, float factor) {
#pragma unroll
    for (int j = 0; j < FRAGS_D; ++j)
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[j].x[i] *= factor;
}

// ==== forward ======================================================================================
constexpr int FWD_ROWS = 16 * FWD_WARPS;
constexpr int FWD_THREADS = 32 * FWD_WARPS;
constexpr int FWD_Q_BYTES = tile_bytes(FWD_ROWS);
constexpr int FWD_KV_BYTES = max_of(FWD_STAGES * 2 * tile_bytes(FWD_BLOCK_K), staging_bytes(FWD_WARPS));
constexpr int FWD_SCRATCH_BYTES = FWD_WARPS * scratch_bytes(FWD_BLOCK_K);
static_assert(FWD_Q_BYTES + FWD_KV_BYTES + FWD_SCRATCH_BYTES == FWD_SMEM_BYTES,
              "forward shared memory differs from the plan (portattn/backends/cupy/plan.py)");
static_assert(FWD_BLOCK_K % 16 == 0 && (FWD_BLOCK_K / 2) % 4 == 0, "block_k: whole fragments, 4-float row pieces");

// One block: 16*FWD_WARPS query rows of one (batch, head); warp w owns rows 16w..16w+15.
// grid = (query blocks, batch * heads). Strides are in elements: (batch, head, row).
extern "C" __global__ void __launch_bounds__(FWD_THREADS)
attention_forward(const elem_t *__restrict__ q, const elem_t *__restrict__ k, const elem_t *__restrict__ v,
                  elem_t *__restrict__ out, float *__restrict__ lse,
                  long q_sb, long q_sh, long q_sn, long k_sb, long k_sh, long k_sn, long v_sb, long v_sh, long v_sn,
                  long o_sb, long o_sh, long o_sn, long lse_sb, long lse_sh,
                  int heads, int group, int seqlen_q, int seqlen_k, int query_offset, int window_left, int window_right,
                  float scale_log2 SCORE_MASK_PARAMS) {
    extern __shared__ __align__(128) char smem[];
    elem_t *q_tile = reinterpret_cast<elem_t *>(smem);
    elem_t *kv_tiles = reinterpret_cast<elem_t *>(smem + FWD_Q_BYTES);
    float *staged_out = reinterpret_cast<float *>(smem + FWD_Q_BYTES);  // after the key loop
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    WarpScratch<FWD_BLOCK_K> scratch(smem + FWD_Q_BYTES + FWD_KV_BYTES, warp);

    const int batch = blockIdx.y / heads, head = blockIdx.y % heads, kv_head = head / group;
    const int q_start = blockIdx.x * FWD_ROWS;
    q += batch * q_sb + head * q_sh + q_start * q_sn;
    k += batch * k_sb + kv_head * k_sh;
    v += batch * v_sb + kv_head * v_sh;

    // the key tiles any row of this block sees (causal, window): the others are never loaded
    const Visibility vis{seqlen_q, seqlen_k, query_offset, window_left, window_right};
#if SCORE_MASK
    const ScoreMask masks = SCORE_MASK_FROM_PARAMS.at(batch, head);
#endif
    const int2 keys = vis.key_range(q_start, q_start + FWD_ROWS - 1);
    const int first_tile = keys.x / FWD_BLOCK_K;
    const int tiles = keys.y > keys.x ? (keys.y + FWD_BLOCK_K - 1) / FWD_BLOCK_K - first_tile : 0;

    load_tile<FWD_ROWS, FWD_THREADS>(q_tile, q, q_sn, min(FWD_ROWS, seqlen_q - q_start), tid);
    commit_copies();
    auto load_kv = [&](int t) {  // the block's t-th visible key tile
        elem_t *stage = kv_tiles + (t % FWD_STAGES) * 2 * (tile_bytes(FWD_BLOCK_K) / 2);
        const int key_base = (first_tile + t) * FWD_BLOCK_K, rows = min(FWD_BLOCK_K, seqlen_k - key_base);
        load_tile<FWD_BLOCK_K, FWD_THREADS>(stage, k + key_base * k_sn, k_sn, rows, tid);
        load_tile<FWD_BLOCK_K, FWD_THREADS>(stage + tile_bytes(FWD_BLOCK_K) / 2, v + key_base * v_sn, v_sn, rows, tid);
    };
#pragma unroll
    for (int t = 0; t < FWD_STAGES - 1; ++t) {  // prologue: the first STAGES-1 tiles in flight
        if (t < tiles) load_kv(t);
        commit_copies();
    }

    int row_of[8], col_of[8];
    probe_layout(scratch.scores, WarpScratch<FWD_BLOCK_K>::SLD, lane, row_of, col_of);
    constexpr int SLD = WarpScratch<FWD_BLOCK_K>::SLD, PLD = WarpScratch<FWD_BLOCK_K>::PLD;
    const int warp_query = q_start + warp * 16;
#if REGISTER_SOFTMAX
    float row_max[ACC_ROWS], row_sum[ACC_ROWS];  // row_sum: this lane's columns only, reduced at the end
#pragma unroll
    for (int r = 0; r < ACC_ROWS; ++r) row_max[r] = -INFINITY, row_sum[r] = 0.f;
#else
    // softmax ownership: lane -> row lane % 16, columns half (lane / 16) of the tile, 4 at a time
    const int my_row = lane % 16, my_half = lane / 16;
    const int my_query = warp_query + my_row;
    float row_max = -INFINITY, row_sum = 0.f;
#endif

    frag_acc o_acc[FRAGS_D];
#pragma unroll
    for (int j = 0; j < FRAGS_D; ++j) wmma::fill_fragment(o_acc[j], 0.f);
    const elem_t *q_rows = q_tile + warp * 16 * LD;
#if Q_IN_REGISTERS
    frag_a q_frag[FRAGS_D];
    wait_copies<FWD_STAGES - 1>();  // the Q tile's group (committed first) is complete
    __syncthreads();
#pragma unroll
    for (int d = 0; d < FRAGS_D; ++d) wmma::load_matrix_sync(q_frag[d], q_rows + d * 16, LD);
#endif

    for (int t = 0; t < tiles; ++t) {
        if (t + FWD_STAGES - 1 < tiles) load_kv(t + FWD_STAGES - 1);
        commit_copies();
        wait_copies<FWD_STAGES - 1>();
        __syncthreads();
        const elem_t *k_tile = kv_tiles + (t % FWD_STAGES) * 2 * (tile_bytes(FWD_BLOCK_K) / 2);
        const elem_t *v_tile = k_tile + tile_bytes(FWD_BLOCK_K) / 2;
        // S = Q K^T for this warp's 16 rows
        frag_acc s_acc[FWD_BLOCK_K / 16];
#if Q_IN_REGISTERS
#pragma unroll
        for (int c = 0; c < FWD_BLOCK_K / 16; ++c) wmma::fill_fragment(s_acc[c], 0.f);
#pragma unroll
        for (int d = 0; d < FRAGS_D; ++d)
#pragma unroll
            for (int c = 0; c < FWD_BLOCK_K / 16; ++c) {
                frag_b_col k_frag;  // K row-major is K^T column-major
                wmma::load_matrix_sync(k_frag, k_tile + c * 16 * LD + d * 16, LD);
                wmma::mma_sync(s_acc[c], q_frag[d], k_frag, s_acc[c]);
            }
#else
        rows_times_tile_t<FWD_BLOCK_K>(s_acc, q_rows, k_tile);
#endif
        const int key_base = (first_tile + t) * FWD_BLOCK_K;
        // a causal or window edge, or the end of the keys, cuts this warp's tile: mask per element
#if SCORE_MASK  // every score is masked; the end of the queries counts too, where the mask's rows end
        const bool masked = vis.cuts(warp_query, warp_query + 15, key_base, key_base + FWD_BLOCK_K - 1);
#else
        const bool masked = vis.cuts_keys(warp_query, warp_query + 15, key_base, key_base + FWD_BLOCK_K - 1);
#endif

#if REGISTER_SOFTMAX
        float tile_max[ACC_ROWS];
#pragma unroll
        for (int r = 0; r < ACC_ROWS; ++r) tile_max[r] = -INFINITY;
#if SCORE_MASK
        stage_bias<FWD_BLOCK_K, false>(scratch.scores, lane, [&](int row, int col) {
            return masked_score(0.f, warp_query + row, key_base + col, masked, vis, masks);
        });
#endif
#pragma unroll
        for (int c = 0; c < FWD_BLOCK_K / 16; ++c)
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                float x = s_acc[c].x[i] * scale_log2;
#if SCORE_MASK
                // the mask's term, -inf where hidden: a hidden score is -inf even when it is NaN (NaN + -inf
                // is NaN: a NaN key would spoil rows that never see it), as the shared-memory path has it
                const float bias = scratch.scores[row_of[i] * SLD + c * 16 + col_of[i]];
                x = bias == -INFINITY ? -INFINITY : x + bias;
#else
                if (masked) {
                    if (vis.key_hidden(warp_query + row_of[i], key_base + c * 16 + col_of[i])) x = -INFINITY;
                }
#endif
                s_acc[c].x[i] = x;
                tile_max[ACC_SLOT[i]] = fmaxf(tile_max[ACC_SLOT[i]], x);
            }
        float alpha[ACC_ROWS], base[ACC_ROWS];
#pragma unroll
        for (int r = 0; r < ACC_ROWS; ++r) {
            const float new_max = fmaxf(row_max[r], row_max_across_lanes(tile_max[r]));
            base[r] = new_max == -INFINITY ? 0.f : new_max;  // a row that has seen no key yet
            alpha[r] = exp2f(row_max[r] - base[r]);  // 0 when the row had no key before; 1 when the max held
            row_max[r] = new_max;
            row_sum[r] *= alpha[r];
        }
#pragma unroll
        for (int c = 0; c < FWD_BLOCK_K / 16; ++c)
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const float p = exp2f(s_acc[c].x[i] - base[ACC_SLOT[i]]);
                row_sum[ACC_SLOT[i]] += p;  // unrounded: the LSE is held to float32 accuracy
                scratch.probs[row_of[i] * PLD + c * 16 + col_of[i]] = from_float(p);
            }
        __syncwarp();
#pragma unroll
        for (int j = 0; j < FRAGS_D; ++j)
#pragma unroll
            for (int i = 0; i < 8; ++i) o_acc[j].x[i] *= alpha[ACC_SLOT[i]];
#else
        // shared-memory softmax: the scores are staged, and each lane owns half a row, float4 at a time
        stage_scores<FWD_BLOCK_K>(scratch.scores, s_acc);
        float *s_row = scratch.scores + my_row * SLD + my_half * (FWD_BLOCK_K / 2);
        float tile_max = -INFINITY;
#pragma unroll
        for (int c = 0; c < FWD_BLOCK_K / 2; c += 4) {
            float4 s4 = *reinterpret_cast<const float4 *>(s_row + c);
            float s[4] = {s4.x, s4.y, s4.z, s4.w};
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                int key = key_base + my_half * (FWD_BLOCK_K / 2) + c + e;
#if SCORE_MASK  // the masked score, written back below: the second pass reads it instead of the masks again
                s[e] = masked_score(s[e] * scale_log2, my_query, key, masked, vis, masks);
                tile_max = fmaxf(tile_max, s[e]);
#else
                bool hidden = masked && vis.key_hidden(my_query, key);
                tile_max = fmaxf(tile_max, hidden ? -INFINITY : s[e] * scale_log2);
#endif
            }
#if SCORE_MASK
            *reinterpret_cast<float4 *>(s_row + c) = make_float4(s[0], s[1], s[2], s[3]);  // this lane's own scores
#endif
        }
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 16));
        const float new_max = fmaxf(row_max, tile_max);
        const float base = new_max == -INFINITY ? 0.f : new_max;
        float tile_sum = 0.f;
        elem_t *p_row = scratch.probs + my_row * PLD + my_half * (FWD_BLOCK_K / 2);
#pragma unroll
        for (int c = 0; c < FWD_BLOCK_K / 2; c += 4) {
            float4 s4 = *reinterpret_cast<const float4 *>(s_row + c);
            float s[4] = {s4.x, s4.y, s4.z, s4.w};
#pragma unroll
            for (int e = 0; e < 4; ++e) {
#if SCORE_MASK
                const float p = exp2f(s[e] - base);  // 0 where hidden (-inf)
#else
                int key = key_base + my_half * (FWD_BLOCK_K / 2) + c + e;
                bool hidden = masked && vis.key_hidden(my_query, key);
                const float p = hidden ? 0.f : exp2f(s[e] * scale_log2 - base);
#endif
                tile_sum += p;
                p_row[c + e] = from_float(p);
            }
        }
        tile_sum += __shfl_xor_sync(0xffffffffu, tile_sum, 16);
        const float alpha = exp2f(row_max - base);
        row_sum = row_sum * alpha + tile_sum;
        row_max = new_max;
        if (my_half == 0) scratch.row[my_row] = alpha;
        __syncwarp();
        float row_alpha[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) row_alpha[i] = scratch.row[row_of[i]];
#pragma unroll
        for (int j = 0; j < FRAGS_D; ++j)
#pragma unroll
            for (int i = 0; i < 8; ++i) o_acc[j].x[i] *= row_alpha[i];
#endif

        // O += P V
        frag_a p_frag[FWD_BLOCK_K / 16];
#pragma unroll
        for (int c = 0; c < FWD_BLOCK_K / 16; ++c) wmma::load_matrix_sync(p_frag[c], scratch.probs + c * 16, PLD);
#pragma unroll
        for (int j = 0; j < FRAGS_D; ++j)
#pragma unroll
            for (int c = 0; c < FWD_BLOCK_K / 16; ++c) {
                frag_b_row v_frag;
                wmma::load_matrix_sync(v_frag, v_tile + c * 16 * LD + j * 16, LD);
                wmma::mma_sync(o_acc[j], p_frag[c], v_frag, o_acc[j]);
            }
        __syncthreads();  // every warp is done with this stage before it is refilled
    }
    wait_copies<0>();

    // epilogue: O / l, LSE = (max + log2 l) * ln 2; a row that saw no key: O = 0, LSE = -inf. The tests
    // are !(l <= 0), not l > 0: a NaN score makes l NaN, and the row's LSE must be NaN as its O is, not -inf
    float *lse_rows = lse + batch * lse_sb + head * lse_sh;
    const int rows = min(16, seqlen_q - warp_query);
#if REGISTER_SOFTMAX
    float inv_sum[ACC_ROWS];
#pragma unroll
    for (int r = 0; r < ACC_ROWS; ++r) {
        const float total = row_sum_across_lanes(row_sum[r]);
        inv_sum[r] = !(total <= 0.f) ? 1.f / total : 0.f;
        const int row = row_of[first_element_of_slot(r)];
        if (row < rows) lse_rows[warp_query + row] = !(total <= 0.f) ? (row_max[r] + log2f(total)) * LN2 : -INFINITY;
    }
#pragma unroll
    for (int j = 0; j < FRAGS_D; ++j)
#pragma unroll
        for (int i = 0; i < 8; ++i) o_acc[j].x[i] *= inv_sum[ACC_SLOT[i]];
#else
    const float inv_sum = !(row_sum <= 0.f) ? 1.f / row_sum : 0.f;
    if (my_half == 0) {
        scratch.row[my_row] = inv_sum;
        if (my_row < rows) lse_rows[my_query] = !(row_sum <= 0.f) ? (row_max + log2f(row_sum)) * LN2 : -INFINITY;
    }
    __syncwarp();
    float row_inv[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) row_inv[i] = scratch.row[row_of[i]];
#pragma unroll
    for (int j = 0; j < FRAGS_D; ++j)
#pragma unroll
        for (int i = 0; i < 8; ++i) o_acc[j].x[i] *= row_inv[i];
#endif
    __syncthreads();  // the K/V stages become the staging area
    float *staged = staged_out + warp * 16 * OUT_LD;
    stage_rows(staged, o_acc);
    if (rows > 0) store_rows(out + batch * o_sb + head * o_sh + warp_query * o_sn, o_sn, staged, rows, lane);
}

// ==== backward =====================================================================================
// delta_i = sum_d dO_id * O_id in float32 (one warp per row): the softmax Jacobian's row term.
extern "C" __global__ void attention_backward_delta(const elem_t *__restrict__ out, const elem_t *__restrict__ grad_out,
                                                    float *__restrict__ delta, long o_sb, long o_sh, long o_sn,
                                                    long g_sb, long g_sh, long g_sn, int heads, int seqlen_q) {
    const int warp = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x % 32;
    if (warp >= seqlen_q) return;
    const int batch = blockIdx.y / heads, head = blockIdx.y % heads;
    const elem_t *o = out + batch * o_sb + head * o_sh + warp * o_sn;
    const elem_t *g = grad_out + batch * g_sb + head * g_sh + warp * g_sn;
    float sum = 0.f;
    for (int c = lane; c < HEAD_DIM; c += 32) sum += to_float(o[c]) * to_float(g[c]);
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    if (lane == 0) delta[blockIdx.y * (long)seqlen_q + warp] = sum;
}

constexpr int BWD_ROWS = 16 * BWD_WARPS;  // owned rows: keys (dK/dV pass) or queries (dQ pass)
constexpr int BWD_THREADS = 32 * BWD_WARPS;
constexpr int BWD_OWN_BYTES = 2 * tile_bytes(BWD_ROWS);  // K and V, or Q and dO
constexpr int BWD_STREAM_BYTES = max_of(BWD_STAGES * (2 * tile_bytes(BWD_BLOCK_N) + 2 * align_up(BWD_BLOCK_N * 4)),
                                        staging_bytes(BWD_WARPS));
constexpr int BWD_SCRATCH_BYTES = BWD_WARPS * scratch_bytes(BWD_BLOCK_N);
static_assert(BWD_OWN_BYTES + BWD_STREAM_BYTES + BWD_SCRATCH_BYTES == BWD_SMEM_BYTES,
              "backward shared memory differs from the plan (portattn/backends/cupy/plan.py)");
static_assert(BWD_BLOCK_N % 16 == 0 && (BWD_BLOCK_N / 2) % 4 == 0, "streamed block: whole fragments");

// One stage of the streamed side: two operand tiles and, for query tiles, their LSE and delta.
struct Stage {
    elem_t *first, *second;
    float *lse, *delta;
    __device__ Stage(char *base, int index) {
        char *mine = base + index * (2 * tile_bytes(BWD_BLOCK_N) + 2 * align_up(BWD_BLOCK_N * 4));
        first = reinterpret_cast<elem_t *>(mine);
        second = reinterpret_cast<elem_t *>(mine + tile_bytes(BWD_BLOCK_N));
        lse = reinterpret_cast<float *>(mine + 2 * tile_bytes(BWD_BLOCK_N));
        delta = reinterpret_cast<float *>(mine + 2 * tile_bytes(BWD_BLOCK_N) + align_up(BWD_BLOCK_N * 4));
    }
};

// The probabilities and score gradients of a warp's 16 x BWD_BLOCK_N tile, in two steps around the
// dP product: `probabilities` turns S (in `acc`) into P = exp2(S * scale_log2 - LSE_log2), masked,
// and writes it as 16-bit into scratch.probs; `score_gradients` turns dP (in `acc`) into
// dS = P * (dP - delta) in scratch.probs, in place. TRANSPOSED: the tile's rows are keys and its
// columns queries (the dK/dV pass); otherwise the reverse. LSE/delta are per column (`col_lse`,
// `col_delta`, in shared memory) when TRANSPOSED, else per row (`row_lse`, `row_delta`: for the
// register path one per row slot, for the shared-memory path this lane's row lane % 16).
struct TileContext {
    int row_base, col_base;  // positions of the warp tile's first row and first column
    bool masked;
    Visibility vis;
#if SCORE_MASK
    ScoreMask masks;  // moved to the tile's (batch, query head)
#endif

    template <bool TRANSPOSED>
    __device__ __forceinline__ bool hidden(int row, int col) const {
        return masked && (TRANSPOSED ? vis.hidden(col_base + col, row_base + row) : vis.hidden(row_base + row, col_base + col));
    }
#if SCORE_MASK
    // x = s * scale_log2 -> the score in log2 units, -INFINITY where hidden (masked_score)
    template <bool TRANSPOSED>
    __device__ __forceinline__ float score(int row, int col, float x) const {
        return TRANSPOSED ? masked_score(x, col_base + col, row_base + row, masked, vis, masks)
                          : masked_score(x, row_base + row, col_base + col, masked, vis, masks);
    }
#endif
};

// Visit each element of a warp's 16 x COLUMNS tile: fn(row, col, slot, value, prob), with `value`
// the element's float32 and `prob` its 16-bit cell in scratch.probs. Register path: straight from the
// accumulators; `slot` is the row's place among the lane's rows (ACC_SLOT). Shared-memory path: the
// tile is staged as float32 and each lane takes half a row (row lane % 16, half lane / 16), 4 floats
// at a time; a lane holds one row, so `slot` is 0.
template <int COLUMNS, class Fn>
__device__ __forceinline__ void for_each_element(frag_acc (&acc)[COLUMNS / 16], WarpScratch<COLUMNS> &scratch,
                                                 const int row_of[8], const int col_of[8], int lane, Fn fn) {
    constexpr int PLD = WarpScratch<COLUMNS>::PLD;
#if REGISTER_SOFTMAX
#pragma unroll
    for (int c = 0; c < COLUMNS / 16; ++c)
#pragma unroll
        for (int i = 0; i < 8; ++i)
            fn(row_of[i], c * 16 + col_of[i], ACC_SLOT[i], acc[c].x[i], scratch.probs[row_of[i] * PLD + c * 16 + col_of[i]]);
#else
    stage_scores<COLUMNS>(scratch.scores, acc);
    const int my_row = lane % 16, my_half = lane / 16;
    const float *s_row = scratch.scores + my_row * WarpScratch<COLUMNS>::SLD + my_half * (COLUMNS / 2);
    elem_t *p_row = scratch.probs + my_row * PLD + my_half * (COLUMNS / 2);
#pragma unroll
    for (int c = 0; c < COLUMNS / 2; c += 4) {
        const float4 s4 = *reinterpret_cast<const float4 *>(s_row + c);
        const float s[4] = {s4.x, s4.y, s4.z, s4.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) fn(my_row, my_half * (COLUMNS / 2) + c + e, 0, s[e], p_row[c + e]);
    }
#endif
    __syncwarp();
}

template <bool TRANSPOSED>
__device__ __forceinline__ void probabilities(frag_acc (&acc)[BWD_BLOCK_N / 16], WarpScratch<BWD_BLOCK_N> &scratch,
                                              const float *col_lse, const float *row_lse, const TileContext &tile,
                                              float scale_log2, const int row_of[8], const int col_of[8], int lane) {
#if SCORE_MASK && REGISTER_SOFTMAX
    stage_bias<BWD_BLOCK_N, TRANSPOSED>(scratch.scores, lane, [&](int row, int col) {
        return tile.template score<TRANSPOSED>(row, col, 0.f);
    });
#endif
    for_each_element<BWD_BLOCK_N>(acc, scratch, row_of, col_of, lane, [&](int row, int col, int slot, float s, elem_t &p) {
        const float lse_log2 = TRANSPOSED ? col_lse[col] : row_lse[slot];
#if SCORE_MASK && REGISTER_SOFTMAX  // the staged bias: -inf where hidden, so P = 0 (even for a NaN score)
        const float bias = scratch.scores[row * WarpScratch<BWD_BLOCK_N>::SLD + col];
        p = from_float(bias == -INFINITY ? 0.f : exp2f(s * scale_log2 + bias - lse_log2));
#elif SCORE_MASK
        p = from_float(exp2f(tile.template score<TRANSPOSED>(row, col, s * scale_log2) - lse_log2));  // 0 where hidden
#else
        p = from_float(tile.template hidden<TRANSPOSED>(row, col) ? 0.f : exp2f(s * scale_log2 - lse_log2));
#endif
    });
}

template <bool TRANSPOSED>
__device__ __forceinline__ void score_gradients(frag_acc (&acc)[BWD_BLOCK_N / 16], WarpScratch<BWD_BLOCK_N> &scratch,
                                                const float *col_delta, const float *row_delta, const int row_of[8],
                                                const int col_of[8], int lane) {
    __syncwarp();  // every lane has read P as an operand before it is overwritten
    for_each_element<BWD_BLOCK_N>(acc, scratch, row_of, col_of, lane, [&](int row, int col, int slot, float dp, elem_t &p) {
        p = from_float(to_float(p) * (dp - (TRANSPOSED ? col_delta[col] : row_delta[slot])));
    });
}

// acc(16 x D) += probs(16 x BWD_BLOCK_N) @ tile(BWD_BLOCK_N x D)
__device__ __forceinline__ void accumulate_probs_times_tile(frag_acc *acc, const WarpScratch<BWD_BLOCK_N> &scratch,
                                                            const elem_t *tile) {
#pragma unroll
    for (int c = 0; c < BWD_BLOCK_N / 16; ++c) {
        frag_a a;
        wmma::load_matrix_sync(a, scratch.probs + c * 16, WarpScratch<BWD_BLOCK_N>::PLD);
#pragma unroll
        for (int j = 0; j < FRAGS_D; ++j) {
            frag_b_row b;
            wmma::load_matrix_sync(b, tile + c * 16 * LD + j * 16, LD);
            wmma::mma_sync(acc[j], a, b, acc[j]);
        }
    }
}

// dK, dV for 16*BWD_WARPS keys of one (batch, kv head); streams the query blocks that can see them,
// for every query head of the group (GQA sums in registers, no atomics). grid = (key blocks, batch * kv heads).
extern "C" __global__ void __launch_bounds__(BWD_THREADS)
attention_backward_dkdv(const elem_t *__restrict__ q, const elem_t *__restrict__ k, const elem_t *__restrict__ v,
                        const elem_t *__restrict__ grad_out, const float *__restrict__ lse, const float *__restrict__ delta,
                        elem_t *__restrict__ dk, elem_t *__restrict__ dv,
                        long q_sb, long q_sh, long q_sn, long k_sb, long k_sh, long k_sn, long v_sb, long v_sh, long v_sn,
                        long g_sb, long g_sh, long g_sn, long dk_sb, long dk_sh, long dk_sn, long dv_sb, long dv_sh, long dv_sn,
                        int heads, int group, int seqlen_q, int seqlen_k, int query_offset, int window_left,
                        int window_right, float scale, float scale_log2 SCORE_MASK_PARAMS) {
    extern __shared__ __align__(128) char smem[];
    elem_t *k_tile = reinterpret_cast<elem_t *>(smem);
    elem_t *v_tile = reinterpret_cast<elem_t *>(smem + tile_bytes(BWD_ROWS));
    char *stages = smem + BWD_OWN_BYTES;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    WarpScratch<BWD_BLOCK_N> scratch(smem + BWD_OWN_BYTES + BWD_STREAM_BYTES, warp);
    const int kv_heads = heads / group;
    const int batch = blockIdx.y / kv_heads, kv_head = blockIdx.y % kv_heads;
    const int k_start = blockIdx.x * BWD_ROWS;

    load_tile<BWD_ROWS, BWD_THREADS>(k_tile, k + batch * k_sb + kv_head * k_sh + k_start * k_sn, k_sn,
                                     min(BWD_ROWS, seqlen_k - k_start), tid);
    load_tile<BWD_ROWS, BWD_THREADS>(v_tile, v + batch * v_sb + kv_head * v_sh + k_start * v_sn, v_sn,
                                     min(BWD_ROWS, seqlen_k - k_start), tid);
    commit_copies();

    // the query blocks that see any of these keys (causal, window): the others are never loaded
    const Visibility vis{seqlen_q, seqlen_k, query_offset, window_left, window_right};
#if SCORE_MASK
    const ScoreMask masks = SCORE_MASK_FROM_PARAMS;  // moved to each step's query head below
#endif
    const int2 queries = vis.query_range(k_start, k_start + BWD_ROWS - 1);
    const int first_query = queries.x / BWD_BLOCK_N * BWD_BLOCK_N;
    const int blocks_per_head = queries.y > queries.x ? (queries.y - first_query + BWD_BLOCK_N - 1) / BWD_BLOCK_N : 0;
    const int steps = group * blocks_per_head;
    auto load_step = [&](int s) {
        const int head = kv_head * group + s / blocks_per_head;
        const int q_start = first_query + (s % blocks_per_head) * BWD_BLOCK_N;
        const int rows = min(BWD_BLOCK_N, seqlen_q - q_start);
        Stage stage(stages, s % BWD_STAGES);
        load_tile<BWD_BLOCK_N, BWD_THREADS>(stage.first, q + batch * q_sb + head * q_sh + q_start * q_sn, q_sn, rows, tid);
        load_tile<BWD_BLOCK_N, BWD_THREADS>(stage.second, grad_out + batch * g_sb + head * g_sh + q_start * g_sn, g_sn, rows, tid);
        const long row_base = (long(batch) * heads + head) * seqlen_q + q_start;
        for (int i = tid; i < BWD_BLOCK_N; i += BWD_THREADS) {
            float l = i < rows ? lse[row_base + i] : INFINITY;  // padding rows: P = 0
            stage.lse[i] = l == -INFINITY ? INFINITY : l * LOG2E;  // a row that saw no key has no gradient
            stage.delta[i] = i < rows ? delta[row_base + i] : 0.f;
        }
    };
#pragma unroll
    for (int s = 0; s < BWD_STAGES - 1; ++s) {
        if (s < steps) load_step(s);
        commit_copies();
    }

    int row_of[8], col_of[8];
    probe_layout(scratch.scores, WarpScratch<BWD_BLOCK_N>::SLD, lane, row_of, col_of);
    frag_acc dk_acc[FRAGS_D], dv_acc[FRAGS_D];
#pragma unroll
    for (int j = 0; j < FRAGS_D; ++j) {
        wmma::fill_fragment(dk_acc[j], 0.f);
        wmma::fill_fragment(dv_acc[j], 0.f);
    }
    const int warp_key = k_start + warp * 16;
    const elem_t *k_rows = k_tile + warp * 16 * LD, *v_rows = v_tile + warp * 16 * LD;

    for (int s = 0; s < steps; ++s) {
        if (s + BWD_STAGES - 1 < steps) load_step(s + BWD_STAGES - 1);
        commit_copies();
        wait_copies<BWD_STAGES - 1>();
        __syncthreads();
        Stage stage(stages, s % BWD_STAGES);
        const int q_start = first_query + (s % blocks_per_head) * BWD_BLOCK_N;
        // mask where a causal or window edge, or the end of the queries or keys, cuts this warp's tile
        const TileContext tile{warp_key, q_start, vis.cuts(q_start, q_start + BWD_BLOCK_N - 1, warp_key, warp_key + 15), vis
#if SCORE_MASK
                               , masks.at(batch, kv_head * group + s / blocks_per_head)
#endif
        };
        frag_acc acc[BWD_BLOCK_N / 16];
        rows_times_tile_t<BWD_BLOCK_N>(acc, k_rows, stage.first);  // S^T = K Q^T
        probabilities<true>(acc, scratch, stage.lse, nullptr, tile, scale_log2, row_of, col_of, lane);
        accumulate_probs_times_tile(dv_acc, scratch, stage.second);  // dV += P^T dO
        rows_times_tile_t<BWD_BLOCK_N>(acc, v_rows, stage.second);  // dP^T = V dO^T
        score_gradients<true>(acc, scratch, stage.delta, nullptr, row_of, col_of, lane);
        accumulate_probs_times_tile(dk_acc, scratch, stage.first);  // dK += dS^T Q
        __syncthreads();
    }
    wait_copies<0>();
    __syncthreads();  // the stages become the staging area

    const int rows = min(16, seqlen_k - warp_key);
    float *staged = reinterpret_cast<float *>(stages) + warp * 16 * OUT_LD;
    stage_rows(staged, dv_acc);
    if (rows > 0) store_rows(dv + batch * dv_sb + kv_head * dv_sh + warp_key * dv_sn, dv_sn, staged, rows, lane);
    __syncwarp();
    scale_all(dk_acc, scale);
    stage_rows(staged, dk_acc);
    if (rows > 0) store_rows(dk + batch * dk_sb + kv_head * dk_sh + warp_key * dk_sn, dk_sn, staged, rows, lane);
}

// dQ for 16*BWD_WARPS queries of one (batch, head); streams the key blocks they can see.
// grid = (query blocks, batch * heads).
extern "C" __global__ void __launch_bounds__(BWD_THREADS)
attention_backward_dq(const elem_t *__restrict__ q, const elem_t *__restrict__ k, const elem_t *__restrict__ v,
                      const elem_t *__restrict__ grad_out, const float *__restrict__ lse, const float *__restrict__ delta,
                      elem_t *__restrict__ dq,
                      long q_sb, long q_sh, long q_sn, long k_sb, long k_sh, long k_sn, long v_sb, long v_sh, long v_sn,
                      long g_sb, long g_sh, long g_sn, long dq_sb, long dq_sh, long dq_sn,
                      int heads, int group, int seqlen_q, int seqlen_k, int query_offset, int window_left,
                      int window_right, float scale, float scale_log2 SCORE_MASK_PARAMS) {
    extern __shared__ __align__(128) char smem[];
    elem_t *q_tile = reinterpret_cast<elem_t *>(smem);
    elem_t *g_tile = reinterpret_cast<elem_t *>(smem + tile_bytes(BWD_ROWS));
    char *stages = smem + BWD_OWN_BYTES;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    WarpScratch<BWD_BLOCK_N> scratch(smem + BWD_OWN_BYTES + BWD_STREAM_BYTES, warp);
    const int batch = blockIdx.y / heads, head = blockIdx.y % heads, kv_head = head / group;
    const int q_start = blockIdx.x * BWD_ROWS;
    const int rows_here = min(BWD_ROWS, seqlen_q - q_start);

    load_tile<BWD_ROWS, BWD_THREADS>(q_tile, q + batch * q_sb + head * q_sh + q_start * q_sn, q_sn, rows_here, tid);
    load_tile<BWD_ROWS, BWD_THREADS>(g_tile, grad_out + batch * g_sb + head * g_sh + q_start * g_sn, g_sn, rows_here, tid);
    commit_copies();
    k += batch * k_sb + kv_head * k_sh;
    v += batch * v_sb + kv_head * v_sh;

    // the key blocks any of these queries sees (causal, window): the others are never loaded
    const Visibility vis{seqlen_q, seqlen_k, query_offset, window_left, window_right};
#if SCORE_MASK
    const ScoreMask masks = SCORE_MASK_FROM_PARAMS.at(batch, head);
#endif
    const int2 keys = vis.key_range(q_start, q_start + BWD_ROWS - 1);
    const int first_block = keys.x / BWD_BLOCK_N;
    const int steps = keys.y > keys.x ? (keys.y + BWD_BLOCK_N - 1) / BWD_BLOCK_N - first_block : 0;
    auto load_step = [&](int s) {
        const int key_base = (first_block + s) * BWD_BLOCK_N, rows = min(BWD_BLOCK_N, seqlen_k - key_base);
        Stage stage(stages, s % BWD_STAGES);
        load_tile<BWD_BLOCK_N, BWD_THREADS>(stage.first, k + key_base * k_sn, k_sn, rows, tid);
        load_tile<BWD_BLOCK_N, BWD_THREADS>(stage.second, v + key_base * v_sn, v_sn, rows, tid);
    };
#pragma unroll
    for (int s = 0; s < BWD_STAGES - 1; ++s) {
        if (s < steps) load_step(s);
        commit_copies();
    }

    int row_of[8], col_of[8];
    probe_layout(scratch.scores, WarpScratch<BWD_BLOCK_N>::SLD, lane, row_of, col_of);
    const int warp_query = q_start + warp * 16;
    const long row_base = (long(batch) * heads + head) * seqlen_q + warp_query;
    // LSE (log2) and delta of this lane's rows: one per row slot (register path) or row lane % 16
#if REGISTER_SOFTMAX
    constexpr int ROWS_HELD = ACC_ROWS;
#else
    constexpr int ROWS_HELD = 1;
#endif
    float row_lse[ROWS_HELD], row_delta[ROWS_HELD];
#pragma unroll
    for (int r = 0; r < ROWS_HELD; ++r) {
#if REGISTER_SOFTMAX
        const int row = row_of[first_element_of_slot(r)];
#else
        const int row = lane % 16;
#endif
        const bool valid = warp_query + row < seqlen_q;
        const float l = valid ? lse[row_base + row] : INFINITY;  // padding rows: P = 0
        row_lse[r] = l == -INFINITY ? INFINITY : l * LOG2E;  // a row that saw no key has no gradient
        row_delta[r] = valid ? delta[row_base + row] : 0.f;
    }
    frag_acc dq_acc[FRAGS_D];
#pragma unroll
    for (int j = 0; j < FRAGS_D; ++j) wmma::fill_fragment(dq_acc[j], 0.f);
    const elem_t *q_rows = q_tile + warp * 16 * LD, *g_rows = g_tile + warp * 16 * LD;

    for (int s = 0; s < steps; ++s) {
        if (s + BWD_STAGES - 1 < steps) load_step(s + BWD_STAGES - 1);
        commit_copies();
        wait_copies<BWD_STAGES - 1>();
        __syncthreads();
        Stage stage(stages, s % BWD_STAGES);
        const int key_base = (first_block + s) * BWD_BLOCK_N;
        const TileContext tile{warp_query, key_base, vis.cuts(warp_query, warp_query + 15, key_base, key_base + BWD_BLOCK_N - 1),
                               vis
#if SCORE_MASK
                               , masks
#endif
        };
        frag_acc acc[BWD_BLOCK_N / 16];
        rows_times_tile_t<BWD_BLOCK_N>(acc, q_rows, stage.first);  // S = Q K^T
        probabilities<false>(acc, scratch, nullptr, row_lse, tile, scale_log2, row_of, col_of, lane);
        rows_times_tile_t<BWD_BLOCK_N>(acc, g_rows, stage.second);  // dP = dO V^T
        score_gradients<false>(acc, scratch, nullptr, row_delta, row_of, col_of, lane);
        accumulate_probs_times_tile(dq_acc, scratch, stage.first);  // dQ += dS K
        __syncthreads();
    }
    wait_copies<0>();
    __syncthreads();

    const int rows = min(16, seqlen_q - warp_query);
    float *staged = reinterpret_cast<float *>(stages) + warp * 16 * OUT_LD;
    scale_all(dq_acc, scale);
    stage_rows(staged, dq_acc);
    if (rows > 0) store_rows(dq + batch * dq_sb + head * dq_sh + warp_query * dq_sn, dq_sn, staged, rows, lane);
}
