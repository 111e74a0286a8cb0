// Tensor-core throughput of the two Volta-era instruction forms, each warp issuing a long chain of
// independent products on register operands (no memory traffic): WMMA 16x16x16 (what the cupy
// backend uses) and inline PTX mma.sync.m8n8k4 (Volta's native quad-pair shape). See mma_shapes.py.
#include <cuda_fp16.h>
#include <mma.h>
using namespace nvcuda;

constexpr int CHAINS = 4;  // independent accumulators per warp, so the tensor pipe never waits on one

extern "C" __global__ void wmma_16x16x16(const half *a_in, float *out, int iterations) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, half, wmma::row_major> a;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, half, wmma::col_major> b;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[CHAINS];
    wmma::load_matrix_sync(a, a_in, 16);
    wmma::load_matrix_sync(b, a_in, 16);
    for (int c = 0; c < CHAINS; ++c) wmma::fill_fragment(acc[c], 0.f);
    for (int i = 0; i < iterations; ++i)
#pragma unroll
        for (int c = 0; c < CHAINS; ++c) wmma::mma_sync(acc[c], a, b, acc[c]);
    float sum = 0.f;
    for (int c = 0; c < CHAINS; ++c)
        for (int e = 0; e < acc[c].num_elements; ++e) sum += acc[c].x[e];
    out[blockIdx.x * blockDim.x + threadIdx.x] = sum;
}

// Four m8n8k4 products (one per quad-pair, 8x8x4 each) per instruction: 4 instructions make the same
// 16x16x16 work as one WMMA product, so the loop issues 4 per step for an equal FLOP count.
extern "C" __global__ void mma_m8n8k4(const half *a_in, float *out, int iterations) {
    unsigned a[2], b[2];
    const unsigned *words = reinterpret_cast<const unsigned *>(a_in);
    a[0] = words[threadIdx.x % 32]; a[1] = words[(threadIdx.x + 1) % 32];
    b[0] = words[(threadIdx.x + 2) % 32]; b[1] = words[(threadIdx.x + 3) % 32];
    float acc[CHAINS][8] = {};
    for (int i = 0; i < iterations; ++i)
#pragma unroll
        for (int step = 0; step < 4; ++step)
#pragma unroll
            for (int c = 0; c < CHAINS; ++c)
                asm volatile(
                    "mma.sync.aligned.m8n8k4.row.col.f32.f16.f16.f32 {%0,%1,%2,%3,%4,%5,%6,%7}, {%8,%9}, {%10,%11}, "
                    "{%0,%1,%2,%3,%4,%5,%6,%7};\n"
                    : "+f"(acc[c][0]), "+f"(acc[c][1]), "+f"(acc[c][2]), "+f"(acc[c][3]), "+f"(acc[c][4]), "+f"(acc[c][5]),
                      "+f"(acc[c][6]), "+f"(acc[c][7])
                    : "r"(a[0]), "r"(a[1]), "r"(b[0]), "r"(b[1]));
    float sum = 0.f;
    for (int c = 0; c < CHAINS; ++c)
        for (int e = 0; e < 8; ++e) sum += acc[c][e];
    out[blockIdx.x * blockDim.x + threadIdx.x] = sum;
}
