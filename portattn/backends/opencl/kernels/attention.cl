/* portattn: FlashAttention-2 in OpenCL C 1.2 (core only), float32 arithmetic.
 *
 * Compile-time constants (-D build options from the plan, portattn/backends/opencl/plan.py):
 *   PROGRAM    0: the forward kernel; 1: the backward kernels (each program is built on its own).
 *   TM, TN, VW the work-group is a TM x TN grid of work-items (TM * TN of them); a score tile is
 *              ROWS x COLS = (RM TM) x (CN VW TN). Work-item (tm, tn) owns the scores of rows
 *              tm + TM i (i < RM) and columns (tn + TN j) VW .. + VW - 1 (j < CN): CN vectors of VW
 *              floats per row (VW is the device's preferred float vector width in the forward of a
 *              CPU device, else 4). Interleaved rows and column vectors make neighbouring
 *              work-items read neighbouring local memory (no bank conflicts on GPUs).
 *   RM, CN     the work-item's register tile, RM rows x CN vectors (default 4 x 1; the backward
 *              program is always 4 x 1). A taller or wider tile reads fewer local operands per FMA
 *              (RM + 4 CN loads per 4 RM CN VW FMAs) at the cost of registers. Loops over the tile
 *              are unrolled (#pragma unroll): PoCL keeps a private array in memory unless every
 *              index into it is a constant (without the pragmas its forward ran 15% slower).
 *   HEAD_DIM   D; D_PAD is D rounded up to VW TN: work-item tn owns accumulator columns
 *              VW (c TN + tn) .. + VW - 1 for c < CHUNKS (interleaved vector pieces).
 *   PIECES_INNER  1 on GPUs: tile_accumulate's loop over accumulator pieces runs inside its loop
 *              over keys (weights read once per step); 0 under PoCL, which keeps accumulators in memory.
 *   KC         the forward stages K^T in local memory KC head-dim columns at a time (a multiple
 *              of VW TN dividing D_PAD; default D_PAD, all of them), and V in as many pieces into
 *              a whole V tile. Chunks free the local memory that a whole K^T tile would take at
 *              large head dims, for a taller Q tile, at two barriers per chunk; V stays whole so
 *              that P V runs once per key tile over all accumulator pieces (P read once).
 *   DTYPE      storage of q, k, v, out, grads: 0 float32, 1 float16 (vload_half/vstore_half, core
 *              OpenCL: no cl_khr_fp16 needed), 2 bfloat16 (ushort bits, widened by a shift).
 *   ALIGNED    1 when every row of the call's arrays starts a multiple of 4 elements into its
 *              buffer: quads of elements move as single 16- or 8-byte accesses (storage types).
 *   CAUSAL_OR_WINDOW  1 when some keys of a row are hidden by position (the host folds causal into
 *              the window's right bound); 0 compiles the position checks out.
 *   SOFTCAP, ALIBI, MASK (0 none, 1 bool, 2 additive), KEY_PADDING: the score features.
 *
 * Local memory, all float32, rows padded by VW floats (LD, LDS, LDT) so that row r starts VW r
 * banks on and every vector access stays aligned:
 *   forward: Q tile ROWS x D_PAD unpadded, its quads swizzled instead (quad c of row r at quad
 *            c ^ (r & QSW)): rows read together still start in different banks without ROWS x VW
 *            floats of padding. A K^T chunk KC x LDT: K is stored transposed so that the score
 *            product reads one VW-vector of K per head-dim step, no transposes in registers. V
 *            COLS x D_PAD, unpadded (a row's readers take adjacent vectors). P tile ROWS x LDS,
 *            whose padding (P_PAD >= TN floats per row) holds the row maxima and sums that the TN
 *            work-items of a row exchange: at D = 128 on NVIDIA's 48 KiB every byte counts.
 *   dK/dV:   K, V tiles ROWS x LD, Q, dO tiles COLS x LD, P-then-dS tile ROWS x LDS, 2 x COLS row stats.
 *   dQ:      Q, dO tiles ROWS x LD, K, V tiles COLS x LD, dS tile ROWS x LDS.
 * The planner computes the same sums (forward_local_bytes, ...) and the host checks them against
 * the device's CL_DEVICE_LOCAL_MEM_SIZE before building.
 *
 * Scores are kept in log2 units (scale * log2(e) folded in) so the softmax uses exp2.
 *
 * Arithmetic is written with operators (a * b + c, fused by -cl-mad-enable), not fma()/mad()/vloadn:
 * PoCL's binary builds call those built-ins out of line, which made the inner loops 3x slower.
 */

#ifndef RM
#define RM 4
#endif
#ifndef CN
#define CN 1
#endif
#if RM % 4
#error "RM must be a multiple of 4 (the forward keeps row statistics four rows to a vector)"
#endif
#define ROWS (RM * TM)
#define COLS (CN * VW * TN)
#define THREADS (TM * TN)
#define LD (D_PAD + VW)
/* the forward Q tile's swizzle mask: up to 8 rows apart in quads, within a row's D_PAD / 4 quads; none
 * under PoCL (no banks: local memory is cache, and unswizzled rows leave the score product's Q reads
 * at constant offsets instead of per-read index arithmetic) */
#if !PIECES_INNER
#define QSW 0
#elif D_PAD % 32 == 0
#define QSW 7
#elif D_PAD % 16 == 0
#define QSW 3
#elif D_PAD % 8 == 0
#define QSW 1
#else
#define QSW 0
#endif
#if PROGRAM == 0
#define P_PAD (VW * ((TN + VW - 1) / VW)) /* room for TN row partials, whole vectors */
#else
#define P_PAD VW
#endif
#define LDS (COLS + P_PAD)
#define LDT (COLS + VW)
#define CHUNKS (D_PAD / (VW * TN))
#ifndef KC
#define KC D_PAD
#endif

#if VW == 4
typedef float4 floatV;
#elif VW == 8
typedef float8 floatV;
#elif VW == 16
typedef float16 floatV;
#else
#error "VW must be 4, 8 or 16"
#endif
/* a vector's lanes by index (private arrays indexed by loop constants fold into registers) */
typedef union {
    floatV v;
    float e[VW];
} lanes_t;
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

/* ---------------------------------------------------------------------------------------------
 * storage types. LOAD4 / STORE4 move four elements at p + i. With ALIGNED (set by the host when
 * every row of the call's arrays starts a multiple of 4 elements into its buffer and HEAD_DIM % 4
 * == 0) a quad is one 16-byte (8-byte for 16-bit types) access; else vload4 / vload_half4, which
 * may only assume element alignment: NVIDIA's compiler splits them into four 4-byte loads, whose
 * separate cache requests took the bandwidth that the local-memory tile products need (H100,
 * D = 128, fp32: 23.2 -> 26.0 TFLOP/s with whole quads).
 */
#if DTYPE == 0
typedef float elem_t;
#define LOAD1(p, i) ((p)[i])
#define STORE1(p, i, x) ((p)[i] = (x))
#if ALIGNED
#define LOAD4(p, i) (*(__global const float4 *)((p) + (i)))
#define STORE4(p, i, x) (*(__global float4 *)((p) + (i)) = (x))
#else
#define LOAD4(p, i) vload4(0, (p) + (i))
#define STORE4(p, i, x) vstore4((x), 0, (p) + (i))
#endif
#elif DTYPE == 1
typedef half elem_t; /* core OpenCL allows half pointers for vload_half / vstore_half */
#define LOAD1(p, i) vload_half((i), (p))
#define STORE1(p, i, x) vstore_half_rte((x), (i), (p))
#if ALIGNED
/* four halves as one 8-byte word, converted from a private copy (no half variables without cl_khr_fp16) */
inline float4 load4_aligned(__global const half *p)
{
    const uint2 bits = *(__global const uint2 *)p;
    return vload_half4(0, (const __private half *)&bits);
}
#define LOAD4(p, i) load4_aligned((p) + (i))
#else
#define LOAD4(p, i) vload_half4(0, (p) + (i))
#endif
/* stores stay vstore_half4 (outputs are written once per row; the private-copy store gave NaN under PoCL) */
#define STORE4(p, i, x) vstore_half4_rte((x), 0, (p) + (i))
#else
typedef ushort elem_t;
inline ushort float_to_bf16(float x)
{
    uint u = as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (ushort)((u >> 16) | 0x40u); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);                                       /* round to nearest even */
    return (ushort)(u >> 16);
}
inline ushort4 float4_to_bf16(float4 x)
{
    return (ushort4)(float_to_bf16(x.s0), float_to_bf16(x.s1), float_to_bf16(x.s2), float_to_bf16(x.s3));
}
#define LOAD1(p, i) as_float((uint)((p)[i]) << 16)
#define STORE1(p, i, x) ((p)[i] = float_to_bf16(x))
#if ALIGNED
#define LOAD4(p, i) as_float4(convert_uint4(*(__global const ushort4 *)((p) + (i))) << 16)
#define STORE4(p, i, x) (*(__global ushort4 *)((p) + (i)) = float4_to_bf16(x))
#else
#define LOAD4(p, i) as_float4(convert_uint4(vload4(0, (p) + (i))) << 16)
#define STORE4(p, i, x) vstore4(float4_to_bf16(x), 0, (p) + (i))
#endif
#endif

#if MASK == 2
typedef float mask_t; /* additive masks arrive as float32 whatever the inputs' dtype */
#else
typedef uchar mask_t; /* bool masks as 0 / 1 bytes; also the placeholder type when there is none */
#endif

#define LOCAL4(p, offset) (*(__local float4 *)((p) + (offset)))
#define LOCALV(p, offset) (*(__local floatV *)((p) + (offset)))
#define COMPONENT(x, j) ((j) == 0 ? (x).s0 : (j) == 1 ? (x).s1 : (j) == 2 ? (x).s2 : (x).s3)

/* ---------------------------------------------------------------------------------------------
 * tile movement and the tile products every kernel is made of
 */

inline float element(__global const elem_t *p, int c) { return c < HEAD_DIM ? LOAD1(p, c) : 0.0f; }

/* elements c .. c + 3 of a row (zero past HEAD_DIM, and for rows at or past `limit`) */
inline float4 read_quad(__global const elem_t *src, long stride, int row, int limit, int c)
{
    if (row >= limit) return (float4)(0.0f);
    __global const elem_t *p = src + row * stride;
    if (D_PAD == HEAD_DIM || c + 4 <= HEAD_DIM) return LOAD4(p, c); /* a constant test when D is unpadded */
    return (float4)(element(p, c), element(p, c + 1), element(p, c + 2), element(p, c + 3));
}

/* where column c (a multiple of 4) of row r sits in a local tile of row stride `ld` whose quads are
 * swizzled by `swizzle` (0: not swizzled; the forward's Q tile: QSW) */
inline int tile_offset(int r, int c, int ld, int swizzle) { return r * ld + (c ^ ((r & swizzle) << 2)); }

/* rows [row0, row0 + tile_rows) of a (rows x HEAD_DIM) matrix whose rows are `stride` elements
 * apart into a local tile (tile_offset's `ld` and `swizzle`); rows at or past `limit` and columns
 * at or past HEAD_DIM are zero (so padded rows and columns add nothing to any product). */
inline void load_tile(__local float *dst, int ld, int swizzle, __global const elem_t *src, long stride, int row0,
                      int limit, int tile_rows)
{
    const int quads = D_PAD / 4;
    for (int index = get_local_id(0); index < tile_rows * quads; index += THREADS) {
        const int r = index / quads, c = (index - r * quads) * 4;
        LOCAL4(dst, tile_offset(r, c, ld, swizzle)) = read_quad(src, stride, row0 + r, limit, c);
    }
}

/* one float per row, rows [row0, row0 + count) of a vector, into local memory (0 past `limit`) */
inline void load_row_stats(__local float *dst, __global const float *src, int row0, int limit, int count)
{
    for (int r = get_local_id(0); r < count; r += THREADS) dst[r] = row0 + r < limit ? src[row0 + r] : 0.0f;
}

/* acc + w.s0 b0 + w.s1 b1 + w.s2 b2 + w.s3 b3: four rank-1 updates of a vector, in order */
inline floatV rank4(floatV acc, float4 w, floatV b0, floatV b1, floatV b2, floatV b3)
{
    acc = w.s0 * b0 + acc;
    acc = w.s1 * b1 + acc;
    acc = w.s2 * b2 + acc;
    return w.s3 * b3 + acc;
}

/* s[i CN + j] += a[tm + TM i] . b[(tn + TN j) VW + lane] over head-dim columns dc .. dc + KC - 1,
 * with a the forward's Q tile (swizzled, QSW) and b stored transposed (bt[d LDT + n], d from dc):
 * per head-dim step of 4, RM float4s of a and 4 CN VW-vectors of bt, four rank-1 updates per pair:
 * no transposes in registers */
inline void scores_transposed(__local const float *a, int dc, __local const float *bt, int tm, int tn, floatV s[RM * CN])
{
    /* accumulate in a local array, not in s[]: s lives across barriers, and PoCL keeps such
     * variables in memory; this one (unrolled, constant indices) stays in registers through the loop */
    floatV acc[RM * CN];
#pragma unroll
    for (int x = 0; x < RM * CN; x++) acc[x] = s[x];
    for (int d = 0; d < KC; d += 4) {
        floatV y[CN][4];
#pragma unroll
        for (int j = 0; j < CN; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) y[j][e] = LOCALV(bt, (d + e) * LDT + (tn + TN * j) * VW);
#pragma unroll
        for (int i = 0; i < RM; i++) {
            const float4 w = LOCAL4(a, tile_offset(tm + TM * i, dc + d, D_PAD, QSW));
#pragma unroll
            for (int j = 0; j < CN; j++) acc[i * CN + j] = rank4(acc[i * CN + j], w, y[j][0], y[j][1], y[j][2], y[j][3]);
        }
    }
#pragma unroll
    for (int x = 0; x < RM * CN; x++) s[x] = acc[x];
}

#if VW == 4
/* s[i].sj = a[tm + TM i] . b[4 tn + j], both row-major: the backward's products, whose operands also
 * serve row-major in tile_accumulate (one layout each: local memory holds four operand tiles) */
inline void scores_rows(__local const float *a, __local const float *b, int tm, int tn, float4 s[4])
{
    for (int i = 0; i < 4; i++) s[i] = (float4)(0.0f);
    for (int d = 0; d < D_PAD; d += 4) {
        float4 y[4];
        for (int j = 0; j < 4; j++) y[j] = LOCAL4(b, (tn * 4 + j) * LD + d);
        /* y transposed in registers: four rank-1 updates per row */
        const float4 y0 = (float4)(y[0].s0, y[1].s0, y[2].s0, y[3].s0);
        const float4 y1 = (float4)(y[0].s1, y[1].s1, y[2].s1, y[3].s1);
        const float4 y2 = (float4)(y[0].s2, y[1].s2, y[2].s2, y[3].s2);
        const float4 y3 = (float4)(y[0].s3, y[1].s3, y[2].s3, y[3].s3);
        for (int i = 0; i < 4; i++) s[i] = rank4(s[i], LOCAL4(a, (tm + TM * i) * LD + d), y0, y1, y2, y3);
    }
}
#endif

/* acc[i][c] += sum_n p[tm + TM i][n] * b[n][VW (c TN + tn) .. + VW - 1] for c < CHUNKS: a
 * (ROWS x COLS) weight tile in local memory (row stride LDS) times a (COLS x D_PAD) operand tile of
 * row stride `ldb`. The trip counts are macros, not arguments: PoCL unrolls before it inlines, and
 * only a constant count unrolls there; unrolled, the private arrays' indices are constants and
 * they stay in registers. */
inline void tile_accumulate(__local const float *p, __local const float *b, int ldb, int tm, int tn,
                            floatV acc[RM][CHUNKS])
{
#if PIECES_INNER
    /* GPUs: the accumulators live in registers throughout, so each step's weights are read once for
     * every piece (local-memory loads per FMA, which bound these kernels, fall by up to half) */
    for (int n = 0; n < COLS; n += 4) {
        float4 w[RM];
#pragma unroll
        for (int i = 0; i < RM; i++) w[i] = LOCAL4(p, (tm + TM * i) * LDS + n);
#pragma unroll
        for (int c = 0; c < CHUNKS; c++) {
            __local const float *bc = b + (c * TN + tn) * VW + n * ldb;
            const floatV b0 = LOCALV(bc, 0), b1 = LOCALV(bc, ldb), b2 = LOCALV(bc, 2 * ldb), b3 = LOCALV(bc, 3 * ldb);
#pragma unroll
            for (int i = 0; i < RM; i++) acc[i][c] = rank4(acc[i][c], w[i], b0, b1, b2, b3);
        }
    }
#else
    /* PoCL: variables that live across barriers (the accumulators) are kept in memory, so one piece
     * at a time is copied into a local array, which stays in registers through the key steps */
#pragma unroll
    for (int c = 0; c < CHUNKS; c++) {
        floatV a[RM];
#pragma unroll
        for (int i = 0; i < RM; i++) a[i] = acc[i][c];
        __local const float *bc = b + (c * TN + tn) * VW;
        for (int n = 0; n < COLS; n += 4) {
            const floatV b0 = LOCALV(bc, (n + 0) * ldb), b1 = LOCALV(bc, (n + 1) * ldb);
            const floatV b2 = LOCALV(bc, (n + 2) * ldb), b3 = LOCALV(bc, (n + 3) * ldb);
#pragma unroll
            for (int i = 0; i < RM; i++) a[i] = rank4(a[i], LOCAL4(p, (tm + TM * i) * LDS + n), b0, b1, b2, b3);
        }
#pragma unroll
        for (int i = 0; i < RM; i++) acc[i][c] = a[i];
    }
#endif
}

#if !PIECES_INNER
/* PoCL's forward P V: acc[i][c] = factor[i] acc[i][c] + sum_n p[tm + TM i][n] b[n][VW (c TN + tn) ..]:
 * the online softmax's rescale by alpha rides on the copy of each accumulator piece into registers
 * (no pass of its own over the accumulators, which PoCL keeps in memory), and PAIRS pieces are
 * updated per key step, RM PAIRS independent FMA chains of one FMA per key (tile_accumulate's
 * rank-4 steps chain 4 dependent FMAs per row: RM = 4 chains left half of the FMA units idle) */
#if RM >= 8 || CHUNKS % 2
#define PAIRS 1
#else
#define PAIRS 2
#endif
inline void tile_accumulate_scaled(__local const float *p, __local const float *b, int ldb, int tm, int tn,
                                   floatV acc[RM][CHUNKS], const float factor[RM])
{
#pragma unroll
    for (int c = 0; c < CHUNKS; c += PAIRS) {
        floatV a[PAIRS][RM];
#pragma unroll
        for (int u = 0; u < PAIRS; u++)
#pragma unroll
            for (int i = 0; i < RM; i++) a[u][i] = acc[i][c + u] * factor[i];
        __local const float *bc = b + (c * TN + tn) * VW;
#pragma unroll 4
        for (int n = 0; n < COLS; n++) {
            floatV y[PAIRS];
#pragma unroll
            for (int u = 0; u < PAIRS; u++) y[u] = LOCALV(bc, n * ldb + u * TN * VW);
#pragma unroll
            for (int i = 0; i < RM; i++) {
                const float w = p[(tm + TM * i) * LDS + n];
#pragma unroll
                for (int u = 0; u < PAIRS; u++) a[u][i] = w * y[u] + a[u][i];
            }
        }
#pragma unroll
        for (int u = 0; u < PAIRS; u++)
#pragma unroll
            for (int i = 0; i < RM; i++) acc[i][c + u] = a[u][i];
    }
}
#endif

/* the work-item's score vectors into a local (ROWS x LDS) tile */
inline void store_block(__local float *dst, int tm, int tn, const floatV s[RM * CN])
{
    for (int i = 0; i < RM; i++)
        for (int j = 0; j < CN; j++) LOCALV(dst, (tm + TM * i) * LDS + (tn + TN * j) * VW) = s[i * CN + j];
}

/* the work-item's accumulator rows, times `factor`, to global rows [row0, row0 + ROWS) < limit */
inline void store_rows(__global elem_t *dst, long stride, int row0, int limit, int tm, int tn,
                       floatV acc[RM][CHUNKS], float factor)
{
    for (int i = 0; i < RM; i++) {
        const int row = row0 + tm + TM * i;
        if (row >= limit) continue;
        __global elem_t *p = dst + row * stride;
#pragma unroll
        for (int c = 0; c < CHUNKS; c++) {
            const int col = (c * TN + tn) * VW;
            lanes_t x;
            x.v = acc[i][c] * factor;
            for (int j = 0; j < VW; j += 4) {
                if (col + j + 4 <= HEAD_DIM) {
                    STORE4(p, col + j, (float4)(x.e[j], x.e[j + 1], x.e[j + 2], x.e[j + 3]));
                    continue;
                }
                for (int e = j; e < j + 4; e++)
                    if (col + e < HEAD_DIM) STORE1(p, col + e, x.e[e]);
            }
        }
    }
}

#if VW > 4
/* CPUs (VW 8 or 16): a tree of vector halves, log2 VW steps of SIMD max / add, where the lane loop
 * below compiled under PoCL to a scalar chain of VW dependent steps (a tenth of the forward's time
 * outside its tile products) */
inline float4 halves4_max(floatV v)
{
#if VW == 16
    const float8 h = v.lo > v.hi ? v.lo : v.hi; /* comparisons, not max(): PoCL calls built-ins out of line */
#else
    const float8 h = v;
#endif
    return h.lo > h.hi ? h.lo : h.hi;
}

inline float4 halves4_sum(floatV v)
{
#if VW == 16
    const float8 h = v.lo + v.hi;
#else
    const float8 h = v;
#endif
    return h.lo + h.hi;
}

inline float lane_max(floatV v)
{
    const float4 q = halves4_max(v);
    const float2 d = q.lo > q.hi ? q.lo : q.hi;
    return d.x > d.y ? d.x : d.y;
}

inline float lane_sum(floatV v)
{
    const float4 q = halves4_sum(v);
    const float2 d = q.lo + q.hi;
    return d.x + d.y;
}
#else
inline float lane_max(floatV v)
{
    lanes_t x;
    x.v = v;
    float m = x.e[0];
    for (int j = 1; j < VW; j++) m = x.e[j] > m ? x.e[j] : m;
    return m;
}

inline float lane_sum(floatV v)
{
    lanes_t x;
    x.v = v;
    float total = 0.0f;
    for (int j = 0; j < VW; j++) total += x.e[j];
    return total;
}
#endif

/* ---------------------------------------------------------------------------------------------
 * which scores exist, and their value: portattn/extras.py has the semantics
 */

typedef struct {
    int seqlen_q, seqlen_k, offset; /* query i sits at key position i + offset */
    int left, right;                /* visible keys j: p - left <= j <= p + right (causal folded in) */
    float scale;                    /* softmax scale */
    float softcap;                  /* > 0: s -> softcap tanh(s / softcap) */
    float slope;                    /* ALiBi slope of this (batch, head) */
    long mask_i, mask_j;            /* element strides of the mask at this (batch, head) */
} Visibility;

/* the score of query i and key j in log2 units, given raw = q . k; -INFINITY when hidden.
 * `tanh_out` receives tanh(s / softcap) for the backward's softcap derivative. */
inline float score(float raw, int i, int j, const Visibility *vis, __global const mask_t *mask,
                   __global const uchar *padding, float *tanh_out)
{
    if (i >= vis->seqlen_q || j >= vis->seqlen_k) return -INFINITY;
#if CAUSAL_OR_WINDOW
    const int p = i + vis->offset;
    if (j > p + vis->right || j < p - vis->left) return -INFINITY;
#endif
#if KEY_PADDING
    if (!padding[j]) return -INFINITY;
#endif
#if MASK == 1
    if (!mask[i * vis->mask_i + j * vis->mask_j]) return -INFINITY;
#endif
    float s = raw * vis->scale;
#if SOFTCAP
    const float t = tanh(s / vis->softcap);
    *tanh_out = t;
    s = vis->softcap * t;
#endif
#if ALIBI
    s -= vis->slope * (float)abs(i + vis->offset - j);
#endif
#if MASK == 2
    s += mask[i * vis->mask_i + j * vis->mask_j];
#endif
    return s * LOG2E;
}

/* the key range [lo, hi) that query rows [row0, row0 + rows) may see */
inline int2 key_range(int row0, int rows, const Visibility *vis)
{
    int lo = 0, hi = vis->seqlen_k;
#if CAUSAL_OR_WINDOW
    lo = max(lo, row0 + vis->offset - vis->left);
    hi = min(hi, row0 + rows - 1 + vis->offset + vis->right + 1);
#endif
    return (int2)(lo, max(lo, hi));
}

/* the query range [lo, hi) whose rows may see keys [col0, col0 + cols) */
inline int2 query_range(int col0, int cols, const Visibility *vis)
{
    int lo = 0, hi = vis->seqlen_q;
#if CAUSAL_OR_WINDOW
    lo = max(lo, col0 - vis->right - vis->offset);
    hi = min(hi, col0 + cols - 1 + vis->left - vis->offset + 1);
#endif
    return (int2)(lo, max(lo, hi));
}

/* true when every score of queries [q0, q0 + nq) x keys [k0, k0 + nk) exists and no per-score
 * feature applies: the per-score checks are skipped */
inline bool tile_is_plain(int q0, int nq, int k0, int nk, const Visibility *vis)
{
#if KEY_PADDING || MASK || SOFTCAP || ALIBI
    return false;
#else
    if (q0 + nq > vis->seqlen_q || k0 + nk > vis->seqlen_k) return false;
#if CAUSAL_OR_WINDOW
    if (k0 + nk - 1 > q0 + vis->offset + vis->right) return false;
    if (k0 < q0 + nq - 1 + vis->offset - vis->left) return false;
#endif
    return true;
#endif
}

inline Visibility visibility(int seqlen_q, int seqlen_k, int offset, int left, int right, float scale, float softcap,
                             __global const float *slopes, int bh, long mask_i, long mask_j)
{
    Visibility vis;
    vis.seqlen_q = seqlen_q;
    vis.seqlen_k = seqlen_k;
    vis.offset = offset;
    vis.left = left;
    vis.right = right;
    vis.scale = scale;
    vis.softcap = softcap;
    vis.slope = 0.0f;
#if ALIBI
    vis.slope = slopes[bh];
#endif
    vis.mask_i = mask_i;
    vis.mask_j = mask_j;
    return vis;
}

/* the raw products s of the work-item's rows -> scores in log2 units (rows are queries when
 * `rows_are_queries`, else keys); tanh values for the softcap derivative in `t` */
inline void block_scores(floatV s[RM * CN], floatV t[RM * CN], int row0, int col0, int tm, int tn,
                         bool rows_are_queries, const Visibility *vis, __global const mask_t *mask,
                         __global const uchar *padding)
{
    const bool plain = rows_are_queries ? tile_is_plain(row0, ROWS, col0, COLS, vis)
                                        : tile_is_plain(col0, COLS, row0, ROWS, vis);
    for (int x = 0; x < RM * CN; x++) {
        t[x] = (floatV)(0.0f);
        if (plain) {
            s[x] *= vis->scale * LOG2E;
            continue;
        }
        lanes_t e, h;
        e.v = s[x];
        h.v = t[x];
        const int r = row0 + tm + TM * (x / CN);
        for (int j = 0; j < VW; j++) {
            const int c = col0 + (tn + TN * (x % CN)) * VW + j;
            e.e[j] = rows_are_queries ? score(e.e[j], r, c, vis, mask, padding, &h.e[j])
                                      : score(e.e[j], c, r, vis, mask, padding, &h.e[j]);
        }
        s[x] = e.v;
        t[x] = h.v;
    }
}

/* the mask and key-padding rows of (batch b, head h); the placeholders stay as they are */
inline __global const mask_t *mask_of(__global const mask_t *mask, int b, int h, long mask_b, long mask_h)
{
#if MASK
    mask += b * mask_b + h * mask_h;
#endif
    return mask;
}

inline __global const uchar *padding_of(__global const uchar *padding, int b, int seqlen_k)
{
#if KEY_PADDING
    padding += (long)b * seqlen_k;
#endif
    return padding;
}

#define FEATURE_ARGS                                                                                          \
    int heads, int group, int seqlen_q, int seqlen_k, int offset, int left, int right, float scale, float softcap, \
        __global const float *slopes, __global const mask_t *mask, long mask_b, long mask_h, long mask_i, long mask_j, \
        __global const uchar *padding

/* ---------------------------------------------------------------------------------------------
 * forward: one work-group per (ROWS queries, batch x head); O and LSE
 */
#if PROGRAM == 0
/* the row partials (maxima, then sums) of the TN work-items of a row sit in its P padding */
#define PARTIAL(row, u) (p_tile[(row) * LDS + COLS + (u)])

/* work-item u's partials of rows row, row + TM, row + 2 TM, row + 3 TM */
inline float4 row_partials(__local const float *p_tile, int row, int u)
{
    return (float4)(PARTIAL(row, u), PARTIAL(row + TM, u), PARTIAL(row + 2 * TM, u), PARTIAL(row + 3 * TM, u));
}

/* a work-item's share of one staged chunk (COLS rows x KC columns of K or V), in float4 quads */
#define STAGE_QUADS ((COLS * KC / 4 + THREADS - 1) / THREADS)

/* Staging is split into fetch (global loads into registers) and put (stores into local memory) so
 * that the next chunk's loads are in flight while this chunk's products run: a work-item moves
 * several quads per chunk, and waiting on each load before the next made the loads, not the
 * arithmetic, the forward's cost at large head dims (fewer rows per work-group, more quads each). */

/* quad u of this work-item as (row, column) of the chunk: K column-major, so that neighbouring
 * work-items take neighbouring rows and their transposed stores land in different banks; V row-major */
inline int2 stage_slot(int u, bool transposed)
{
    const int index = get_local_id(0) + u * THREADS, quads = KC / 4;
    return transposed ? (int2)(index % COLS, index / COLS * 4) : (int2)(index / quads, index % quads * 4);
}

inline bool stage_owns(int u) { return STAGE_QUADS * THREADS == COLS * KC / 4 || get_local_id(0) + u * THREADS < COLS * KC / 4; }

/* rows [row0, row0 + COLS) x columns [col0, col0 + KC) of K (transposed) or V into registers */
inline void fetch_chunk(float4 x[STAGE_QUADS], __global const elem_t *src, long stride, int row0, int limit, int col0,
                        bool transposed)
{
#pragma unroll
    for (int u = 0; u < STAGE_QUADS; u++) {
        const int2 rc = stage_slot(u, transposed);
        x[u] = stage_owns(u) ? read_quad(src, stride, row0 + rc.x, limit, col0 + rc.y) : (float4)(0.0f);
    }
}

/* a fetched K chunk into the K^T buffer (KC rows of LDT) */
inline void put_keys(__local float *kt_tile, const float4 x[STAGE_QUADS])
{
#pragma unroll
    for (int u = 0; u < STAGE_QUADS; u++) {
        if (!stage_owns(u)) continue;
        const int2 rc = stage_slot(u, true);
        kt_tile[(rc.y + 0) * LDT + rc.x] = x[u].s0;
        kt_tile[(rc.y + 1) * LDT + rc.x] = x[u].s1;
        kt_tile[(rc.y + 2) * LDT + rc.x] = x[u].s2;
        kt_tile[(rc.y + 3) * LDT + rc.x] = x[u].s3;
    }
}

/* a fetched V chunk (head-dim columns dc .. dc + KC - 1) into its place in the whole V tile */
inline void put_values(__local float *v_tile, const float4 x[STAGE_QUADS], int dc)
{
#pragma unroll
    for (int u = 0; u < STAGE_QUADS; u++) {
        if (!stage_owns(u)) continue;
        const int2 rc = stage_slot(u, false);
        LOCAL4(v_tile, rc.x * D_PAD + dc + rc.y) = x[u];
    }
}

__kernel __attribute__((reqd_work_group_size(THREADS, 1, 1))) void attention_forward(
    __global const elem_t *q, __global const elem_t *k, __global const elem_t *v, __global elem_t *out,
    __global float *lse, long q_b, long q_h, long q_n, long k_b, long k_h, long k_n, long v_b, long v_h, long v_n,
    long o_b, long o_h, long o_n, FEATURE_ARGS)
{
    __local floatV q_store[ROWS * D_PAD / VW], kt_store[KC * LDT / VW], v_store[COLS * D_PAD / VW];
    __local floatV p_store[ROWS * LDS / VW];
    __local float *q_tile = (__local float *)q_store, *kt_tile = (__local float *)kt_store,
                  *v_tile = (__local float *)v_store, *p_tile = (__local float *)p_store;
    const int tm = get_local_id(0) / TN, tn = get_local_id(0) % TN;
    const int row0 = get_group_id(0) * ROWS, bh = get_group_id(1), b = bh / heads, h = bh % heads, hk = h / group;
    const Visibility vis = visibility(seqlen_q, seqlen_k, offset, left, right, scale, softcap, slopes, bh, mask_i, mask_j);
    mask = mask_of(mask, b, h, mask_b, mask_h);
    padding = padding_of(padding, b, seqlen_k);
    __global const elem_t *kh = k + b * k_b + hk * k_h, *vh = v + b * v_b + hk * v_h;

    load_tile(q_tile, D_PAD, QSW, q + b * q_b + h * q_h, q_n, row0, seqlen_q, ROWS);
    floatV o[RM][CHUNKS];
#pragma unroll
    for (int i = 0; i < RM; i++)
#pragma unroll
        for (int c = 0; c < CHUNKS; c++) o[i][c] = (floatV)(0.0f);
    /* row statistics four rows to a vector (rows tm + TM (4 g + r) in m_run[g].sr): one exp2 call per
     * four rows, since PoCL calls built-ins out of line (per-row scalar calls cost its forward 12%);
     * l is summed over the work-item's own columns */
    float4 m_run[RM / 4], l_run[RM / 4];
#pragma unroll
    for (int g = 0; g < RM / 4; g++) {
        m_run[g] = (float4)(-INFINITY);
        l_run[g] = (float4)(0.0f);
    }
    const int2 keys = key_range(row0, ROWS, &vis);
    const int first = keys.x / COLS * COLS;
    /* the pipeline: each K chunk step puts the K chunk and the V chunk fetched in the step before and
     * fetches the next ones (after a tile's last K chunk, the next tile's first), then computes; the
     * last V chunk is put after the scores */
    float4 staged_k[STAGE_QUADS], staged_v[STAGE_QUADS];
#if PIECES_INNER
    if (first < keys.y) fetch_chunk(staged_k, kh, k_n, first, seqlen_k, 0, true);
#endif
    for (int col0 = first; col0 < keys.y; col0 += COLS) {
        floatV s[RM * CN], t[RM * CN];
#pragma unroll
        for (int x = 0; x < RM * CN; x++) s[x] = (floatV)(0.0f);
#pragma unroll
        for (int dc = 0; dc < D_PAD; dc += KC) {
            barrier(CLK_LOCAL_MEM_FENCE); /* the previous readers are done with K^T (and V and P) */
#if PIECES_INNER
            put_keys(kt_tile, staged_k);
            if (dc > 0) put_values(v_tile, staged_v, dc - KC);
            barrier(CLK_LOCAL_MEM_FENCE);
            fetch_chunk(staged_v, vh, v_n, col0, seqlen_k, dc, false);
            if (dc + KC < D_PAD) fetch_chunk(staged_k, kh, k_n, col0, seqlen_k, dc + KC, true);
            else if (col0 + COLS < keys.y) fetch_chunk(staged_k, kh, k_n, col0 + COLS, seqlen_k, 0, true);
#else
            /* PoCL: the chunks go straight into local memory (the GPU pipeline's fetched registers live
             * across a barrier, which PoCL turns into a store and a load per quad of a context array;
             * the CPU's out-of-order core and prefetchers overlap the loads anyway) */
            fetch_chunk(staged_k, kh, k_n, col0, seqlen_k, dc, true);
            put_keys(kt_tile, staged_k);
            fetch_chunk(staged_v, vh, v_n, col0, seqlen_k, dc, false);
            put_values(v_tile, staged_v, dc);
            barrier(CLK_LOCAL_MEM_FENCE);
#endif
            scores_transposed(q_tile, dc, kt_tile, tm, tn, s);
        }
#if PIECES_INNER
        put_values(v_tile, staged_v, D_PAD - KC);
#endif
        block_scores(s, t, row0, col0, tm, tn, true, &vis, mask, padding);
#pragma unroll
        for (int i = 0; i < RM; i++) {
            float m = lane_max(s[i * CN]);
#pragma unroll
            for (int j = 1; j < CN; j++) { const float x = lane_max(s[i * CN + j]); m = x > m ? x : m; }
            PARTIAL(tm + TM * i, tn) = m;
        }
        barrier(CLK_LOCAL_MEM_FENCE); /* row partials and V in place */
#if !PIECES_INNER
        float factor[RM];
#endif
#pragma unroll
        for (int g = 0; g < RM / 4; g++) {
            float4 m_new = m_run[g];
            for (int u = 0; u < TN; u++) m_new = max(m_new, row_partials(p_tile, tm + 4 * g * TM, u));
            const float4 base = select(m_new, (float4)(0.0f), m_new == (float4)(-INFINITY)); /* nothing visible yet */
            const float4 alpha = native_exp2(m_run[g] - base);
            m_run[g] = m_new;
            float sums[4];
#pragma unroll
            for (int r = 0; r < 4; r++) {
                const int i = 4 * g + r;
                sums[r] = 0.0f;
#pragma unroll
                for (int j = 0; j < CN; j++) {
                    s[i * CN + j] = native_exp2(s[i * CN + j] - (floatV)(COMPONENT(base, r)));
                    sums[r] += lane_sum(s[i * CN + j]);
                }
#if PIECES_INNER
#pragma unroll
                for (int c = 0; c < CHUNKS; c++) o[i][c] *= COMPONENT(alpha, r);
#else
                factor[i] = COMPONENT(alpha, r); /* applied in tile_accumulate_scaled */
#endif
            }
            l_run[g] = l_run[g] * alpha + (float4)(sums[0], sums[1], sums[2], sums[3]);
        }
        store_block(p_tile, tm, tn, s);
        barrier(CLK_LOCAL_MEM_FENCE); /* P in place */
#if PIECES_INNER
        tile_accumulate(p_tile, v_tile, D_PAD, tm, tn, o);
#else
        tile_accumulate_scaled(p_tile, v_tile, D_PAD, tm, tn, o, factor);
#endif
    }
    /* the row sums over all of the row's work-items; O divided by them, LSE beside it */
    barrier(CLK_LOCAL_MEM_FENCE);
#pragma unroll
    for (int g = 0; g < RM / 4; g++)
        for (int r = 0; r < 4; r++) PARTIAL(tm + TM * (4 * g + r), tn) = COMPONENT(l_run[g], r);
    barrier(CLK_LOCAL_MEM_FENCE);
#pragma unroll
    for (int g = 0; g < RM / 4; g++) {
        float4 l = (float4)(0.0f);
        for (int u = 0; u < TN; u++) l += row_partials(p_tile, tm + 4 * g * TM, u);
        const float4 inverse = select((float4)(0.0f), 1.0f / l, l > 0.0f); /* fully hidden rows: zeros */
        const float4 seen = select((float4)(-INFINITY), (m_run[g] + log2(l)) * LN2, l > 0.0f);
        const float4 value = select(seen, (float4)(NAN), isnan(l)); /* a NaN score: NaN LSE, as O */
#pragma unroll
        for (int r = 0; r < 4; r++) {
            const int i = 4 * g + r, row = row0 + tm + TM * i;
#pragma unroll
            for (int c = 0; c < CHUNKS; c++) o[i][c] *= COMPONENT(inverse, r);
            if (tn == 0 && row < seqlen_q) lse[(long)bh * seqlen_q + row] = COMPONENT(value, r);
        }
    }
    store_rows(out + b * o_b + h * o_h, o_n, row0, seqlen_q, tm, tn, o, 1.0f);
}
#endif /* PROGRAM == 0 */

/* ---------------------------------------------------------------------------------------------
 * backward (built with VW = 4, RM = 4, CN = 1: the score products read both operands row-major, scores_rows)
 */
#if PROGRAM == 1
#if VW != 4 || RM != 4 || CN != 1
#error "the backward program is built with VW = 4 and a 4 x 1 register tile"
#endif

/* delta = rowsum(dO * O) in float32, one work-item per row; lse_log2 = lse * log2(e) beside it */
__kernel void attention_backward_delta(__global const elem_t *out, __global const elem_t *dout,
                                       __global const float *lse, __global float *delta, __global float *lse_log2,
                                       long o_b, long o_h, long o_n, long d_b, long d_h, long d_n, int heads,
                                       int seqlen_q)
{
    const int row = get_global_id(0), bh = get_global_id(1), b = bh / heads, h = bh % heads;
    if (row >= seqlen_q) return;
    __global const elem_t *o = out + b * o_b + h * o_h + row * o_n, *g = dout + b * d_b + h * d_h + row * d_n;
    float sum = 0.0f;
    for (int d = 0; d < HEAD_DIM; d++) sum += LOAD1(o, d) * LOAD1(g, d);
    const long index = (long)bh * seqlen_q + row;
    delta[index] = sum;
    lse_log2[index] = lse[index] * LOG2E;
}

/* probabilities and score gradients of the work-item's block, from log2-unit scores s, dP,
 * the rows' or columns' LSE (log2 units) and delta; dS already carries the softcap derivative */
inline void block_gradients(float4 s[4], float4 dp[4], const float4 t[4], __local const float *lse_tile,
                            __local const float *delta_tile, int tm, int tn, bool rows_are_queries, float4 p[4])
{
    for (int i = 0; i < 4; i++) {
        lanes_t e, g, tt;
        e.v = s[i];
        g.v = dp[i];
        tt.v = t[i];
        for (int j = 0; j < 4; j++) {
            const int index = rows_are_queries ? tm + TM * i : tn * 4 + j;
            const float row_lse = lse_tile[index];
            const float prob = row_lse == -INFINITY ? 0.0f : native_exp2(e.e[j] - row_lse);
            e.e[j] = prob;
            g.e[j] = prob * (g.e[j] - delta_tile[index]);
#if SOFTCAP
            g.e[j] *= 1.0f - tt.e[j] * tt.e[j];
#endif
        }
        p[i] = e.v;
        dp[i] = g.v;
    }
}

/* dK and dV: one work-group per (ROWS keys, batch x K/V head), streaming the query tiles of every
 * query head of its group that can see them (GQA summed in registers, no atomics) */
__kernel __attribute__((reqd_work_group_size(THREADS, 1, 1))) void attention_backward_dkdv(
    __global const elem_t *q, __global const elem_t *k, __global const elem_t *v, __global const elem_t *dout,
    __global const float *lse_log2, __global const float *delta, __global elem_t *dk, __global elem_t *dv,
    long q_b, long q_h, long q_n, long k_b, long k_h, long k_n, long v_b, long v_h, long v_n, long g_b, long g_h,
    long g_n, long dk_b, long dk_h, long dk_n, long dv_b, long dv_h, long dv_n, FEATURE_ARGS)
{
    __local float4 k_store[ROWS * LD / 4], v_store[ROWS * LD / 4], q_store[COLS * LD / 4], g_store[COLS * LD / 4];
    __local float4 p_store[ROWS * LDS / 4];
    __local float lse_tile[COLS], delta_tile[COLS];
    __local float *k_tile = (__local float *)k_store, *v_tile = (__local float *)v_store,
                  *q_tile = (__local float *)q_store, *g_tile = (__local float *)g_store,
                  *p_tile = (__local float *)p_store;
    const int tm = get_local_id(0) / TN, tn = get_local_id(0) % TN;
    const int row0 = get_group_id(0) * ROWS, bhk = get_group_id(1), kv_heads = heads / group;
    const int b = bhk / kv_heads, hk = bhk % kv_heads;
    load_tile(k_tile, LD, 0, k + b * k_b + hk * k_h, k_n, row0, seqlen_k, ROWS);
    load_tile(v_tile, LD, 0, v + b * v_b + hk * v_h, v_n, row0, seqlen_k, ROWS);
    floatV dk_acc[4][CHUNKS], dv_acc[4][CHUNKS];
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int c = 0; c < CHUNKS; c++) dk_acc[i][c] = dv_acc[i][c] = (float4)(0.0f);
    for (int h = hk * group; h < (hk + 1) * group; h++) {
        const int bh = b * heads + h;
        const Visibility vis = visibility(seqlen_q, seqlen_k, offset, left, right, scale, softcap, slopes, bh, mask_i, mask_j);
        __global const mask_t *mask_bh = mask_of(mask, b, h, mask_b, mask_h);
        __global const uchar *padding_b = padding_of(padding, b, seqlen_k);
        __global const elem_t *qh = q + b * q_b + h * q_h, *gh = dout + b * g_b + h * g_h;
        const int2 queries = query_range(row0, ROWS, &vis);
        for (int col0 = queries.x / COLS * COLS; col0 < queries.y; col0 += COLS) {
            barrier(CLK_LOCAL_MEM_FENCE);
            load_tile(q_tile, LD, 0, qh, q_n, col0, seqlen_q, COLS);
            load_tile(g_tile, LD, 0, gh, g_n, col0, seqlen_q, COLS);
            load_row_stats(lse_tile, lse_log2 + (long)bh * seqlen_q, col0, seqlen_q, COLS);
            load_row_stats(delta_tile, delta + (long)bh * seqlen_q, col0, seqlen_q, COLS);
            barrier(CLK_LOCAL_MEM_FENCE);
            float4 s[4], t[4], dp[4], p[4];
            scores_rows(k_tile, q_tile, tm, tn, s); /* S^T: rows are keys */
            block_scores(s, t, row0, col0, tm, tn, false, &vis, mask_bh, padding_b);
            scores_rows(v_tile, g_tile, tm, tn, dp); /* dP^T = V dO^T */
            block_gradients(s, dp, t, lse_tile, delta_tile, tm, tn, false, p);
            store_block(p_tile, tm, tn, p);
            barrier(CLK_LOCAL_MEM_FENCE);
            tile_accumulate(p_tile, g_tile, LD, tm, tn, dv_acc); /* dV += P^T dO */
            barrier(CLK_LOCAL_MEM_FENCE);
            store_block(p_tile, tm, tn, dp);
            barrier(CLK_LOCAL_MEM_FENCE);
            tile_accumulate(p_tile, q_tile, LD, tm, tn, dk_acc); /* dK += dS^T Q */
        }
    }
    store_rows(dk + b * dk_b + hk * dk_h, dk_n, row0, seqlen_k, tm, tn, dk_acc, scale);
    store_rows(dv + b * dv_b + hk * dv_h, dv_n, row0, seqlen_k, tm, tn, dv_acc, 1.0f);
}

/* dQ: one work-group per (ROWS queries, batch x head), streaming the key tiles its rows can see */
__kernel __attribute__((reqd_work_group_size(THREADS, 1, 1))) void attention_backward_dq(
    __global const elem_t *q, __global const elem_t *k, __global const elem_t *v, __global const elem_t *dout,
    __global const float *lse_log2, __global const float *delta, __global elem_t *dq, long q_b, long q_h, long q_n,
    long k_b, long k_h, long k_n, long v_b, long v_h, long v_n, long g_b, long g_h, long g_n, long dq_b, long dq_h,
    long dq_n, FEATURE_ARGS)
{
    __local float4 q_store[ROWS * LD / 4], g_store[ROWS * LD / 4], k_store[COLS * LD / 4], v_store[COLS * LD / 4];
    __local float4 p_store[ROWS * LDS / 4];
    __local float lse_tile[ROWS], delta_tile[ROWS];
    __local float *q_tile = (__local float *)q_store, *g_tile = (__local float *)g_store,
                  *k_tile = (__local float *)k_store, *v_tile = (__local float *)v_store,
                  *p_tile = (__local float *)p_store;
    const int tm = get_local_id(0) / TN, tn = get_local_id(0) % TN;
    const int row0 = get_group_id(0) * ROWS, bh = get_group_id(1), b = bh / heads, h = bh % heads, hk = h / group;
    const Visibility vis = visibility(seqlen_q, seqlen_k, offset, left, right, scale, softcap, slopes, bh, mask_i, mask_j);
    mask = mask_of(mask, b, h, mask_b, mask_h);
    padding = padding_of(padding, b, seqlen_k);
    __global const elem_t *kh = k + b * k_b + hk * k_h, *vh = v + b * v_b + hk * v_h;
    load_tile(q_tile, LD, 0, q + b * q_b + h * q_h, q_n, row0, seqlen_q, ROWS);
    load_tile(g_tile, LD, 0, dout + b * g_b + h * g_h, g_n, row0, seqlen_q, ROWS);
    load_row_stats(lse_tile, lse_log2 + (long)bh * seqlen_q, row0, seqlen_q, ROWS);
    load_row_stats(delta_tile, delta + (long)bh * seqlen_q, row0, seqlen_q, ROWS);
    floatV dq_acc[4][CHUNKS];
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int c = 0; c < CHUNKS; c++) dq_acc[i][c] = (float4)(0.0f);
    const int2 keys = key_range(row0, ROWS, &vis);
    for (int col0 = keys.x / COLS * COLS; col0 < keys.y; col0 += COLS) {
        barrier(CLK_LOCAL_MEM_FENCE);
        load_tile(k_tile, LD, 0, kh, k_n, col0, seqlen_k, COLS);
        load_tile(v_tile, LD, 0, vh, v_n, col0, seqlen_k, COLS);
        barrier(CLK_LOCAL_MEM_FENCE);
        float4 s[4], t[4], dp[4], p[4];
        scores_rows(q_tile, k_tile, tm, tn, s);
        block_scores(s, t, row0, col0, tm, tn, true, &vis, mask, padding);
        scores_rows(g_tile, v_tile, tm, tn, dp); /* dP = dO V^T */
        block_gradients(s, dp, t, lse_tile, delta_tile, tm, tn, true, p);
        store_block(p_tile, tm, tn, dp);
        barrier(CLK_LOCAL_MEM_FENCE);
        tile_accumulate(p_tile, k_tile, LD, tm, tn, dq_acc); /* dQ += dS K */
    }
    store_rows(dq + b * dq_b + h * dq_h, dq_n, row0, seqlen_q, tm, tn, dq_acc, scale);
}
#endif /* PROGRAM == 1 */
