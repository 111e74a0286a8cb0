// Which (row, column) of a 16x16 float32 WMMA accumulator each lane's 8 elements hold, read on the
// device itself: WMMA leaves the layout unspecified and it differs between architectures.
// portattn/backends/cupy/build.py turns the answer into the register-softmax constants of
// attention.cu (or keeps its shared-memory softmax when the layout has no usable structure).
#include <mma.h>
using namespace nvcuda;

extern "C" __global__ void accumulator_layout(int *rows, int *cols) {
    __shared__ float tile[256];
    const int lane = threadIdx.x;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> probe;
    for (int i = lane; i < 256; i += 32) tile[i] = float(i / 16);
    __syncwarp();
    wmma::load_matrix_sync(probe, tile, 16, wmma::mem_row_major);
    for (int e = 0; e < probe.num_elements; ++e) rows[lane * probe.num_elements + e] = int(probe.x[e]);
    __syncwarp();
    for (int i = lane; i < 256; i += 32) tile[i] = float(i % 16);
    __syncwarp();
    wmma::load_matrix_sync(probe, tile, 16, wmma::mem_row_major);
    for (int e = 0; e < probe.num_elements; ++e) cols[lane * probe.num_elements + e] = int(probe.x[e]);
}
