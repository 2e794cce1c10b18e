// fused_attention.cuh: fused attention kernels for training, forward and backward, written to be pasted into
// blocktf.cu's attention section. It uses what blocktf.cu defines before that section: floatX, to_f32, to_floatX,
// warp_sum, warp_max, warp_rows_grid, cudaCheck, cudaCheckLaunch.
// defines: flash_attention_forward/backward (any S, FlashAttention-2 tiling on tensor cores: the block decoder and
// the vanilla models). The small kernels it started with (S <= 16, the token decoder) are in blocktf.cu now.
//
// Semantics, those of blocktf's attention_forward / attention_backward (SPEC 1.1.5):
//   q, k, v: (nseq, NH, S, HS), q and k rotated   key_mask: (nseq, S), 1 = key visible
//   query i sees keys j <= i with key_mask[j] = 1;  s_ij = q_i·k_j / sqrt(HS);  p_i = softmax_j(s_ij) in fp32;
//   out_i = Σ_j p_ij v_j, written with the heads merged: out (nseq, S, NH*HS). A query that sees no key outputs 0.
//   Backward: dout (nseq, S, NH*HS) -> dq, dk, dv (nseq, NH, S, HS), written (=), not accumulated:
//     dv_j = Σ_i p_ij dO_i;  dp_ij = dO_i·v_j;  ds_ij = p_ij (dp_ij - δ_i) with δ_i = Σ_j p_ij dp_ij = dO_i·out_i;
//     dq_i = Σ_j ds_ij k_j / sqrt(HS);  dk_j = Σ_i ds_ij q_i / sqrt(HS).  A query that sees no key gets zeros.
// Every kernel is deterministic: no atomics, every sum in a fixed order.
#pragma once
#include <mma.h>
#include <string>
#include <type_traits>

namespace {   // internal linkage, as everything in blocktf.cu (drop this line and the closing one when pasting)

// ================================================================================================================
// Flash attention (FlashAttention-2): any S >= 1, HS in {32, 64, 128}; the block decoder (S = 511 blocks) and the
// vanilla models (S = 2048).
//
// Tiling. A block of 4 warps owns kFlashRows = 64 rows of one (sequence, head): query rows in the forward and in the
// dq pass, key rows in the dk/dv pass. Warp w owns the strip of rows 16w..16w+15 (one tensor-core fragment high).
// The block walks the other side in tiles (forward: 64 keys; backward: 32 queries or keys) that its threads load
// into shared memory together, with a __syncthreads before and after each load; everything else a warp does reads
// and writes only its own strip, with a __syncwarp between steps. Each matrix product is a warp_gemm:
// C (16, N) fp32 in shared memory = or += A (16, K) · B (K, N), A and B floatX in shared memory; nvcuda::wmma bf16
// 16x16x16 fragments with fp32 accumulation in the BF16 build, plain fp32 FMAs in the FP32 build (so that build
// stays exact fp32, no tf32, as the rest of blocktf's FP32 build). The element type is the only difference.
// Skipping: key tiles wholly after a query tile's last query are never visited (causal); tiles whose keys are all
// masked are skipped after one __syncthreads_or (padding). Grid (nseq*NH, tiles), the tiles with the most work first.
//
// Passes. Forward: per query tile, an online softmax over key tiles (running row max m and sum l, the output
// accumulator rescaled when m grows); writes out and lse_i = m_i + log l_i (fp32, (nseq, NH, S); 0 for a query that
// sees no key: the backward masks those rows itself). Backward: (1) δ_i = dO_i·out_i, one warp per row; (2) the
// dk/dv pass, per key tile over the query tiles at or after it: S^T = K Q^T, dP^T = V dO^T, P^T = exp(scale S^T - lse),
// dS^T = P^T ∘ (dP^T - δ), dV += P^T dO, dK += dS^T Q; (3) the dq pass, per query tile over the key tiles up to it:
// S, dP, P, dS again, dQ += dS K. A separate dq pass instead of atomics into dq keeps the result deterministic.
//
// One call, H = nseq*NH heads, E = H*S*HS elements per tensor, F = H·4·HS·S(S+1)/2 useful causal FLOPs of the
// forward (q·k and p·v over the visible half; tiles along the diagonal compute up to one tile more per row). The
// backward runs 7 products per visible pair, 3.5 F (5 are needed, 2.5 F: S and dP are recomputed in the dq pass).
// Device memory, compulsory: forward reads q, k, v and writes out: 4E floatX, plus lse (4 bytes a row); k and v are
// read once per query tile, mostly from L2. Backward reads dout, out, q, k, v and writes dq, dk, dv: 8E floatX, plus
// lse and δ (4 bytes a row each, δ read by both passes); q, dout are read once per key tile and k, v once per query
// tile, mostly from L2.
// Shared memory per block (KB), BF16 / FP32 build: forward 70 / 102 at HS 64, 110 / 166 at HS 128; dk/dv pass
// 90 / 122 at HS 64, 146 / 202 at HS 128; dq pass 68 / 96 at HS 64, 108 / 160 at HS 128 (an H200 block may have 227).
// Registers (nvcc 13, BF16): forward 90-96, dk/dv 40-64, dq 40-72; no spills.

constexpr int kFlashWarps = 4;
constexpr int kFlashThreads = kFlashWarps * 32;
constexpr int kFlashStrip = 16;                          // rows per warp: one wmma fragment high
constexpr int kFlashRows = kFlashWarps * kFlashStrip;    // rows a block owns
constexpr int kFlashForwardKeys = 64;                    // keys per forward tile
constexpr int kFlashBackwardTile = 32;                   // queries (dk/dv pass) or keys (dq pass) per backward tile
constexpr int kPadX = 16 / (int)sizeof(floatX);          // floatX tile rows padded by 16 bytes: spreads banks, keeps
constexpr int kPadF = 4;                                 // rows 16-byte aligned (and wmma's ldm a multiple of 16 bytes)

inline int flash_tiles(int S) { return (S + kFlashRows - 1) / kFlashRows; }

// Carves a block's dynamic shared memory into regions, each 128-byte aligned (wmma needs 32, vector copies 16).
// Built over base 0 on the host it only measures: bytes is then the launch's dynamic shared memory.
struct SmemArena {
    uintptr_t base;
    size_t bytes = 0;
    __host__ __device__ explicit SmemArena(uintptr_t base_address) : base(base_address) {}
    template <typename T>
    __host__ __device__ T* take(size_t count) {
        bytes = (bytes + 127) / 128 * 128;
        T* region = reinterpret_cast<T*>(base + bytes);
        bytes += count * sizeof(T);
        return region;
    }
};

// Forward: the block's 64 queries, one tile of 64 keys at a time. ld* are row strides in elements.
template <int HS>
struct FlashForwardTiles {
    static constexpr int ldx = HS + kPadX, ldp = kFlashForwardKeys + kPadX;
    static constexpr int lds = kFlashForwardKeys + kPadF, ldo = HS + kPadF;
    floatX* q;          // (64, ldx) the block's queries
    floatX *k, *v;      // (64, ldx) the current key tile
    floatX* p;          // (64, ldp) probabilities of the tile, unnormalised
    float* s;           // (64, lds) scores of the tile, q·k before the scale
    float* o;           // (64, ldo) output accumulator
    int* key_visible;   // (64) key of the tile exists and key_mask says visible
    size_t bytes;
    __host__ __device__ explicit FlashForwardTiles(uintptr_t base) {
        SmemArena arena(base);
        q = arena.take<floatX>(kFlashRows * ldx);
        k = arena.take<floatX>(kFlashForwardKeys * ldx);
        v = arena.take<floatX>(kFlashForwardKeys * ldx);
        p = arena.take<floatX>(kFlashRows * ldp);
        s = arena.take<float>(kFlashRows * lds);
        o = arena.take<float>(kFlashRows * ldo);
        key_visible = arena.take<int>(kFlashForwardKeys);
        bytes = arena.bytes;
    }
};

// dk/dv pass: the block's 64 keys, one tile of 32 queries at a time. The score-sized tiles are transposed
// (rows: keys, columns: queries), so every product has the warp's own key strip as its A operand.
template <int HS>
struct FlashBackwardKVTiles {
    static constexpr int T = kFlashBackwardTile;
    static constexpr int ldx = HS + kPadX, ldp = T + kPadX, lds = T + kPadF, ldo = HS + kPadF;
    floatX *k, *v;          // (64, ldx) the block's keys and values
    floatX *q, *dout;       // (T, ldx) the current query tile; dout gathered from the merged layout
    floatX *p, *ds;         // (64, ldp) P^T and dS^T of the tile
    float *s, *dp;          // (64, lds) S^T (before the scale) and dP^T
    float *dk, *dv;         // (64, ldo) accumulators
    float *lse, *delta;     // (T) per query of the tile
    int* key_visible;       // (64)
    size_t bytes;
    __host__ __device__ explicit FlashBackwardKVTiles(uintptr_t base) {
        SmemArena arena(base);
        k = arena.take<floatX>(kFlashRows * ldx);
        v = arena.take<floatX>(kFlashRows * ldx);
        q = arena.take<floatX>(T * ldx);
        dout = arena.take<floatX>(T * ldx);
        p = arena.take<floatX>(kFlashRows * ldp);
        ds = arena.take<floatX>(kFlashRows * ldp);
        s = arena.take<float>(kFlashRows * lds);
        dp = arena.take<float>(kFlashRows * lds);
        dk = arena.take<float>(kFlashRows * ldo);
        dv = arena.take<float>(kFlashRows * ldo);
        lse = arena.take<float>(T);
        delta = arena.take<float>(T);
        key_visible = arena.take<int>(kFlashRows);
        bytes = arena.bytes;
    }
};

// dq pass: the block's 64 queries, one tile of 32 keys at a time.
template <int HS>
struct FlashBackwardQTiles {
    static constexpr int T = kFlashBackwardTile;
    static constexpr int ldx = HS + kPadX, ldp = T + kPadX, lds = T + kPadF, ldo = HS + kPadF;
    floatX *q, *dout;       // (64, ldx) the block's queries and their output gradients
    floatX *k, *v;          // (T, ldx) the current key tile
    floatX* ds;             // (64, ldp) dS of the tile
    float *s, *dp;          // (64, lds) S (before the scale) and dP
    float* dq;              // (64, ldo) accumulator
    float *lse, *delta;     // (64) per query of the block
    int* key_visible;       // (T)
    size_t bytes;
    __host__ __device__ explicit FlashBackwardQTiles(uintptr_t base) {
        SmemArena arena(base);
        q = arena.take<floatX>(kFlashRows * ldx);
        dout = arena.take<floatX>(kFlashRows * ldx);
        k = arena.take<floatX>(T * ldx);
        v = arena.take<floatX>(T * ldx);
        ds = arena.take<floatX>(kFlashRows * ldp);
        s = arena.take<float>(kFlashRows * lds);
        dp = arena.take<float>(kFlashRows * lds);
        dq = arena.take<float>(kFlashRows * ldo);
        lse = arena.take<float>(kFlashRows);
        delta = arena.take<float>(kFlashRows);
        key_visible = arena.take<int>(T);
        bytes = arena.bytes;
    }
};

// Block-cooperative copy of rows [row0, row0 + rows) of an (S, HS) floatX matrix whose row r starts at src + r*stride
// into dst (rows, ld); rows at or past S become zeros. 16-byte vectors: src, stride and ld keep rows 16-byte aligned.
template <int HS>
__device__ inline void load_rows(floatX* dst, int ld, const floatX* src, size_t stride, int row0, int rows, int S) {
    constexpr int kVector = 16 / (int)sizeof(floatX), kVectorsPerRow = HS / kVector;
    for (int index = threadIdx.x; index < rows * kVectorsPerRow; index += blockDim.x) {
        const int r = index / kVectorsPerRow, c = index % kVectorsPerRow * kVector;
        uint4 value = make_uint4(0u, 0u, 0u, 0u);
        if (row0 + r < S) value = *reinterpret_cast<const uint4*>(src + (size_t)(row0 + r) * stride + c);
        *reinterpret_cast<uint4*>(dst + r * ld + c) = value;
    }
}

// key_visible[c] = key k0 + c exists and is visible (mask_row: (S) ints of the sequence). Block-cooperative; returns
// whether this thread saw a visible key (for __syncthreads_or).
__device__ inline bool load_key_visible(int* key_visible, const int* mask_row, int k0, int count, int S) {
    bool any = false;
    for (int c = threadIdx.x; c < count; c += blockDim.x) {
        const bool visible = k0 + c < S && mask_row[k0 + c] != 0;
        key_visible[c] = visible;
        any = any || visible;
    }
    return any;
}

// lse and δ of rows [row0, row0 + rows) of one head ((S) each); 0 past S, where no entry is visible.
__device__ inline void load_row_stats(float* lse_tile, float* delta_tile, const float* lse, const float* delta, int row0,
                                      int rows, int S) {
    for (int r = threadIdx.x; r < rows; r += blockDim.x) {
        const bool inside = row0 + r < S;
        lse_tile[r] = inside ? lse[row0 + r] : 0.0f;
        delta_tile[r] = inside ? delta[row0 + r] : 0.0f;
    }
}

// Zeroes a warp's (16, HS) strip of an fp32 tile with row stride ld.
template <int HS>
__device__ inline void zero_strip(float* strip, int ld) {
    for (int e = threadIdx.x % 32; e < kFlashStrip * HS; e += 32) strip[(e / HS) * ld + e % HS] = 0.0f;
}

// dst[d] = factor · src[d], d < HS: one row from an fp32 tile to device memory, by the warp's lanes.
template <int HS>
__device__ inline void store_row(floatX* dst, const float* src, float factor) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int u = 0; u < HS / 32; u++) dst[lane + 32 * u] = to_floatX(src[lane + 32 * u] * factor);
}

// One warp: C (16, N) = A (16, K) · B (K, N) (+ C when accumulate). C: fp32, row stride ldc. A: floatX row-major,
// stride lda. B: floatX; B[k][n] = b[k * ldb + n], or with kTransposedB b[n * ldb + k] (B is then a matrix stored
// row by row of its columns, e.g. K for q·k^T). N and K are multiples of 16. The caller orders the warp's earlier
// shared-memory writes (__syncwarp); C is complete for every lane when this returns.
template <int N, int K, bool kTransposedB>
__device__ inline void warp_gemm(float* c, int ldc, const floatX* a, int lda, const floatX* b, int ldb, bool accumulate) {
    static_assert(N % 16 == 0 && K % 16 == 0, "warp_gemm works on whole 16x16 fragments");
#if defined(BLOCKTF_PRECISION_BF16)
    namespace wmma = nvcuda::wmma;
    using LayoutB = typename std::conditional<kTransposedB, wmma::col_major, wmma::row_major>::type;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a_frag[K / 16];
#pragma unroll
    for (int kk = 0; kk < K / 16; kk++) wmma::load_matrix_sync(a_frag[kk], a + kk * 16, lda);
#pragma unroll
    for (int n0 = 0; n0 < N; n0 += 16) {
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
        if (accumulate) wmma::load_matrix_sync(acc, c + n0, ldc, wmma::mem_row_major);
        else wmma::fill_fragment(acc, 0.0f);
#pragma unroll
        for (int kk = 0; kk < K / 16; kk++) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, LayoutB> b_frag;
            wmma::load_matrix_sync(b_frag, kTransposedB ? b + n0 * ldb + kk * 16 : b + kk * 16 * ldb + n0, ldb);
            wmma::mma_sync(acc, a_frag[kk], b_frag, acc);
        }
        wmma::store_matrix_sync(c + n0, acc, ldc, wmma::mem_row_major);
    }
    __syncwarp();
#else
    // Each element by one lane, the K terms in order (lane e holds elements e, e + 32, ...).
    for (int e = threadIdx.x % 32; e < 16 * N; e += 32) {
        const int r = e / N, n = e % N;
        float sum = accumulate ? c[r * ldc + n] : 0.0f;
        for (int kk = 0; kk < K; kk++) sum += a[r * lda + kk] * (kTransposedB ? b[n * ldb + kk] : b[kk * ldb + n]);
        c[r * ldc + n] = sum;
    }
    __syncwarp();
#endif
}

// p_ij and ds_ij of one visible-or-not (query i, key j) entry, from the recomputed score s (before the scale), dp,
// and the query's lse and δ: p = exp(scale·s - lse), ds = p (dp - δ); both 0 where the key is not visible.
__device__ inline float2 softmax_backward_entry(float s, float dp, float lse, float delta, bool visible, float scale) {
    const float p = visible ? expf(s * scale - lse) : 0.0f;
    return make_float2(p, p * (dp - delta));
}

// Raises a kernel's dynamic shared-memory limit to bytes (needed above 48 KB), after checking the device has them.
template <typename Kernel>
inline void allow_dynamic_smem(Kernel* kernel, size_t bytes, const char* who) {
    static const int device_limit = [] {
        int device = 0, limit = 0;
        cudaCheck(cudaGetDevice(&device));
        cudaCheck(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
        return limit;
    }();
    if (bytes > (size_t)device_limit)
        throw std::runtime_error(std::string(who) + ": needs " + std::to_string(bytes) + " bytes of shared memory per block, the device has " +
                                 std::to_string(device_limit));
    cudaCheck(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
}

// ----------------------------------------------------------------------------------------------------------------
// Flash forward.

// Online softmax of one key tile for the warp's 16 query rows (row0.. of the block), fp32. With s_ij = scale·S_ij for
// visible keys (-inf otherwise): m' = max(m, max_j s_ij), p_ij = exp(s_ij - m'), l' = l·exp(m - m') + Σ_j p_ij, and
// the output row is rescaled by exp(m - m'). A row that has seen no visible key keeps m = -inf and uses 0 in place of
// m' (every exp is then exp(-inf) = 0: no NaN). m and l are per-row registers, the same in every lane.
template <int HS>
__device__ inline void flash_online_softmax(const FlashForwardTiles<HS>& t, float (&m)[kFlashStrip], float (&l)[kFlashStrip],
                                            int row0, int q0, int k0, int S, float scale) {
    using Tiles = FlashForwardTiles<HS>;
    constexpr int kColumns = kFlashForwardKeys / 32;   // per lane: keys lane, lane + 32
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int r = 0; r < kFlashStrip; r++) {
        const int row = row0 + r, i = q0 + row;
        float s[kColumns];
        float tile_max = -INFINITY;
#pragma unroll
        for (int u = 0; u < kColumns; u++) {
            const int c = lane + 32 * u;
            const bool visible = i < S && k0 + c <= i && t.key_visible[c];
            s[u] = visible ? t.s[row * Tiles::lds + c] * scale : -INFINITY;
            tile_max = fmaxf(tile_max, s[u]);
        }
        const float m_new = fmaxf(m[r], warp_max(tile_max));
        const float m_use = m_new == -INFINITY ? 0.0f : m_new;
        float tile_sum = 0.0f;
#pragma unroll
        for (int u = 0; u < kColumns; u++) {
            const float p = expf(s[u] - m_use);
            tile_sum += p;
            t.p[row * Tiles::ldp + lane + 32 * u] = to_floatX(p);
        }
        const float alpha = expf(m[r] - m_use);   // 0 while the row has seen nothing (m = -inf)
        l[r] = l[r] * alpha + warp_sum(tile_sum);
        m[r] = m_new;
#pragma unroll
        for (int u = 0; u < HS / 32; u++) t.o[row * Tiles::ldo + lane + 32 * u] *= alpha;
    }
    __syncwarp();
}

// Block (head = seq*NH + h, query tile): q, k, v (nseq, NH, S, HS); out (nseq, S, NH*HS); lse (nseq, NH, S).
template <int HS>
__global__ void __launch_bounds__(kFlashThreads)
flash_attention_forward_kernel(floatX* out, float* lse, const floatX* q, const floatX* k, const floatX* v,
                               const int* key_mask, int S, int NH, float scale) {
    using Tiles = FlashForwardTiles<HS>;
    extern __shared__ __align__(128) unsigned char flash_smem[];
    const Tiles t(reinterpret_cast<uintptr_t>(flash_smem));
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, row0 = warp * kFlashStrip;
    const size_t head = blockIdx.x, seq = head / NH;
    const int h = head % NH;
    const int q0 = (gridDim.y - 1 - blockIdx.y) * kFlashRows;   // the last query tiles see the most keys: first
    const size_t head_offset = head * S * HS;

    load_rows<HS>(t.q, Tiles::ldx, q + head_offset, HS, q0, kFlashRows, S);
    zero_strip<HS>(t.o + row0 * Tiles::ldo, Tiles::ldo);
    float m[kFlashStrip], l[kFlashStrip];
#pragma unroll
    for (int r = 0; r < kFlashStrip; r++) { m[r] = -INFINITY; l[r] = 0.0f; }

    const int key_end = min(S, q0 + kFlashRows);   // keys past the tile's last query are invisible to all of it
    for (int k0 = 0; k0 < key_end; k0 += kFlashForwardKeys) {
        __syncthreads();   // every warp is done with the previous key tile
        load_rows<HS>(t.k, Tiles::ldx, k + head_offset, HS, k0, kFlashForwardKeys, S);
        load_rows<HS>(t.v, Tiles::ldx, v + head_offset, HS, k0, kFlashForwardKeys, S);
        const bool any = load_key_visible(t.key_visible, key_mask + seq * S, k0, kFlashForwardKeys, S);
        if (!__syncthreads_or(any)) continue;   // every key of the tile masked: it changes nothing
        // S (16, 64) = q_strip (16, HS) · k^T
        warp_gemm<kFlashForwardKeys, HS, true>(t.s + row0 * Tiles::lds, Tiles::lds, t.q + row0 * Tiles::ldx, Tiles::ldx,
                                               t.k, Tiles::ldx, false);
        flash_online_softmax<HS>(t, m, l, row0, q0, k0, S, scale);
        // o (16, HS) += p (16, 64) · v
        warp_gemm<HS, kFlashForwardKeys, false>(t.o + row0 * Tiles::ldo, Tiles::ldo, t.p + row0 * Tiles::ldp, Tiles::ldp,
                                                t.v, Tiles::ldx, true);
    }
    __syncwarp();
    // out_i = o_i / l_i;  lse_i = m_i + log l_i  (a row that saw no key: l = 0, out 0, lse 0)
#pragma unroll
    for (int r = 0; r < kFlashStrip; r++) {
        const int i = q0 + row0 + r;
        if (i >= S) continue;
        const bool seen = l[r] > 0.0f;
        store_row<HS>(out + ((seq * S + i) * NH + h) * HS, t.o + (row0 + r) * Tiles::ldo, seen ? 1.0f / l[r] : 0.0f);
        if (lane == 0) lse[head * S + i] = seen ? m[r] + logf(l[r]) : 0.0f;
    }
}

// ----------------------------------------------------------------------------------------------------------------
// Flash backward.

// δ_i = Σ_d dO_id out_id = Σ_j p_ij dp_ij, one warp per row (seq, h, i). out, dout: (nseq, S, NH*HS); delta:
// (nseq, NH, S) fp32.
__global__ void flash_attention_delta_kernel(float* delta, const floatX* dout, const floatX* out, int nseq, int S, int NH,
                                             int HS) {
    const size_t row = blockIdx.x * (size_t)(blockDim.x / 32) + threadIdx.x / 32;   // (seq * NH + h) * S + i
    const int lane = threadIdx.x % 32;
    if (row >= (size_t)nseq * NH * S) return;
    const int i = row % S, h = (row / S) % NH;
    const size_t seq = row / ((size_t)S * NH);
    const size_t base = ((seq * S + i) * NH + h) * HS;
    float sum = 0.0f;
    for (int d = lane; d < HS; d += 32) sum += to_f32(dout[base + d]) * to_f32(out[base + d]);
    sum = warp_sum(sum);
    if (lane == 0) delta[row] = sum;
}

// dk/dv pass. Block (head, key tile of 64): over the query tiles q0 = k0, k0 + 32, ... (earlier queries see none of
// these keys), per warp (16 keys j, T = 32 queries i):
//   S^T = k_strip · q^T,  dP^T = v_strip · dO^T,  P^T = exp(scale·S^T - lse_i),  dS^T = P^T (dP^T - δ_i)
//   dv_strip += P^T · dO,  dk_strip += dS^T · q;   at the end dk = scale · dk_strip.
template <int HS>
__global__ void __launch_bounds__(kFlashThreads)
flash_attention_backward_dkdv_kernel(floatX* dk, floatX* dv, const floatX* dout, const floatX* q, const floatX* k,
                                     const floatX* v, const float* lse, const float* delta, const int* key_mask, int S,
                                     int NH, float scale) {
    using Tiles = FlashBackwardKVTiles<HS>;
    constexpr int T = Tiles::T;
    extern __shared__ __align__(128) unsigned char flash_smem[];
    const Tiles t(reinterpret_cast<uintptr_t>(flash_smem));
    const int warp = threadIdx.x / 32, row0 = warp * kFlashStrip;
    const size_t head = blockIdx.x, seq = head / NH;
    const int h = head % NH;
    const int k0 = blockIdx.y * kFlashRows;   // the first key tiles are seen by the most queries: first
    const size_t head_offset = head * S * HS;
    const floatX* dout_head = dout + (seq * S * NH + h) * HS;   // row i at + i * NH*HS

    load_rows<HS>(t.k, Tiles::ldx, k + head_offset, HS, k0, kFlashRows, S);
    load_rows<HS>(t.v, Tiles::ldx, v + head_offset, HS, k0, kFlashRows, S);
    const bool any = load_key_visible(t.key_visible, key_mask + seq * S, k0, kFlashRows, S);
    zero_strip<HS>(t.dk + row0 * Tiles::ldo, Tiles::ldo);
    zero_strip<HS>(t.dv + row0 * Tiles::ldo, Tiles::ldo);
    if (__syncthreads_or(any)) {   // else every key of the tile is masked: dk = dv = 0
        for (int q0 = k0; q0 < S; q0 += T) {
            __syncthreads();   // every warp is done with the previous query tile
            load_rows<HS>(t.q, Tiles::ldx, q + head_offset, HS, q0, T, S);
            load_rows<HS>(t.dout, Tiles::ldx, dout_head, (size_t)NH * HS, q0, T, S);
            load_row_stats(t.lse, t.delta, lse + head * S, delta + head * S, q0, T, S);
            __syncthreads();
            warp_gemm<T, HS, true>(t.s + row0 * Tiles::lds, Tiles::lds, t.k + row0 * Tiles::ldx, Tiles::ldx, t.q, Tiles::ldx, false);
            warp_gemm<T, HS, true>(t.dp + row0 * Tiles::lds, Tiles::lds, t.v + row0 * Tiles::ldx, Tiles::ldx, t.dout, Tiles::ldx, false);
            for (int e = threadIdx.x % 32; e < kFlashStrip * T; e += 32) {
                const int row = row0 + e / T, c = e % T;       // key k0 + row, query q0 + c
                const int i = q0 + c, j = k0 + row;
                const bool visible = i < S && j <= i && t.key_visible[row];
                const float2 entry = softmax_backward_entry(t.s[row * Tiles::lds + c], t.dp[row * Tiles::lds + c], t.lse[c],
                                                            t.delta[c], visible, scale);
                t.p[row * Tiles::ldp + c] = to_floatX(entry.x);
                t.ds[row * Tiles::ldp + c] = to_floatX(entry.y);
            }
            __syncwarp();
            warp_gemm<HS, T, false>(t.dv + row0 * Tiles::ldo, Tiles::ldo, t.p + row0 * Tiles::ldp, Tiles::ldp, t.dout, Tiles::ldx, true);
            warp_gemm<HS, T, false>(t.dk + row0 * Tiles::ldo, Tiles::ldo, t.ds + row0 * Tiles::ldp, Tiles::ldp, t.q, Tiles::ldx, true);
        }
    }
    __syncwarp();
#pragma unroll 1
    for (int r = 0; r < kFlashStrip; r++) {
        const int j = k0 + row0 + r;
        if (j >= S) break;
        store_row<HS>(dk + head_offset + (size_t)j * HS, t.dk + (row0 + r) * Tiles::ldo, scale);
        store_row<HS>(dv + head_offset + (size_t)j * HS, t.dv + (row0 + r) * Tiles::ldo, 1.0f);
    }
}

// dq pass. Block (head, query tile of 64): over the key tiles up to the tile's last query, per warp (16 queries i,
// T = 32 keys j):  S = q_strip · k^T,  dP = dO_strip · v^T,  P, dS as in the dk/dv pass,  dq_strip += dS · k;
// at the end dq = scale · dq_strip.
template <int HS>
__global__ void __launch_bounds__(kFlashThreads)
flash_attention_backward_dq_kernel(floatX* dq, const floatX* dout, const floatX* q, const floatX* k, const floatX* v,
                                   const float* lse, const float* delta, const int* key_mask, int S, int NH, float scale) {
    using Tiles = FlashBackwardQTiles<HS>;
    constexpr int T = Tiles::T;
    extern __shared__ __align__(128) unsigned char flash_smem[];
    const Tiles t(reinterpret_cast<uintptr_t>(flash_smem));
    const int warp = threadIdx.x / 32, row0 = warp * kFlashStrip;
    const size_t head = blockIdx.x, seq = head / NH;
    const int h = head % NH;
    const int q0 = (gridDim.y - 1 - blockIdx.y) * kFlashRows;
    const size_t head_offset = head * S * HS;

    load_rows<HS>(t.q, Tiles::ldx, q + head_offset, HS, q0, kFlashRows, S);
    load_rows<HS>(t.dout, Tiles::ldx, dout + (seq * S * NH + h) * HS, (size_t)NH * HS, q0, kFlashRows, S);
    load_row_stats(t.lse, t.delta, lse + head * S, delta + head * S, q0, kFlashRows, S);
    zero_strip<HS>(t.dq + row0 * Tiles::ldo, Tiles::ldo);

    const int key_end = min(S, q0 + kFlashRows);
    for (int k0 = 0; k0 < key_end; k0 += T) {
        __syncthreads();   // every warp is done with the previous key tile
        load_rows<HS>(t.k, Tiles::ldx, k + head_offset, HS, k0, T, S);
        load_rows<HS>(t.v, Tiles::ldx, v + head_offset, HS, k0, T, S);
        const bool any = load_key_visible(t.key_visible, key_mask + seq * S, k0, T, S);
        if (!__syncthreads_or(any)) continue;
        warp_gemm<T, HS, true>(t.s + row0 * Tiles::lds, Tiles::lds, t.q + row0 * Tiles::ldx, Tiles::ldx, t.k, Tiles::ldx, false);
        warp_gemm<T, HS, true>(t.dp + row0 * Tiles::lds, Tiles::lds, t.dout + row0 * Tiles::ldx, Tiles::ldx, t.v, Tiles::ldx, false);
        for (int e = threadIdx.x % 32; e < kFlashStrip * T; e += 32) {
            const int row = row0 + e / T, c = e % T;           // query q0 + row, key k0 + c
            const int i = q0 + row, j = k0 + c;
            const bool visible = i < S && j <= i && t.key_visible[c];
            const float2 entry = softmax_backward_entry(t.s[row * Tiles::lds + c], t.dp[row * Tiles::lds + c], t.lse[row],
                                                        t.delta[row], visible, scale);
            t.ds[row * Tiles::ldp + c] = to_floatX(entry.y);
        }
        __syncwarp();
        warp_gemm<HS, T, false>(t.dq + row0 * Tiles::ldo, Tiles::ldo, t.ds + row0 * Tiles::ldp, Tiles::ldp, t.k, Tiles::ldx, true);
    }
    __syncwarp();
#pragma unroll 1
    for (int r = 0; r < kFlashStrip; r++) {
        const int i = q0 + row0 + r;
        if (i >= S) break;
        store_row<HS>(dq + head_offset + (size_t)i * HS, t.dq + (row0 + r) * Tiles::ldo, scale);
    }
}

// ----------------------------------------------------------------------------------------------------------------
// Flash launchers.

inline void check_flash_attention_args(const char* who, int nseq, int S, int NH, int HS,
                                       std::initializer_list<const void*> tensors) {
    if (HS != 32 && HS != 64 && HS != 128)
        throw std::runtime_error(std::string(who) + ": head size " + std::to_string(HS) + " not in {32, 64, 128}");
    if (S < 1) throw std::runtime_error(std::string(who) + ": sequence length must be at least 1");
    if ((size_t)nseq * NH > 0x7fffffffull) throw std::runtime_error(std::string(who) + ": too many heads for one grid");
    if (flash_tiles(S) > 65535) throw std::runtime_error(std::string(who) + ": sequence too long for one grid");
    for (const void* p : tensors)
        if (reinterpret_cast<uintptr_t>(p) % 16 != 0)
            throw std::runtime_error(std::string(who) + ": q, k, v, out, dout, dq, dk, dv must be 16-byte aligned");
}

template <int HS>
inline void flash_attention_forward_launch(floatX* out, float* lse, const floatX* q, const floatX* k, const floatX* v,
                                           const int* key_mask, int nseq, int S, int NH, cudaStream_t stream) {
    const size_t smem = FlashForwardTiles<HS>(0).bytes;
    allow_dynamic_smem(flash_attention_forward_kernel<HS>, smem, "flash_attention_forward");
    const dim3 grid((unsigned)(nseq * NH), (unsigned)flash_tiles(S));
    flash_attention_forward_kernel<HS><<<grid, kFlashThreads, smem, stream>>>(out, lse, q, k, v, key_mask, S, NH,
                                                                             1.0f / std::sqrt((float)HS));
    cudaCheckLaunch();
}

template <int HS>
inline void flash_attention_backward_launch(floatX* dq, floatX* dk, floatX* dv, const floatX* dout, const float* lse,
                                            const floatX* q, const floatX* k, const floatX* v, const int* key_mask,
                                            const float* delta, int nseq, int S, int NH, cudaStream_t stream) {
    const float scale = 1.0f / std::sqrt((float)HS);
    const dim3 grid((unsigned)(nseq * NH), (unsigned)flash_tiles(S));
    const size_t smem_kv = FlashBackwardKVTiles<HS>(0).bytes, smem_q = FlashBackwardQTiles<HS>(0).bytes;
    allow_dynamic_smem(flash_attention_backward_dkdv_kernel<HS>, smem_kv, "flash_attention_backward (dk, dv)");
    allow_dynamic_smem(flash_attention_backward_dq_kernel<HS>, smem_q, "flash_attention_backward (dq)");
    flash_attention_backward_dkdv_kernel<HS><<<grid, kFlashThreads, smem_kv, stream>>>(dk, dv, dout, q, k, v, lse, delta,
                                                                                      key_mask, S, NH, scale);
    cudaCheckLaunch();
    flash_attention_backward_dq_kernel<HS><<<grid, kFlashThreads, smem_q, stream>>>(dq, dout, q, k, v, lse, delta, key_mask,
                                                                                   S, NH, scale);
    cudaCheckLaunch();
}

// q, k, v: (nseq, NH, S, HS), HS in {32, 64, 128}   key_mask: (nseq, S)   out: (nseq, S, NH*HS)
// lse: (nseq, NH, S) fp32, written for the backward. Tensors 16-byte aligned.
inline void flash_attention_forward(floatX* out, float* lse, const floatX* q, const floatX* k, const floatX* v,
                                    const int* key_mask, int nseq, int S, int NH, int HS, cudaStream_t stream) {
    check_flash_attention_args("flash_attention_forward", nseq, S, NH, HS, {out, q, k, v});
    if ((size_t)nseq * NH == 0) return;
    switch (HS) {
        case 32: flash_attention_forward_launch<32>(out, lse, q, k, v, key_mask, nseq, S, NH, stream); break;
        case 64: flash_attention_forward_launch<64>(out, lse, q, k, v, key_mask, nseq, S, NH, stream); break;
        case 128: flash_attention_forward_launch<128>(out, lse, q, k, v, key_mask, nseq, S, NH, stream); break;
        default: break;   // rejected above
    }
}

// dout: (nseq, S, NH*HS); out, lse: what flash_attention_forward wrote for these q, k, v -> dq, dk, dv:
// (nseq, NH, S, HS), written. delta: scratch of (nseq, NH, S) fp32.
inline void flash_attention_backward(floatX* dq, floatX* dk, floatX* dv, const floatX* dout, const floatX* out,
                                     const float* lse, const floatX* q, const floatX* k, const floatX* v, const int* key_mask,
                                     float* delta, int nseq, int S, int NH, int HS, cudaStream_t stream) {
    check_flash_attention_args("flash_attention_backward", nseq, S, NH, HS, {dq, dk, dv, dout, out, q, k, v});
    if ((size_t)nseq * NH == 0) return;
    const size_t rows = (size_t)nseq * NH * S;
    flash_attention_delta_kernel<<<warp_rows_grid(rows), 256, 0, stream>>>(delta, dout, out, nseq, S, NH, HS);
    cudaCheckLaunch();
    switch (HS) {
        case 32: flash_attention_backward_launch<32>(dq, dk, dv, dout, lse, q, k, v, key_mask, delta, nseq, S, NH, stream); break;
        case 64: flash_attention_backward_launch<64>(dq, dk, dv, dout, lse, q, k, v, key_mask, delta, nseq, S, NH, stream); break;
        case 128: flash_attention_backward_launch<128>(dq, dk, dv, dout, lse, q, k, v, key_mask, delta, nseq, S, NH, stream); break;
        default: break;   // rejected above
    }
}

}  // namespace
