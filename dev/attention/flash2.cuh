// flash2.cuh: FlashAttention-2 for blocktf's BF16 build, register-resident tiles on mma.sync tensor cores.
// Written to sit after blocktf.cu's attention section (and dev/attention/fused_attention.cuh, whose scalar flash path
// the FP32 build falls back to). It uses from blocktf.cu: floatX, cudaCheck, cudaCheckLaunch, attention_cached.
// defines (public, any precision):
//   flash2_attention_forward / flash2_attention_backward: same arguments, semantics and layouts as
//     flash_attention_forward / flash_attention_backward of fused_attention.cuh (training: q, k, v (nseq, NH, S, HS),
//     out and dout (nseq, S, NH*HS), lse (nseq, NH, S) fp32, dq, dk, dv (nseq, NH, S, HS) written, deterministic).
//   flash2_attention_cached_prefill: new queries over a KV cache (generation's prefill), the semantics of blocktf's
//     attention_cached with a host-side start position p0.
// The FP32 build has no bf16 tensor-core path: there the three calls go to fused_attention.cuh's scalar flash kernels
// and to blocktf's attention_cached, so callers have one API.
//
// Semantics (SPEC 1.1.5, as fused_attention.cuh's header): query i sees keys j <= i (+ p0 for the cache) with
// key_mask[j] = 1; s_ij = q_i·k_j / sqrt(HS); p_i = softmax_j(s_ij) in fp32; out_i = Σ_j p_ij v_j. A query that sees no
// key outputs 0 and stores lse = 0; the backward gives it (and every invisible key) zero gradients.
//
// ================================================================================================================
// Design (FlashAttention-2, Dao 2023), all three kernels on mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32:
//   every product is C (16 x 8, fp32) += A (16 x 16, bf16) · B (16 x 8, bf16) issued by one warp; a warp owns 16 rows
//   (or 32: two "row groups") of the side it keeps (queries in the forward and the dq pass, keys in the dk/dv pass)
//   and walks tiles of the other side, which the block stages in shared memory with cp.async (two stages: the next
//   tile's copy is in flight while the warps compute on the current one). Everything else stays in registers: the
//   warp's own operand fragments, the score tile, the running softmax statistics and the output/gradient
//   accumulators. The score tile's C fragments become the A fragments of the next product in registers (bf16
//   packing only), so nothing (S, S)-sized ever touches shared or device memory.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"); lane = 4*g + t with
// g = lane / 4 (the "group", 0..7) and t = lane % 4 (0..3); a register .b32 holds two bf16, the lower column (or row)
// index in the low half:
//   A (16 x 16, row-major), 4 regs: a0 = A[g][2t, 2t+1]   a1 = A[g+8][2t, 2t+1]   a2 = A[g][2t+8, 2t+9]
//                                   a3 = A[g+8][2t+8, 2t+9]
//   B (16 x 8, "col"), 2 regs:      b0 = B[2t, 2t+1][g]   b1 = B[2t+8, 2t+9][g]
//   C (16 x 8, fp32), 4 regs:       c0, c1 = C[g][2t, 2t+1]   c2, c3 = C[g+8][2t, 2t+1]
// So the C fragments of two adjacent 8-column tiles n = 2kk, 2kk+1 of a (16 x N) result are, packed to bf16, exactly
// the A fragment of k-step kk of a product that takes that result as its left operand:
//   a0 = (c[2kk][0], c[2kk][1])  a1 = (c[2kk][2], c[2kk][3])  a2 = (c[2kk+1][0], c[2kk+1][1])  a3 = (c[2kk+1][2], c[2kk+1][3])
// (c_to_a below). A thread holds rows g and g+8 of each row group: the row statistics (max, sum) of a row are spread
// over the 4 threads t = 0..3 of one quad and reduced with two xor-shuffles (1, 2).
//
// Shared memory: every tile is row-major bf16 with its rows padded from HS to kLd = HS + 8 elements (HS*2 + 16
// bytes). ldmatrix reads 8 rows x 16 bytes per 8x8 matrix; with the 16-byte pad, row r starts in 16-byte bank group
// (r * (kLd / 8)) % 8 = (r + const) % 8, so the 8 rows of a matrix hit 8 different bank groups: conflict-free, and the
// same holds for the 16-byte cp.async stores (8 consecutive chunks of a row). Operands are loaded with ldmatrix.x4:
//   A (rows r0.., cols k0..): lane l gives the address of row r0 + (l % 16), col k0 + 8 * (l / 16); the 4 matrices
//     come back as a0..a3.
//   B = T^T for a stored tile T (n rows, k cols; e.g. K in q·k^T): lane l gives row n0 + (l % 8) + 8 * (l / 16), col
//     k0 + 8 * ((l / 8) % 2); registers 0, 1 are (b0, b1) of n-tile n0 and 2, 3 those of n-tile n0 + 8.
//   B = T for a stored tile T (k rows, n cols; e.g. V in p·v): ldmatrix.trans, lane l gives row k0 + (l % 16), col
//     n0 + 8 * (l / 16); registers 0, 1 are (b0, b1) of n-tile n0 and 2, 3 those of n-tile n0 + 8.
// Rows past the end of a matrix, and key rows that are masked, are zero-filled by cp.async (src-size 0), so no
// garbage (not even NaN left in an unused cache slot) reaches a product.
//
// Softmax: scores are kept in the log2 domain with the scale folded in, x = s · HS^-0.5 · log2(e), so that each
// probability is one FFMA and one ex2.approx: p = 2^(s·c - m). m = running row max (-inf until the row has seen a
// visible key; 0 is used in its place then, so every exp2 is exp2(-inf) = 0 and nothing is NaN), l = running row sum
// (kept per thread, quad-reduced once at the end), and the output accumulator is rescaled by 2^(m_old - m_new) when
// the max grows. lse_i = ln2 · (m_i + log2 l_i) (natural log, fp32, as fused_attention.cuh stores it).
// Masking: causal key tiles past a warp's last query are never computed (skipped per warp; the block's last tile is
// the one holding its last query's diagonal); the element-wise mask (causal j <= i + p0, key visibility from the
// key_mask, j < number of keys) is applied only on tiles that cross a warp's diagonal or hold a masked/missing key;
// a tile whose keys are all masked is skipped. Key visibility of a tile is one __ballot_sync per 32 keys.
//
// Kernels and their shapes (4 warps = 128 threads per block in all three):
//   forward (also the cached prefill; strides are parameters): block = kBlockM queries of one (sequence, head),
//     key tiles of 64. HS 32, 64: 2 row groups per warp (32 queries), kBlockM = 128; HS 128: 1 row group, kBlockM = 64
//     (two would need 128 accumulator registers per thread for o alone).
//     Per key tile a warp runs S = Q K^T (16 x 64 per row group: HS/16 x 8 mma), the online softmax in registers,
//     O += P V (16 x HS: 4 x HS/8 mma). Shared: Q (kBlockM rows) + 2 stages x (K, V: 64 rows).
//   backward, deterministic, no atomics: (1) δ_i = dO_i·out_i (a small vectorised kernel); (2) dk/dv pass: block = 64
//     keys, a warp 16 of them (their K, and at HS 32 V, held as A fragments; else read from shared memory at each use)
//     with their dK, dV accumulators in registers; per query tile (64; 32 at HS 128), double-buffered with its lse and
//     δ: S^T = K Q^T, dP^T = V dO^T, P^T = 2^(S^T c - lse_i log2e), dS^T = P^T (dP^T - δ_i), dV += P^T dO,
//     dK += dS^T Q (P^T and dS^T go from C to A fragments in registers); (3) dq pass: block = 64 queries, a warp 16,
//     with Q, dO fragments and the dQ accumulator; per key tile (64; 32 at HS 128): S = Q K^T, dP = dO V^T, P, dS,
//     dQ += dS K. The dq pass recomputes S and dP instead of accumulating dq with atomics: 7 products per visible
//     pair instead of 5 (3.5x the forward's FLOPs instead of 2.5x), the price of bitwise-reproducible gradients.
//     A block or warp whose keys are all masked skips its products; a masked key's dK, dV rows are written as zeros
//     (its rows of P^T, dS^T only ever feed its own output rows, so the dk/dv pass needs no key mask per element).
//
// Resources (nvcc 13.0, sm_90, no spills unless said; H200 SM: 64K registers, 228 KB shared memory, 4 SMSPs):
//                 registers (HS 32 / 64 / 128)   shared memory per block        blocks (warps) per SM
//   forward       186 / 248 / 226                30 / 54 / 85 KB                2 (8), by registers
//   dk/dv pass    159 / 168* / 236               31 / 55 / 68.5 KB              3 / 3 / 2, by registers
//   dq pass       146 / 168 / 168                30 / 54 / 68 KB                3 (12)
//   (* capped by __launch_bounds__ for 3 blocks per SM: 32 bytes of spill, 6 reloads of loop-invariant values per
//   query tile.) Where the registers go, forward HS 64 per thread: q fragments 2 groups x 16, o 2 x 32, scores
//   2 x 32 (the packed p reuses them), statistics 8, plus B fragments the compiler loads ahead of their mma.
//
// FLOPs and bytes. Forward: 4·HS·S(S+1)/2 per (sequence, head), causal. Device memory sees q, k, v, out once (4E
//   bf16); each block re-reads K and V up to its diagonal from L2: at S 2048, HS 64, kBlockM 128, 16 KB of K, V per
//   128x64 tile pair (2 MFLOP) -> 128 FLOP per L2 byte, ~0.8 GB per call (~0.1 ms of L2 bandwidth at ~8 TB/s,
//   overlapped). Backward: 7 products per visible pair (S, dP twice) = 3.5x the forward's FLOPs executed for the 2.5x
//   counted; device memory: q, k, v, dout, out (δ pass), dq, dk, dv once; Q/dO (dk/dv pass) and K/V (dq pass) tiles
//   from L2, 64 rows of the owning side per block.
//
// Expected speed on the H200 (BF16, nseq 8, NH 12, S 2048, HS 64; F = 5.16e10 FLOP counted for the forward), and why.
//   Ceilings: mma.sync bf16 ~2/3 of the 709 TFLOP/s dense wgmma figure (~470 TFLOP/s, an HMMA.16816 every ~6.5
//   cycles per SMSP at 1.98 GHz); ex2 on the MUFU, 4 per cycle per SMSP: one per 4·HS = 256 FLOP of mma, 8 cycles per
//   warp instruction (a forward warp-tile has 68: 540 cycles against ~830 of HMMA, overlappable); shared memory 128
//   B/cycle per SM: a warp reads 16 KB of K, V fragments per 2 x 16-row groups x 64 keys (32 FLOP/B: 1 PFLOP/s-
//   equivalent, not binding; 16 FLOP/B with one row group, still 2x above the mma ceiling).
//   Per warp and 64-key tile, the forward's loop issues 128 HMMA + 40 LDSM + ~650 other instructions (softmax: FFMA +
//   MUFU + FADD + FMNMX + F2FP per score, the o rescale, masking on diagonal tiles only); two such warps share an
//   SMSP, so issue (~1800 cycles per two warp-tiles) rather than the tensor pipe (~1660) bounds it at ~550 TFLOP/s in
//   an ideal overlap. FA2 kernels of this shape run at ~40-55% of such a bound (dependency stalls at 2 warps per SMSP,
//   two barriers per tile, the 64-key diagonal tiles, a 5.8-wave grid at S 2048): forward ~220-300 TFLOP/s (0.17-0.23
//   ms, 7-9x the fused_attention.cuh flash kernel; the brief's target 250 is inside that range, not guaranteed).
//   Backward, counted as 2.5 F: the dk/dv pass (2 F executed, 128 HMMA + ~600 others per 16 keys x 64 queries, 12
//   warps per SM) at ~230-300 and the dq pass (1.5 F, 96 HMMA + ~450 others per tile) at ~200-260 executed TFLOP/s
//   give 0.70-0.85 ms, i.e. ~150-185 TFLOP/s counted (4-5x fused_attention.cuh's; the 150 target is reachable, not
//   certain). HS 128 (nseq 16, NH 16, S 511): the mma work per softmax element doubles, so the same or better
//   fractions, minus ~11% for the diagonal tiles at S 511. Nothing here has been timed: these are estimates.
//
// Correctness tests: dev/attention/test_attention.cu (GPU, against a double-precision reference) and
// dev/attention/flash2_emulate.cpp (CPU: runs these very kernel bodies on an emulator of the warp-level primitives,
// with every thread a fiber; build it with FLASH2_EMULATE defined).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <cuda_bf16.h>
#if !defined(FLASH2_EMULATE)
#include <string>
#include "dev/attention/fused_attention.cuh"
#endif

namespace {   // internal linkage, as everything in blocktf.cu

namespace flash2 {

using bf16 = __nv_bfloat16;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__host__ __device__ constexpr int imin(int a, int b) { return a < b ? a : b; }

// ================================================================================================================
// Primitives. On the GPU: inline PTX. With FLASH2_EMULATE (host-only build of dev/attention/flash2_emulate.cpp):
// calls into the emulator, which defines these emu:: functions and threadIdx, __syncthreads, __shfl_xor_sync and
// __ballot_sync before including this file.

// Shared-memory address (as ldmatrix and cp.async take it) of a generic pointer into shared memory.
__device__ __forceinline__ uint32_t smem_address(const void* p) {
#if defined(FLASH2_EMULATE)
    return emu::smem_offset(p);
#else
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
#endif
}

// The block's dynamic shared memory (128-byte aligned).
__device__ __forceinline__ unsigned char* dynamic_smem() {
#if defined(FLASH2_EMULATE)
    return emu::smem_base();
#else
    extern __shared__ __align__(128) unsigned char flash2_smem[];
    return flash2_smem;
#endif
}

// d (16 x 8 fp32 C fragment) += a (16 x 16 bf16 A fragment) · (b0, b1) (16 x 8 bf16 B fragment). Layouts: top of file.
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(FLASH2_EMULATE)
    emu::mma_bf16_16816(d, a, b0, b1);
#else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Four 8x8 bf16 matrices from shared memory; lane l gives the address (16-byte aligned) of row l % 8 of matrix l / 8.
// Without trans, lane l receives in r[i] elements (l / 4, 2(l % 4)), (l / 4, 2(l % 4) + 1) of matrix i; with trans,
// elements (2(l % 4), l / 4), (2(l % 4) + 1, l / 4).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t address) {
#if defined(FLASH2_EMULATE)
    emu::ldmatrix_x4(r, address, false);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address));
#endif
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t address) {
#if defined(FLASH2_EMULATE)
    emu::ldmatrix_x4(r, address, true);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address));
#endif
}

// Asynchronous global -> shared copies: 16 bytes (.cg: bypasses L1) or 4 bytes (.ca); only src_bytes (0 or the full
// size) are read, the rest of the destination is zero-filled. src must be a valid, aligned address even when
// src_bytes is 0 (callers pass the matrix's first row then).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
#if defined(FLASH2_EMULATE)
    emu::cp_async(dst, src, 16, src_bytes);
#else
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
#endif
}
__device__ __forceinline__ void cp_async_4(uint32_t dst, const void* src, int src_bytes) {
#if defined(FLASH2_EMULATE)
    emu::cp_async(dst, src, 4, src_bytes);
#else
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
#endif
}
// Closes the group of this thread's copies issued since the last commit (an empty group is fine).
__device__ __forceinline__ void cp_async_commit() {
#if defined(FLASH2_EMULATE)
    emu::cp_async_commit();
#else
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}
// Waits until at most kPending of this thread's committed groups are still in flight. Other threads' copies become
// visible only after a __syncthreads that follows their own wait.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#if defined(FLASH2_EMULATE)
    emu::cp_async_wait(kPending);
#else
    asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#endif
}

// 2^x (ex2.approx.ftz: about 2 ulp; 2^-inf = +0).
__device__ __forceinline__ float exp2_approx(float x) {
#if defined(FLASH2_EMULATE)
    return emu::exp2_approx(x);
#else
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
#endif
}

// Two floats -> bf16x2 (round to nearest even), lo in the low half (the lower column/row of a fragment register).
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
    const __nv_bfloat162 packed = __floats2bfloat162_rn(lo, hi);
    uint32_t bits;
    memcpy(&bits, &packed, sizeof(bits));
    return bits;
}

// The bf16 in the low 16 bits of bits, as a float.
__device__ __forceinline__ float bf16_bits_to_float(uint32_t bits) {
    return __bfloat162float(__ushort_as_bfloat16((unsigned short)(bits & 0xffffu)));
}

// Device-memory accesses outside the cp.async path (the emulator checks their bounds and counts the stores).
template <typename T>
__device__ __forceinline__ T load_global(const T* p) {
#if defined(FLASH2_EMULATE)
    emu::check_global_read(p, sizeof(T));
#endif
    return *p;
}
__device__ __forceinline__ void store_global_u32(void* p, uint32_t value) {
#if defined(FLASH2_EMULATE)
    emu::global_store(p, &value, sizeof(value));
#else
    *static_cast<uint32_t*>(p) = value;
#endif
}
__device__ __forceinline__ void store_global_f32(float* p, float value) {
#if defined(FLASH2_EMULATE)
    emu::global_store(p, &value, sizeof(value));
#else
    *p = value;
#endif
}

// ================================================================================================================
// Tile helpers, all for bf16 tiles of HS columns with padded rows of kLd = HS + 8 elements in shared memory.

template <int HS>
struct Tile {
    static_assert(HS == 32 || HS == 64 || HS == 128, "head size 32, 64 or 128");
    static constexpr int kLd = HS + 8;                 // row stride in elements (16-byte pad: see the top of file)
    static constexpr int kRowBytes = kLd * 2;
    static constexpr int kChunksPerRow = HS / 8;       // 16-byte chunks per row
    __host__ __device__ static constexpr uint32_t bytes(int rows) { return (uint32_t)rows * kRowBytes; }
};

// Block-cooperative cp.async of rows [row0, row0 + kRows) of a matrix whose row r starts at src + r * stride (HS
// bf16, 16-byte aligned) into the tile at shared address dst. Row row0 + r is copied when valid(r), else zero-filled.
template <int HS, int kRows, typename Valid>
__device__ __forceinline__ void load_tile(uint32_t dst, const bf16* src, size_t stride, int row0, Valid valid) {
    using T = Tile<HS>;
    constexpr int kChunks = kRows * T::kChunksPerRow;
    static_assert(kChunks % kThreads == 0, "whole rounds of chunks");
#pragma unroll
    for (int u = 0; u < kChunks / kThreads; u++) {
        const int index = u * kThreads + threadIdx.x;
        const int r = index / T::kChunksPerRow, c = index % T::kChunksPerRow;
        const bool ok = valid(r);
        const bf16* from = src + (ok ? (size_t)(row0 + r) * stride + c * 8 : 0);
        cp_async_16(dst + r * T::kRowBytes + c * 16, from, ok ? 16 : 0);
    }
}

// lse and δ of rows [row0, row0 + count) of one head ((S) values each) to the shared arrays dst_lse, dst_delta
// (count floats each, by cp.async); 0 for rows at or past S. Threads 0..count-1 copy lse, count..2count-1 copy δ.
__device__ __forceinline__ void load_row_stats(uint32_t dst_lse, uint32_t dst_delta, const float* lse, const float* delta,
                                               int row0, int count, int S) {
    if ((int)threadIdx.x < 2 * count) {
        const bool is_delta = (int)threadIdx.x >= count;
        const int r = threadIdx.x % count, i = row0 + r;
        const bool ok = i < S;
        cp_async_4((is_delta ? dst_delta : dst_lse) + 4 * r, (is_delta ? delta : lse) + (ok ? i : 0), ok ? 4 : 0);
    }
}

// Bit r (r < kKeys, kKeys 32 or 64): key k0 + r exists (< kv_len) and is visible (mask null, or mask[k0 + r] != 0).
// Warp-collective; every lane gets the same bits.
template <int kKeys>
__device__ __forceinline__ uint64_t key_bits(const int* mask, int k0, int kv_len) {
    static_assert(kKeys == 32 || kKeys == 64, "one or two ballots");
    const int lane = threadIdx.x % 32;
    uint64_t bits = 0;
#pragma unroll
    for (int u = 0; u < kKeys / 32; u++) {
        const int j = k0 + 32 * u + lane;
        const bool visible = j < kv_len && (mask == nullptr || load_global(mask + j) != 0);
        bits |= (uint64_t)__ballot_sync(0xffffffffu, visible) << (32 * u);
    }
    return bits;
}
template <int kKeys>
__host__ __device__ constexpr uint64_t all_bits() { return kKeys == 64 ? ~0ull : (1ull << kKeys) - 1; }

// A fragments of kGroups row groups (rows row0 + 16 mr + 0..15) x K columns of a stored tile at shared address tile.
template <int kGroups, int K, int kLd>
__device__ __forceinline__ void load_a(uint32_t (&a)[kGroups][K / 16][4], uint32_t tile, int row0) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int mr = 0; mr < kGroups; mr++)
#pragma unroll
        for (int kk = 0; kk < K / 16; kk++)
            ldmatrix_x4(a[mr][kk], tile + ((row0 + 16 * mr + lane % 16) * kLd + 16 * kk + 8 * (lane / 16)) * 2);
}

// acc[mr] (16 x N) += A[mr] (16 x K) · T^T, T the stored tile (rows 0..N-1, columns 0..K-1) at shared address tile.
template <int kGroups, int N, int K, int kLd>
__device__ __forceinline__ void mma_a_bt(float (&acc)[kGroups][N / 8][4], const uint32_t (&a)[kGroups][K / 16][4],
                                         uint32_t tile) {
    const int lane = threadIdx.x % 32;
    const uint32_t lane_offset = ((lane % 8 + 8 * (lane / 16)) * kLd + 8 * ((lane / 8) % 2)) * 2;
#pragma unroll
    for (int kk = 0; kk < K / 16; kk++)
#pragma unroll
        for (int np = 0; np < N / 16; np++) {
            uint32_t b[4];
            ldmatrix_x4(b, tile + lane_offset + (16 * np * kLd + 16 * kk) * 2);
#pragma unroll
            for (int mr = 0; mr < kGroups; mr++) {
                mma_16816(acc[mr][2 * np], a[mr][kk], b[0], b[1]);
                mma_16816(acc[mr][2 * np + 1], a[mr][kk], b[2], b[3]);
            }
        }
}

// The same for one row group whose A fragments are read from shared memory as they are needed (rows row0..row0+15
// of the stored tile a_tile), where holding them in registers for the whole pass would cost too many registers.
template <int N, int K, int kLd>
__device__ __forceinline__ void mma_a_bt_smem_a(float (&acc)[1][N / 8][4], uint32_t a_tile, int row0, uint32_t tile) {
    const int lane = threadIdx.x % 32;
    const uint32_t lane_offset = ((lane % 8 + 8 * (lane / 16)) * kLd + 8 * ((lane / 8) % 2)) * 2;
#pragma unroll
    for (int kk = 0; kk < K / 16; kk++) {
        uint32_t a[1][1][4];
        load_a<1, 16, kLd>(a, a_tile + 16 * kk * 2, row0);
#pragma unroll
        for (int np = 0; np < N / 16; np++) {
            uint32_t b[4];
            ldmatrix_x4(b, tile + lane_offset + (16 * np * kLd + 16 * kk) * 2);
            mma_16816(acc[0][2 * np], a[0][0], b[0], b[1]);
            mma_16816(acc[0][2 * np + 1], a[0][0], b[2], b[3]);
        }
    }
}

// acc[mr] (16 x N) += A[mr] (16 x K) · T, T the stored tile (rows 0..K-1, columns 0..N-1) at shared address tile,
// through ldmatrix.trans.
template <int kGroups, int N, int K, int kLd>
__device__ __forceinline__ void mma_a_b(float (&acc)[kGroups][N / 8][4], const uint32_t (&a)[kGroups][K / 16][4],
                                        uint32_t tile) {
    const int lane = threadIdx.x % 32;
    const uint32_t lane_offset = ((lane % 16) * kLd + 8 * (lane / 16)) * 2;
#pragma unroll
    for (int kk = 0; kk < K / 16; kk++)
#pragma unroll
        for (int np = 0; np < N / 16; np++) {
            uint32_t b[4];
            ldmatrix_x4_trans(b, tile + lane_offset + (16 * kk * kLd + 16 * np) * 2);
#pragma unroll
            for (int mr = 0; mr < kGroups; mr++) {
                mma_16816(acc[mr][2 * np], a[mr][kk], b[0], b[1]);
                mma_16816(acc[mr][2 * np + 1], a[mr][kk], b[2], b[3]);
            }
        }
}

// C fragments of a (16 x N) fp32 result -> A fragments (bf16) of the same matrix as a left operand (top of file).
template <int N>
__device__ __forceinline__ void c_to_a(uint32_t (&a)[N / 16][4], const float (&c)[N / 8][4]) {
#pragma unroll
    for (int kk = 0; kk < N / 16; kk++) {
        a[kk][0] = pack_bf16x2(c[2 * kk][0], c[2 * kk][1]);
        a[kk][1] = pack_bf16x2(c[2 * kk][2], c[2 * kk][3]);
        a[kk][2] = pack_bf16x2(c[2 * kk + 1][0], c[2 * kk + 1][1]);
        a[kk][3] = pack_bf16x2(c[2 * kk + 1][2], c[2 * kk + 1][3]);
    }
}

template <int N>
__device__ __forceinline__ void zero(float (&acc)[N][4]) {
#pragma unroll
    for (int n = 0; n < N; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) acc[n][e] = 0.0f;
}

// Row half hh (0: row g, 1: row g + 8) of a (16 x HS) C-fragment accumulator, times factor, to row (HS bf16 in device
// memory), or zeros when !keep (a select, so that an inf or NaN in a discarded accumulator never leaks): each thread
// writes its column pairs 8n + 2t as 4-byte stores.
template <int HS>
__device__ __forceinline__ void store_row(bf16* row, const float (&acc)[HS / 8][4], int hh, float factor, bool keep) {
    const int t = threadIdx.x % 4;
#pragma unroll
    for (int n = 0; n < HS / 8; n++) {
        const float x = keep ? acc[n][2 * hh] * factor : 0.0f, y = keep ? acc[n][2 * hh + 1] * factor : 0.0f;
        store_global_u32(row + 8 * n + 2 * t, pack_bf16x2(x, y));
    }
}

// Sets to -inf the entries of a (16 x N) score tile (C fragments; rows: queries, columns: keys) that are masked:
// column c (key k0 + c) is visible to row r (query i) iff bit c of bits is set and k0 + c <= i + offset; the caller
// passes diagonal = (i of row 0) + offset - k0, so the test is c <= diagonal + r. The thread's columns are
// 8n + 2t + (e % 2): shifting bits and the limit by 2t leaves compile-time column offsets.
template <int N>
__device__ __forceinline__ void mask_scores(float (&s)[N / 8][4], uint64_t bits, int diagonal) {
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const uint64_t my_bits = bits >> (2 * t);
#pragma unroll
    for (int hh = 0; hh < 2; hh++) {
        const int limit = diagonal + g + 8 * hh - 2 * t;   // visible iff 8n + e%2 <= limit
#pragma unroll
        for (int n = 0; n < N / 8; n++)
#pragma unroll
            for (int odd = 0; odd < 2; odd++) {
                const int c = 8 * n + odd;
                if (c > limit || !(my_bits & (1ull << c))) s[n][2 * hh + odd] = -INFINITY;
            }
    }
}

// ================================================================================================================
// Forward (and cached prefill).

template <int HS>
struct ForwardConfig {
    static constexpr int kGroups = HS <= 64 ? 2 : 1;           // 16-row groups per warp
    static constexpr int kWarpRows = 16 * kGroups;
    static constexpr int kBlockM = kWarps * kWarpRows;         // queries per block: 128 (HS 32, 64) or 64 (HS 128)
    static constexpr int kBlockN = 64;                         // keys per tile
    // Blocks per SM the register allocation must allow (__launch_bounds__): 2, i.e. up to 255 registers; at 3 (168
    // registers) the HS 64 kernel spills ~400 bytes inside its loop.
#if defined(FLASH2_FWD_MIN_BLOCKS)
    static constexpr int kMinBlocks = FLASH2_FWD_MIN_BLOCKS;
#else
    static constexpr int kMinBlocks = 2;
#endif
    // Shared memory: Q (kBlockM rows), then stage s = 0, 1: K (kBlockN rows), V (kBlockN rows).
    static constexpr uint32_t kQ = 0;
    static constexpr uint32_t kStage0 = Tile<HS>::bytes(kBlockM);
    static constexpr uint32_t kStageBytes = 2 * Tile<HS>::bytes(kBlockN);
    static constexpr uint32_t kSmemBytes = kStage0 + 2 * kStageBytes;
};

// One forward launch: query rows i < n_q of each (seq, h) over key rows j < kv_len; query i sees key j iff
// j <= i + offset and key_mask (nullable) says visible. Strides in elements.
struct ForwardParams {
    bf16* out;                  // row i of (seq, h) at out + seq * out_seq_stride + i * out_row_stride + h * HS
    float* lse;                 // nullable; (seq * NH + h) * n_q + i
    const bf16* q;              // row i at q + seq * q_seq_stride + h * q_head_stride + i * q_row_stride
    const bf16 *k, *v;          // row j at k + seq * kv_seq_stride + h * kv_head_stride + j * HS
    const int* key_mask;        // nullable; key j of seq at key_mask[seq * mask_seq_stride + j]
    size_t q_seq_stride, q_head_stride, kv_seq_stride, kv_head_stride, out_seq_stride, mask_seq_stride;
    int q_row_stride, out_row_stride;
    int NH, n_q, kv_len, offset;
    float scale_log2;           // HS^-0.5 · log2(e)
};

// Block (head = seq * NH + h, query tile). See the top of the file for the scheme.
template <int HS>
__device__ __forceinline__ void forward_block(const ForwardParams& p, int head, int tile) {
    using C = ForwardConfig<HS>;
    using T = Tile<HS>;
    constexpr int G = C::kGroups, BN = C::kBlockN, kLd = T::kLd;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const size_t seq = head / p.NH;
    const int h = head % p.NH;
    const int q0 = tile * C::kBlockM;
    const bf16* q = p.q + seq * p.q_seq_stride + h * p.q_head_stride;
    const bf16* k = p.k + seq * p.kv_seq_stride + h * p.kv_head_stride;
    const bf16* v = p.v + seq * p.kv_seq_stride + h * p.kv_head_stride;
    const int* mask = p.key_mask ? p.key_mask + seq * p.mask_seq_stride : nullptr;
    // Keys past the block's last query (+ offset) are visible to none of its queries.
    const int q_last = imin(q0 + C::kBlockM, p.n_q) - 1;
    const int key_end = imin(p.kv_len, q_last + p.offset + 1);
    const int n_tiles = (key_end + BN - 1) / BN;               // >= 1: key_end >= 1
    const uint32_t smem = smem_address(dynamic_smem());
    const uint32_t s_q = smem + C::kQ;
    auto s_k = [&](int stage) { return smem + C::kStage0 + stage * C::kStageBytes; };
    auto s_v = [&](int stage) { return s_k(stage) + T::bytes(BN); };

    // The warp's queries: w0 .. w0 + kWarpRows - 1 (absolute indices).
    const int w0 = q0 + warp * C::kWarpRows, w_last = w0 + C::kWarpRows - 1;

    // Prologue: Q and key tile 0, one commit group.
    load_tile<HS, C::kBlockM>(s_q, q, p.q_row_stride, q0, [&](int r) { return q0 + r < p.n_q; });
    uint64_t bits_next = key_bits<BN>(mask, 0, p.kv_len);
    load_tile<HS, BN>(s_k(0), k, HS, 0, [&](int r) { return (bits_next >> r) & 1; });
    load_tile<HS, BN>(s_v(0), v, HS, 0, [&](int r) { return (bits_next >> r) & 1; });
    cp_async_commit();

    uint32_t qf[G][HS / 16][4];
    float o[G][HS / 8][4];
    float m[G][2], l[G][2];   // per row half hh: running max (log2 domain), this thread's part of the running sum
#pragma unroll
    for (int mr = 0; mr < G; mr++) {
        zero(o[mr]);
        m[mr][0] = m[mr][1] = -INFINITY;
        l[mr][0] = l[mr][1] = 0.0f;
    }

    for (int kt = 0; kt < n_tiles; kt++) {
        const int stage = kt % 2, k0 = kt * BN;
        const uint64_t bits = bits_next;
        if (kt + 1 < n_tiles) {   // the next tile into the other stage (last read in iteration kt - 1)
            bits_next = key_bits<BN>(mask, k0 + BN, p.kv_len);
            load_tile<HS, BN>(s_k(1 - stage), k, HS, k0 + BN, [&](int r) { return (bits_next >> r) & 1; });
            load_tile<HS, BN>(s_v(1 - stage), v, HS, k0 + BN, [&](int r) { return (bits_next >> r) & 1; });
        }
        cp_async_commit();
        cp_async_wait<1>();       // this thread's copies of tile kt (and Q) landed
        __syncthreads();          // everyone's did
        if (kt == 0) load_a<G, HS, kLd>(qf, s_q, warp * C::kWarpRows);

        // Warp-uniform skips: every key of the tile after every query of the warp, no visible key, no real query.
        if (bits != 0 && k0 <= w_last + p.offset && w0 < p.n_q) {
            float s[G][BN / 8][4];
#pragma unroll
            for (int mr = 0; mr < G; mr++) zero(s[mr]);
            mma_a_bt<G, BN, HS, kLd>(s, qf, s_k(stage));

            // Element mask where the tile crosses a query's diagonal or holds a masked or missing key.
            if (k0 + BN - 1 > w0 + p.offset || bits != all_bits<BN>())
#pragma unroll
                for (int mr = 0; mr < G; mr++) mask_scores<BN>(s[mr], bits, w0 + 16 * mr + p.offset - k0);

            // Online softmax, per row (mr, hh) of this thread.
#pragma unroll
            for (int mr = 0; mr < G; mr++)
#pragma unroll
                for (int hh = 0; hh < 2; hh++) {
                    float tile_max = -INFINITY;
#pragma unroll
                    for (int n = 0; n < BN / 8; n++) tile_max = fmaxf(tile_max, fmaxf(s[mr][n][2 * hh], s[mr][n][2 * hh + 1]));
                    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
                    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
                    const float m_new = fmaxf(m[mr][hh], tile_max * p.scale_log2);
                    const float m_use = m_new == -INFINITY ? 0.0f : m_new;   // row has seen no visible key yet
                    const float alpha = exp2_approx(m[mr][hh] - m_use);      // 0 while m was -inf
                    m[mr][hh] = m_new;
                    float sum = 0.0f;
#pragma unroll
                    for (int n = 0; n < BN / 8; n++)
#pragma unroll
                        for (int e = 2 * hh; e < 2 * hh + 2; e++) {
                            const float prob = exp2_approx(fmaf(s[mr][n][e], p.scale_log2, -m_use));
                            s[mr][n][e] = prob;
                            sum += prob;
                        }
                    l[mr][hh] = l[mr][hh] * alpha + sum;
#pragma unroll
                    for (int n = 0; n < HS / 8; n++) {
                        o[mr][n][2 * hh] *= alpha;
                        o[mr][n][2 * hh + 1] *= alpha;
                    }
                }

            // O += P V, P's A fragments straight from the score registers.
            uint32_t pf[G][BN / 16][4];
#pragma unroll
            for (int mr = 0; mr < G; mr++) c_to_a<BN>(pf[mr], s[mr]);
            mma_a_b<G, HS, BN, kLd>(o, pf, s_v(stage));
        }
        __syncthreads();   // every warp is done with this stage before iteration kt + 1 refills it
    }

    // out_i = o_i / l_i, lse_i = ln2 (m_i + log2 l_i); a row that saw no key: out 0, lse 0.
#pragma unroll
    for (int mr = 0; mr < G; mr++)
#pragma unroll
        for (int hh = 0; hh < 2; hh++) {
            float sum = l[mr][hh];
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            const int i = w0 + 16 * mr + g + 8 * hh;
            if (i < p.n_q) {
                const bool seen = sum > 0.0f;
                store_row<HS>(p.out + seq * p.out_seq_stride + (size_t)i * p.out_row_stride + h * HS, o[mr], hh,
                              seen ? 1.0f / sum : 0.0f, seen);
                if (p.lse != nullptr && t == 0)
                    store_global_f32(p.lse + (size_t)head * p.n_q + i, seen ? kLn2 * (m[mr][hh] + log2f(sum)) : 0.0f);
            }
        }
}

// ================================================================================================================
// Backward.

template <int HS>
struct BackwardConfig {
    static constexpr int kBlock = kWarps * 16;                 // own rows per block: keys (dk/dv) or queries (dq)
    static constexpr int kTile = HS <= 64 ? 64 : 32;           // other-side rows per tile: queries (dk/dv) or keys (dq)
    // Whether the warp's own A fragments (its 16 rows of K and V in the dk/dv pass, of Q and dO in the dq pass) are
    // held in registers for the whole pass, or read from shared memory (ldmatrix) at every use.
    // Blocks per SM the register allocation must allow (168 registers for 3, 255 for 2). nvcc 13 at 3: dk/dv HS 32
    // 164 registers, HS 64 168 with 24 bytes of spill (loop-invariant pointers, ~5 LDL per query tile: cheap), HS 128
    // would spill 332 bytes, so 2; dq HS 32 139, HS 64 168 with 20 bytes of spill (the same kind), HS 128 168 without.
    // Without the cap: dk/dv 191 / 250 / 240, dq 150 / 195 / 198 (HS 32 / 64 / 128): 2 blocks per SM.
#if defined(FLASH2_DKDV_MIN_BLOCKS)
    static constexpr int kDkdvMinBlocks = FLASH2_DKDV_MIN_BLOCKS;
#else
    static constexpr int kDkdvMinBlocks = HS == 128 ? 2 : 3;
#endif
#if defined(FLASH2_DQ_MIN_BLOCKS)
    static constexpr int kDqMinBlocks = FLASH2_DQ_MIN_BLOCKS;
#else
    static constexpr int kDqMinBlocks = 3;
#endif
    // dk/dv at HS 64 and 3 blocks per SM: holding both K and V fragments spills ~130 bytes inside the loop; V read
    // at every use instead costs 4 more ldmatrix.x4 per query tile (+6% shared-memory reads) and leaves 6 reloads of
    // loop-invariant values per tile.
    static constexpr bool kDkdvKInRegisters = HS <= 64;
    static constexpr bool kDkdvVInRegisters = HS <= 32 || (HS == 64 && kDkdvMinBlocks < 3);
    static constexpr bool kDqFragsInRegisters = HS <= 64;
    static constexpr int kLd = Tile<HS>::kLd;
    // dk/dv pass: K, V (kBlock rows each), then stage s = 0, 1: Q, dO (kTile rows each), lse, δ (kTile floats each).
    static constexpr uint32_t kDkdvK = 0, kDkdvV = Tile<HS>::bytes(kBlock), kDkdvStage0 = 2 * Tile<HS>::bytes(kBlock);
    static constexpr uint32_t kDkdvStageBytes = 2 * Tile<HS>::bytes(kTile) + 2 * 4 * kTile;
    static constexpr uint32_t kDkdvSmemBytes = kDkdvStage0 + 2 * kDkdvStageBytes;
    // dq pass: Q, dO (kBlock rows each), then stage s = 0, 1: K, V (kTile rows each).
    static constexpr uint32_t kDqQ = 0, kDqDout = Tile<HS>::bytes(kBlock), kDqStage0 = 2 * Tile<HS>::bytes(kBlock);
    static constexpr uint32_t kDqStageBytes = 2 * Tile<HS>::bytes(kTile);
    static constexpr uint32_t kDqSmemBytes = kDqStage0 + 2 * kDqStageBytes;
};

// Training layouts: q, k, v, dq, dk, dv (nseq, NH, S, HS); dout (nseq, S, NH*HS); lse, delta (nseq, NH, S).
struct BackwardParams {
    bf16 *dq, *dk, *dv;
    const bf16 *dout, *q, *k, *v;
    const float *lse, *delta;
    const int* key_mask;        // (nseq, S); nullable (all visible)
    int S, NH;
    float scale, scale_log2;    // HS^-0.5 and HS^-0.5 · log2(e)
};

// δ_i = Σ_d dO_id · out_id over the merged layout (nseq, S, NH*HS): HS/8 threads per row (seq, i, h), each 8
// elements (one 16-byte vector of each), reduced by xor-shuffles within the group (fixed order: deterministic).
// Writes delta[(seq * NH + h) * S + i]. rows = nseq * S * NH.
template <int HS>
__device__ __forceinline__ void delta_thread(float* delta, const bf16* dout, const bf16* out, size_t rows, int S, int NH,
                                             size_t thread) {
    constexpr int kLanes = HS / 8;
    const size_t row = thread / kLanes;
    const int part = thread % kLanes;
    float sum = 0.0f;
    if (row < rows) {
        const uint4 a = load_global(reinterpret_cast<const uint4*>(dout + row * HS) + part);
        const uint4 b = load_global(reinterpret_cast<const uint4*>(out + row * HS) + part);
        const uint32_t aw[4] = {a.x, a.y, a.z, a.w}, bw[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
        for (int w = 0; w < 4; w++)
#pragma unroll
            for (int half = 0; half < 2; half++)   // element 2w + half: the low half first
                sum += bf16_bits_to_float(aw[w] >> (16 * half)) * bf16_bits_to_float(bw[w] >> (16 * half));
    }
#pragma unroll
    for (int offset = 1; offset < kLanes; offset *= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    if (row < rows && part == 0) {
        const int h = row % NH, i = (row / NH) % S;
        const size_t seq = row / ((size_t)NH * S);
        store_global_f32(delta + (seq * NH + h) * S + i, sum);
    }
}

// dk/dv pass, block (head, key tile of kBlock keys); warp w owns keys k0 + 16w .. k0 + 16w + 15.
template <int HS>
__device__ __forceinline__ void backward_dkdv_block(const BackwardParams& p, int head, int tile) {
    using C = BackwardConfig<HS>;
    using T = Tile<HS>;
    constexpr int BQ = C::kTile, kLd = C::kLd;
    static_assert(C::kBlock == 64, "the block's key visibility is one 64-bit word");
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const size_t seq = head / p.NH;
    const int h = head % p.NH, S = p.S;
    const int k0 = tile * C::kBlock, w0 = k0 + 16 * warp;
    const size_t head_offset = (size_t)head * S * HS;
    const bf16* q = p.q + head_offset;
    const bf16* k = p.k + head_offset;
    const bf16* v = p.v + head_offset;
    const bf16* dout = p.dout + (seq * S * p.NH + h) * HS;   // row i at + i * NH*HS
    const size_t dout_stride = (size_t)p.NH * HS;
    const float* lse = p.lse + (size_t)head * S;
    const float* delta = p.delta + (size_t)head * S;
    const int* mask = p.key_mask ? p.key_mask + seq * S : nullptr;
    const uint64_t block_bits = key_bits<64>(mask, k0, S);
    const uint32_t warp_bits = (uint32_t)(block_bits >> (16 * warp)) & 0xffffu;   // the warp's 16 keys

    unsigned char* smem_ptr = dynamic_smem();
    const uint32_t smem = smem_address(smem_ptr);
    const uint32_t s_k = smem + C::kDkdvK, s_v = smem + C::kDkdvV;
    // Stage layout: Q tile, dO tile, lse (BQ floats), δ (BQ floats).
    auto stage_offset = [&](int stage) { return C::kDkdvStage0 + stage * C::kDkdvStageBytes; };
    auto s_q = [&](int stage) { return smem + stage_offset(stage); };
    auto s_do = [&](int stage) { return s_q(stage) + T::bytes(BQ); };
    auto s_lse = [&](int stage) { return s_q(stage) + 2 * T::bytes(BQ); };
    auto lse_tile = [&](int stage) { return reinterpret_cast<const float*>(smem_ptr + stage_offset(stage) + 2 * T::bytes(BQ)); };

    float dk[1][HS / 8][4], dv[1][HS / 8][4];   // the warp's 16 rows (one row group)
    zero(dk[0]);
    zero(dv[0]);
    if (block_bits != 0) {   // block-uniform; otherwise every key of the block is masked and dk = dv = 0
        const int q_begin = k0 / BQ * BQ;                      // earlier queries see none of the block's keys
        const int n_tiles = (S - q_begin + BQ - 1) / BQ;       // >= 1: k0 < S
        auto load_query_tile = [&](int stage, int i0) {
            load_tile<HS, BQ>(s_q(stage), q, HS, i0, [&](int r) { return i0 + r < S; });
            load_tile<HS, BQ>(s_do(stage), dout, dout_stride, i0, [&](int r) { return i0 + r < S; });
            load_row_stats(s_lse(stage), s_lse(stage) + 4 * BQ, lse, delta, i0, BQ, S);
        };
        load_tile<HS, C::kBlock>(s_k, k, HS, k0, [&](int r) { return (block_bits >> r) & 1; });
        load_tile<HS, C::kBlock>(s_v, v, HS, k0, [&](int r) { return (block_bits >> r) & 1; });
        load_query_tile(0, q_begin);
        cp_async_commit();

        uint32_t kf[1][HS / 16][4], vf[1][HS / 16][4];   // used when held in registers
        for (int qt = 0; qt < n_tiles; qt++) {
            const int stage = qt % 2, i0 = q_begin + qt * BQ;
            if (qt + 1 < n_tiles) load_query_tile(1 - stage, i0 + BQ);   // the stage read in iteration qt - 1
            cp_async_commit();
            cp_async_wait<1>();
            __syncthreads();
            if (C::kDkdvKInRegisters && qt == 0) load_a<1, HS, kLd>(kf, s_k, 16 * warp);
            if (C::kDkdvVInRegisters && qt == 0) load_a<1, HS, kLd>(vf, s_v, 16 * warp);
            // Skip: the warp's keys all masked, or every query of the tile before every key of the warp.
            if (warp_bits != 0 && i0 + BQ - 1 >= w0) {
                float st[1][BQ / 8][4], dpt[1][BQ / 8][4];
                zero(st[0]);
                zero(dpt[0]);
                // S^T = K Q^T (16 keys x BQ queries), dP^T = V dO^T
                if constexpr (C::kDkdvKInRegisters) mma_a_bt<1, BQ, HS, kLd>(st, kf, s_q(stage));
                else mma_a_bt_smem_a<BQ, HS, kLd>(st, s_k, 16 * warp, s_q(stage));
                if constexpr (C::kDkdvVInRegisters) mma_a_bt<1, BQ, HS, kLd>(dpt, vf, s_do(stage));
                else mma_a_bt_smem_a<BQ, HS, kLd>(dpt, s_v, 16 * warp, s_do(stage));
                // P^T = 2^(S^T c - lse_i log2e), dS^T = P^T (dP^T - δ_i); element (key w0 + g + 8(e/2), query i0 + c).
                // Masked keys need no mask here: their rows of P^T, dS^T only reach their own dK, dV rows (zeroed).
                const float* lse_s = lse_tile(stage);
                const float* delta_s = lse_s + BQ;
                // Causal mask where the tile crosses the diagonal (query i0 + c sees key j iff j <= i0 + c, i.e.
                // c >= j - i0), and queries past S; done on S^T, so that P^T = 2^-inf = 0 there.
                if (i0 < w0 + 15 || i0 + BQ > S) {
#pragma unroll
                    for (int hh = 0; hh < 2; hh++) {
                        const int low = w0 + g + 8 * hh - i0 - 2 * t, high = S - i0 - 2 * t;   // visible: low <= c' < high
#pragma unroll
                        for (int n = 0; n < BQ / 8; n++)
#pragma unroll
                            for (int odd = 0; odd < 2; odd++) {
                                const int c = 8 * n + odd;
                                if (c < low || c >= high) st[0][n][2 * hh + odd] = -INFINITY;
                            }
                    }
                }
#pragma unroll
                for (int n = 0; n < BQ / 8; n++) {
                    const int c = 8 * n + 2 * t;
                    const float2 lse_pair = *reinterpret_cast<const float2*>(lse_s + c);
                    const float2 delta_pair = *reinterpret_cast<const float2*>(delta_s + c);
                    const float neg_lse2[2] = {-lse_pair.x * kLog2e, -lse_pair.y * kLog2e};
                    const float dl[2] = {delta_pair.x, delta_pair.y};
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const float prob = exp2_approx(fmaf(st[0][n][e], p.scale_log2, neg_lse2[e % 2]));
                        dpt[0][n][e] = prob * (dpt[0][n][e] - dl[e % 2]);
                        st[0][n][e] = prob;
                    }
                }
                uint32_t pf[1][BQ / 16][4], dsf[1][BQ / 16][4];
                c_to_a<BQ>(pf[0], st[0]);
                c_to_a<BQ>(dsf[0], dpt[0]);
                mma_a_b<1, HS, BQ, kLd>(dv, pf, s_do(stage));     // dV += P^T dO
                mma_a_b<1, HS, BQ, kLd>(dk, dsf, s_q(stage));     // dK += dS^T Q
            }
            __syncthreads();   // every warp is done with this stage before iteration qt + 1 refills it
        }
    }
    // dk = scale · dK, dv = dV for the warp's keys below S; a masked key gets zeros.
#pragma unroll
    for (int hh = 0; hh < 2; hh++) {
        const int r = g + 8 * hh, j = w0 + r;
        if (j < S) {
            const bool visible = (warp_bits >> r) & 1;
            store_row<HS>(p.dk + head_offset + (size_t)j * HS, dk[0], hh, p.scale, visible);
            store_row<HS>(p.dv + head_offset + (size_t)j * HS, dv[0], hh, 1.0f, visible);
        }
    }
}

// dq pass, block (head, query tile of kBlock queries); warp w owns queries q0 + 16w .. q0 + 16w + 15.
template <int HS>
__device__ __forceinline__ void backward_dq_block(const BackwardParams& p, int head, int tile) {
    using C = BackwardConfig<HS>;
    using T = Tile<HS>;
    constexpr int BK = C::kTile, kLd = C::kLd;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4;
    const size_t seq = head / p.NH;
    const int h = head % p.NH, S = p.S;
    const int q0 = tile * C::kBlock, w0 = q0 + 16 * warp;
    const size_t head_offset = (size_t)head * S * HS;
    const bf16* q = p.q + head_offset;
    const bf16* k = p.k + head_offset;
    const bf16* v = p.v + head_offset;
    const bf16* dout = p.dout + (seq * S * p.NH + h) * HS;
    const int* mask = p.key_mask ? p.key_mask + seq * S : nullptr;
    const int key_end = imin(q0 + C::kBlock, S);               // keys past the block's last query: invisible
    const int n_tiles = (key_end + BK - 1) / BK;

    const uint32_t smem = smem_address(dynamic_smem());
    const uint32_t s_q = smem + C::kDqQ, s_do = smem + C::kDqDout;
    auto s_k = [&](int stage) { return smem + C::kDqStage0 + stage * C::kDqStageBytes; };
    auto s_v = [&](int stage) { return s_k(stage) + T::bytes(BK); };

    load_tile<HS, C::kBlock>(s_q, q, HS, q0, [&](int r) { return q0 + r < S; });
    load_tile<HS, C::kBlock>(s_do, dout, (size_t)p.NH * HS, q0, [&](int r) { return q0 + r < S; });
    uint64_t bits_next = key_bits<BK>(mask, 0, S);
    load_tile<HS, BK>(s_k(0), k, HS, 0, [&](int r) { return (bits_next >> r) & 1; });
    load_tile<HS, BK>(s_v(0), v, HS, 0, [&](int r) { return (bits_next >> r) & 1; });
    cp_async_commit();

    // Row statistics of this thread's rows w0 + g + 8hh, in the log2 domain.
    float neg_lse2[2], dl[2];
#pragma unroll
    for (int hh = 0; hh < 2; hh++) {
        const int i = w0 + g + 8 * hh;
        neg_lse2[hh] = i < S ? -load_global(p.lse + (size_t)head * S + i) * kLog2e : 0.0f;
        dl[hh] = i < S ? load_global(p.delta + (size_t)head * S + i) : 0.0f;
    }
    float dq[1][HS / 8][4];
    zero(dq[0]);
    uint32_t qf[1][HS / 16][4], of[1][HS / 16][4];   // used when kDqFragsInRegisters

    for (int kt = 0; kt < n_tiles; kt++) {
        const int stage = kt % 2, j0 = kt * BK;
        const uint64_t bits = bits_next;
        if (kt + 1 < n_tiles) {
            bits_next = key_bits<BK>(mask, j0 + BK, S);
            load_tile<HS, BK>(s_k(1 - stage), k, HS, j0 + BK, [&](int r) { return (bits_next >> r) & 1; });
            load_tile<HS, BK>(s_v(1 - stage), v, HS, j0 + BK, [&](int r) { return (bits_next >> r) & 1; });
        }
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        if (C::kDqFragsInRegisters && kt == 0) {
            load_a<1, HS, kLd>(qf, s_q, 16 * warp);
            load_a<1, HS, kLd>(of, s_do, 16 * warp);
        }
        // Skip: no visible key, every key after every query of the warp, or no real query in the warp.
        if (bits != 0 && j0 <= w0 + 15 && w0 < S) {
            float s[1][BK / 8][4], dp[1][BK / 8][4];
            zero(s[0]);
            zero(dp[0]);
            if constexpr (C::kDqFragsInRegisters) {
                mma_a_bt<1, BK, HS, kLd>(s, qf, s_k(stage));     // S = Q K^T (16 queries x BK keys)
                mma_a_bt<1, BK, HS, kLd>(dp, of, s_v(stage));    // dP = dO V^T
            } else {
                mma_a_bt_smem_a<BK, HS, kLd>(s, s_q, 16 * warp, s_k(stage));
                mma_a_bt_smem_a<BK, HS, kLd>(dp, s_do, 16 * warp, s_v(stage));
            }
            // P = 2^(S c - lse_i log2e) where visible, dS = P (dP - δ_i); element (query w0 + g + 8(e/2), key j0 + c).
            if (j0 + BK - 1 > w0 || bits != all_bits<BK>()) mask_scores<BK>(s[0], bits, w0 - j0);
#pragma unroll
            for (int n = 0; n < BK / 8; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const float prob = exp2_approx(fmaf(s[0][n][e], p.scale_log2, neg_lse2[e / 2]));
                    s[0][n][e] = prob * (dp[0][n][e] - dl[e / 2]);
                }
            uint32_t dsf[1][BK / 16][4];
            c_to_a<BK>(dsf[0], s[0]);
            mma_a_b<1, HS, BK, kLd>(dq, dsf, s_k(stage));         // dQ += dS K
        }
        __syncthreads();
    }
#pragma unroll
    for (int hh = 0; hh < 2; hh++) {
        const int i = w0 + g + 8 * hh;
        if (i < S) store_row<HS>(p.dq + head_offset + (size_t)i * HS, dq[0], hh, p.scale, true);
    }
}

// ================================================================================================================
// Launch geometry and parameters, shared by the CUDA launchers and the emulator.

// Training forward: q, k, v (nseq, NH, S, HS), out (nseq, S, NH*HS), lse (nseq, NH, S), key_mask (nseq, S).
template <int HS>
inline ForwardParams training_forward_params(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v,
                                             const int* key_mask, int S, int NH) {
    ForwardParams p{};
    p.out = out;
    p.lse = lse;
    p.q = q;
    p.k = k;
    p.v = v;
    p.key_mask = key_mask;
    p.q_seq_stride = p.kv_seq_stride = (size_t)NH * S * HS;
    p.q_head_stride = p.kv_head_stride = (size_t)S * HS;
    p.q_row_stride = HS;
    p.out_seq_stride = (size_t)S * NH * HS;
    p.out_row_stride = NH * HS;
    p.mask_seq_stride = S;
    p.NH = NH;
    p.n_q = S;
    p.kv_len = S;
    p.offset = 0;
    p.scale_log2 = kLog2e / std::sqrt((float)HS);
    return p;
}

// Cached prefill: q, out (nseq, S_new, NH*HS); k_cache, v_cache (nseq, NH, capacity, HS); key_mask (nseq, capacity)
// or null; query i at cache position p0 + i (p0 + S_new <= capacity).
template <int HS>
inline ForwardParams cached_prefill_params(bf16* out, const bf16* q, const bf16* k_cache, const bf16* v_cache,
                                           const int* key_mask, int p0, int S_new, int NH, int capacity) {
    ForwardParams p{};
    p.out = out;
    p.lse = nullptr;
    p.q = q;
    p.k = k_cache;
    p.v = v_cache;
    p.key_mask = key_mask;
    p.q_seq_stride = (size_t)S_new * NH * HS;
    p.q_head_stride = HS;
    p.q_row_stride = NH * HS;
    p.kv_seq_stride = (size_t)NH * capacity * HS;
    p.kv_head_stride = (size_t)capacity * HS;
    p.out_seq_stride = (size_t)S_new * NH * HS;
    p.out_row_stride = NH * HS;
    p.mask_seq_stride = capacity;
    p.NH = NH;
    p.n_q = S_new;
    p.kv_len = p0 + S_new;
    p.offset = p0;
    p.scale_log2 = kLog2e / std::sqrt((float)HS);
    return p;
}

template <int HS>
inline BackwardParams backward_params(bf16* dq, bf16* dk, bf16* dv, const bf16* dout, const bf16* q, const bf16* k,
                                      const bf16* v, const float* lse, const float* delta, const int* key_mask, int S,
                                      int NH) {
    BackwardParams p{};
    p.dq = dq;
    p.dk = dk;
    p.dv = dv;
    p.dout = dout;
    p.q = q;
    p.k = k;
    p.v = v;
    p.lse = lse;
    p.delta = delta;
    p.key_mask = key_mask;
    p.S = S;
    p.NH = NH;
    p.scale = 1.0f / std::sqrt((float)HS);
    p.scale_log2 = kLog2e / std::sqrt((float)HS);
    return p;
}

template <int HS> inline int forward_tiles(int n_q) { return (n_q + ForwardConfig<HS>::kBlockM - 1) / ForwardConfig<HS>::kBlockM; }
template <int HS> inline int backward_tiles(int S) { return (S + BackwardConfig<HS>::kBlock - 1) / BackwardConfig<HS>::kBlock; }
template <int HS> inline size_t delta_threads(size_t rows) { return rows * (HS / 8); }

// Grid order: blockIdx.x = head (up to 2^31 - 1), blockIdx.y = tile, the tiles with the most work first (the last
// query tiles in the forward and the dq pass, the first key tiles in the dk/dv pass), so the long blocks start in
// the first wave and the short ones fill the tail.
__host__ __device__ inline int longest_first(int y, int tiles) { return tiles - 1 - y; }

#if !defined(FLASH2_EMULATE)
// ================================================================================================================
// Kernels (BF16 build) and launchers.

template <int HS>
__global__ void __launch_bounds__(kThreads, ForwardConfig<HS>::kMinBlocks) forward_kernel(const ForwardParams p) {
    forward_block<HS>(p, blockIdx.x, longest_first(blockIdx.y, gridDim.y));
}
template <int HS>
__global__ void __launch_bounds__(kThreads, BackwardConfig<HS>::kDkdvMinBlocks) backward_dkdv_kernel(const BackwardParams p) {
    backward_dkdv_block<HS>(p, blockIdx.x, blockIdx.y);
}
template <int HS>
__global__ void __launch_bounds__(kThreads, BackwardConfig<HS>::kDqMinBlocks) backward_dq_kernel(const BackwardParams p) {
    backward_dq_block<HS>(p, blockIdx.x, longest_first(blockIdx.y, gridDim.y));
}
template <int HS>
__global__ void __launch_bounds__(256) delta_kernel(float* delta, const bf16* dout, const bf16* out, size_t rows, int S, int NH) {
    delta_thread<HS>(delta, dout, out, rows, S, NH, blockIdx.x * (size_t)blockDim.x + threadIdx.x);
}
#endif

}  // namespace flash2

#if !defined(FLASH2_EMULATE)
// ================================================================================================================
// Public API.

inline void check_flash2_args(const char* who, int nseq, int n_q, int NH, int HS, int tiles,
                              std::initializer_list<const void*> tensors) {
    if (HS != 32 && HS != 64 && HS != 128)
        throw std::runtime_error(std::string(who) + ": head size " + std::to_string(HS) + " not in {32, 64, 128}");
    if (n_q < 1) throw std::runtime_error(std::string(who) + ": sequence length must be at least 1");
    if (nseq < 0 || NH < 1 || (size_t)nseq * NH > 0x7fffffffull) throw std::runtime_error(std::string(who) + ": bad nseq or NH for one grid");
    if (tiles > 65535) throw std::runtime_error(std::string(who) + ": sequence too long for one grid");
    for (const void* p : tensors)
        if (reinterpret_cast<uintptr_t>(p) % 16 != 0)
            throw std::runtime_error(std::string(who) + ": tensors must be 16-byte aligned");
}

#if defined(BLOCKTF_PRECISION_BF16)
namespace flash2 {
// Dynamic shared memory above 48 KB, and the largest shared-memory carveout, so that kMinBlocks blocks fit per SM.
template <typename Kernel>
inline void prepare_kernel(Kernel* kernel, size_t smem, const char* who) {
    allow_dynamic_smem(kernel, smem, who);
    cudaCheck(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, (int)cudaSharedmemCarveoutMaxShared));
}

template <int HS>
inline void launch_forward(const ForwardParams& p, int nseq, cudaStream_t stream) {
    constexpr uint32_t smem = ForwardConfig<HS>::kSmemBytes;
    prepare_kernel(forward_kernel<HS>, smem, "flash2 forward");
    const dim3 grid((unsigned)(nseq * p.NH), (unsigned)forward_tiles<HS>(p.n_q));
    forward_kernel<HS><<<grid, kThreads, smem, stream>>>(p);
    cudaCheckLaunch();
}

template <int HS>
inline void launch_backward(const BackwardParams& p, const bf16* out, float* delta, int nseq, cudaStream_t stream) {
    using C = BackwardConfig<HS>;
    const size_t rows = (size_t)nseq * p.S * p.NH;
    const size_t threads = delta_threads<HS>(rows);
    if ((threads + 255) / 256 > 0x7fffffffull) throw std::runtime_error("flash2 backward: too many rows for one grid");
    delta_kernel<HS><<<(unsigned)((threads + 255) / 256), 256, 0, stream>>>(delta, p.dout, out, rows, p.S, p.NH);
    cudaCheckLaunch();
    const dim3 grid((unsigned)(nseq * p.NH), (unsigned)backward_tiles<HS>(p.S));
    prepare_kernel(backward_dkdv_kernel<HS>, C::kDkdvSmemBytes, "flash2 backward (dk, dv)");
    prepare_kernel(backward_dq_kernel<HS>, C::kDqSmemBytes, "flash2 backward (dq)");
    backward_dkdv_kernel<HS><<<grid, kThreads, C::kDkdvSmemBytes, stream>>>(p);
    cudaCheckLaunch();
    backward_dq_kernel<HS><<<grid, kThreads, C::kDqSmemBytes, stream>>>(p);
    cudaCheckLaunch();
}
}  // namespace flash2
#endif

// q, k, v: (nseq, NH, S, HS), HS in {32, 64, 128}, k rotated   key_mask: (nseq, S)   out: (nseq, S, NH*HS)
// lse: (nseq, NH, S) fp32, written for the backward (0 for a query that sees no key). Tensors 16-byte aligned.
inline void flash2_attention_forward(floatX* out, float* lse, const floatX* q, const floatX* k, const floatX* v,
                                     const int* key_mask, int nseq, int S, int NH, int HS, cudaStream_t stream) {
#if defined(BLOCKTF_PRECISION_BF16)
    using namespace flash2;
    const int block_m = HS == 128 ? ForwardConfig<128>::kBlockM : ForwardConfig<64>::kBlockM;
    check_flash2_args("flash2_attention_forward", nseq, S, NH, HS, S < 1 ? 0 : (S + block_m - 1) / block_m, {out, q, k, v});
    if (nseq == 0) return;
    switch (HS) {
        case 32: launch_forward<32>(training_forward_params<32>(out, lse, q, k, v, key_mask, S, NH), nseq, stream); break;
        case 64: launch_forward<64>(training_forward_params<64>(out, lse, q, k, v, key_mask, S, NH), nseq, stream); break;
        case 128: launch_forward<128>(training_forward_params<128>(out, lse, q, k, v, key_mask, S, NH), nseq, stream); break;
        default: break;   // rejected above
    }
#else
    flash_attention_forward(out, lse, q, k, v, key_mask, nseq, S, NH, HS, stream);
#endif
}

// dout: (nseq, S, NH*HS); out, lse: what flash2_attention_forward wrote for these q, k, v -> dq, dk, dv:
// (nseq, NH, S, HS), written, deterministic. delta: scratch of (nseq, NH, S) fp32.
inline void flash2_attention_backward(floatX* dq, floatX* dk, floatX* dv, const floatX* dout, const floatX* out,
                                      const float* lse, const floatX* q, const floatX* k, const floatX* v,
                                      const int* key_mask, float* delta, int nseq, int S, int NH, int HS,
                                      cudaStream_t stream) {
#if defined(BLOCKTF_PRECISION_BF16)
    using namespace flash2;
    check_flash2_args("flash2_attention_backward", nseq, S, NH, HS, S < 1 ? 0 : (S + 63) / 64,
                      {dq, dk, dv, dout, out, q, k, v});
    if (nseq == 0) return;
    switch (HS) {
        case 32: launch_backward<32>(backward_params<32>(dq, dk, dv, dout, q, k, v, lse, delta, key_mask, S, NH), out, delta, nseq, stream); break;
        case 64: launch_backward<64>(backward_params<64>(dq, dk, dv, dout, q, k, v, lse, delta, key_mask, S, NH), out, delta, nseq, stream); break;
        case 128: launch_backward<128>(backward_params<128>(dq, dk, dv, dout, q, k, v, lse, delta, key_mask, S, NH), out, delta, nseq, stream); break;
        default: break;
    }
#else
    flash_attention_backward(dq, dk, dv, dout, out, lse, q, k, v, key_mask, delta, nseq, S, NH, HS, stream);
#endif
}

// Prefill of generation: new queries q (nseq, S_new, NH*HS) (heads merged, rotated) at cache positions p0 .. p0 +
// S_new - 1 over k_cache, v_cache (nseq, NH, capacity, HS) (the new keys and values already appended); query i sees
// cached positions j <= p0 + i with key_mask[seq * capacity + j] = 1 (key_mask null: all visible). out: (nseq, S_new,
// NH*HS). Needs p0 >= 0, p0 + S_new <= capacity. The semantics of blocktf's attention_cached(dyn_pos = null,
// pos_offset = p0), which the FP32 build calls.
inline void flash2_attention_cached_prefill(floatX* out, const floatX* q, const floatX* k_cache, const floatX* v_cache,
                                            const int* key_mask, int p0, int nseq, int S_new, int NH, int HS,
                                            int capacity, cudaStream_t stream) {
    if (p0 < 0 || S_new < 1 || p0 + (long long)S_new > capacity)
        throw std::runtime_error("flash2_attention_cached_prefill: needs p0 >= 0, S_new >= 1 and p0 + S_new <= capacity");
#if defined(BLOCKTF_PRECISION_BF16)
    using namespace flash2;
    const int block_m = HS == 128 ? ForwardConfig<128>::kBlockM : ForwardConfig<64>::kBlockM;
    check_flash2_args("flash2_attention_cached_prefill", nseq, S_new, NH, HS, (S_new + block_m - 1) / block_m,
                      {out, q, k_cache, v_cache});
    if (nseq == 0) return;
    switch (HS) {
        case 32: launch_forward<32>(cached_prefill_params<32>(out, q, k_cache, v_cache, key_mask, p0, S_new, NH, capacity), nseq, stream); break;
        case 64: launch_forward<64>(cached_prefill_params<64>(out, q, k_cache, v_cache, key_mask, p0, S_new, NH, capacity), nseq, stream); break;
        case 128: launch_forward<128>(cached_prefill_params<128>(out, q, k_cache, v_cache, key_mask, p0, S_new, NH, capacity), nseq, stream); break;
        default: break;
    }
#else
    if (nseq == 0) return;
    attention_cached(out, q, k_cache, v_cache, key_mask, nullptr, p0, nseq, S_new, NH, HS, capacity, stream);
#endif
}
#endif  // !FLASH2_EMULATE

}  // namespace
