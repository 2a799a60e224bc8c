// Fused causal flash attention, forward and backward (FlashAttention-2), on tensor cores.
//
//   out = softmax(q @ k^T * scale [+ causal mask]) @ v        q, out: (B, H, S, D)
//   lse = log(sum_j exp(q_i . k_j * scale))                   k, v: (B, Hkv, S, D)
//                                                             lse: (B, H, S) float32, natural log
//
// GROUPED-QUERY ATTENTION (GQA/MQA): H is a multiple of Hkv and query head h reads key/value
// head h / (H / Hkv) (the group_size = H / Hkv query heads of a group share one K/V head;
// Hkv == H is ordinary multi-head attention). The forward and dQ kernels only pick the K/V
// head. The dK/dV kernel runs per key/value head and streams the query tiles of every
// query head of its group, head by head in a fixed order, into the same registers: the
// group sum of dK, dV needs no atomics and is bitwise the same on every run. Sequence
// lengths of q and k must be equal here (the Triton kernels also take Sq < Sk).
//
// Why it is fast: the (S x S) score matrix never touches device memory. A block of warps
// owns a tile of query rows; key/value tiles stream through shared memory (cp.async,
// double-buffered, so the copy of tile j+1 overlaps the math on tile j); both matmuls run
// on tensor cores (mma.sync m16n8k16, fp32 accumulate); the softmax is computed online
// (running row max and row sum, rescaling the output accumulator), entirely in registers.
// The probabilities P never leave registers either: the fp32 accumulator fragments of
// S = Q K^T have exactly the layout of the A operand of P @ V once packed to 16 bits (the
// "FA2 register trick", see FRAGMENTS below). Causal: each query tile visits only the key
// tiles up to its diagonal (about half the work) and masks only the tiles that straddle
// the diagonal or the ragged end of the sequence. The grid launches the longest causal
// query tiles first, so short tiles fill the tail of the wave.
//
// FORWARD, per block (one query tile of BLOCK_M rows of one (batch, head); K, V of its kv head):
//   Q tile -> shared (cp.async) -> registers as mma A fragments (loaded once, ldmatrix)
//   for each key tile j (BLOCK_N keys, up to the diagonal when causal):
//     S   = Q K_j^T                       (per warp 16 x BLOCK_N, fp32 registers)
//     S  *= scale * log2(e)               (one multiply; the softmax then uses exp2)
//     m'  = max(m, rowmax S);  P = exp2(S - m');  l = l * exp2(m - m') + rowsum P
//     O   = O * exp2(m - m') + P V_j      (P packed to bf16/fp16 in registers)
//   out = O / l;  lse = (m + log2 l) * ln 2
//
// BACKWARD (three kernels; deterministic: no atomics, every output written once):
//   1. delta = rowsum(dO * O)                                         (B, H, S) fp32
//   2. dQ kernel, per query tile (same loop as the forward):           dQ in registers
//        P = exp2(S * scale*log2e - lse*log2e),  dP = dO V^T,  dS = P * (dP - delta)
//        dQ += dS K;          finally dQ *= scale
//   3. dK/dV kernel, per key tile of one (batch, kv head), looping over the query tiles
//      that see it in each query head of the group (group_size x tiles steps), computing
//      the transposed problem so that each warp owns 16 keys and everything stays in
//      registers exactly as in the forward:
//        S^T = K Q^T,  P^T = exp2(S^T * scale*log2e - lse*log2e),  dP^T = V dO^T,
//        dV += P^T dO,  dS^T = P^T * (dP^T - delta),  dK += dS^T Q;   finally dK *= scale
//   This recomputes S and dP in both kernels (7 matmuls instead of FA2's 5), the price of
//   having no atomicAdd into an fp32 dQ buffer: results are bitwise reproducible, no
//   extra (B, H, S, D) fp32 buffer or conversion kernel is needed, and every kernel has
//   the same simple structure (which matters here: this code was written without a GPU).
//
// TILES (threads = 32 * warps; each warp owns 16 rows of the block's tile; shared-memory
// rows are padded from D to D + 8 elements, see BANKS). Registers per thread as reported by
// ptxas (-Xptxas -v, sm_90a, nvcc 13.0); an SM has 64K registers and 228 KB shared memory.
//   forward   D=64:  BLOCK_M=128 (8 warps), BLOCK_N=64, live: Q 16 + O 32 + S 32 + P 16
//                    smem (128 + 2 stages * 2 * 64 rows) * 72 * 2 B = 55,296 B
//                    __launch_bounds__(256, 2): 128 registers (16 B spilled: loop-invariant
//                    addresses, 6 L1-resident reloads per key tile) -> 2 blocks = 16 warps/SM
//             D=128: BLOCK_M=128 (8 warps), BLOCK_N=64, live: Q 32 + O 64 + S 32 + P 16
//                    smem (128 + 2*2*64) * 136 * 2 B = 104,448 B; 215 registers, no spills
//                    -> 1 block = 8 warps/SM (register-bound)
//   dQ        BLOCK_M=64 (4 warps), BLOCK_N=64. Q and dO stay in shared memory and are
//             re-read as A fragments per key tile (in registers they would not fit beside
//             dQ 64 + S 32 + dP 32 at D=128). smem (2*64 + 2*2*64) * (D+8) * 2 B =
//             55,296 B (D=64, 168 registers) / 104,448 B (D=128, 240 registers), no spills
//   dK/dV     BLOCK_N=64 keys (4 warps); query tiles of BLOCK_M=64 (D=64) or 32 (D=128):
//             the dK + dV accumulators alone take D/2 registers per thread (64 at D=128),
//             so the transient S^T, dP^T tiles are kept small at D=128.
//             smem (2*64 + 2*2*BLOCK_M) * (D+8) * 2 B + 2*2*BLOCK_M*4 B (lse, delta) =
//             56,320 B (D=64) / 70,144 B (D=128).
//             D=64: __launch_bounds__(128, 3): 168 registers (12 B spilled: loop-invariant
//             values of the GQA head/tile walk, 3 L1-resident reloads per query tile) ->
//             3 blocks = 12 warps/SM. D=128: 246 registers, no spills -> 8 warps/SM.
//
// FRAGMENTS of mma.sync.aligned.m16n8k16 (PTX ISA, "Matrix Fragments for mma.m16n8k16
// with floating point type"). lane = 0..31, group = lane / 4 (0..7), quad = lane % 4.
// A register of 16-bit pairs holds the element with the smaller column (or row, for B)
// index in its low half.
//   A (16 x 16, row-major, 4 x .b32 per thread, 2 elements each):
//     a0: (row group,     cols 2*quad, 2*quad+1)     a2: (row group,     cols 8+2*quad, +1)
//     a1: (row group + 8, cols 2*quad, 2*quad+1)     a3: (row group + 8, cols 8+2*quad, +1)
//   B (16 x 8, "col": k-major per column, 2 x .b32 per thread):
//     b0: (rows k = 2*quad, 2*quad+1,     col n = group)
//     b1: (rows k = 8+2*quad, 8+2*quad+1, col n = group)
//   C/D (16 x 8, fp32, 4 floats per thread):
//     c0, c1: (row group,     cols 2*quad, 2*quad+1)
//     c2, c3: (row group + 8, cols 2*quad, 2*quad+1)
//   Consequences used below:
//   - A row of a C tile lives in the 4 lanes of one quad: row reductions are two
//     __shfl_xor_sync (offsets 1 and 2). Per thread, c0/c1 belong to "row 0" = group and
//     c2/c3 to "row 1" = group + 8: element i of a C fragment is in row (i >> 1).
//   - Two neighbouring C tiles (cols 0-7 = tile 2t, cols 8-15 = tile 2t+1) packed to
//     16 bits ARE the A fragment of the 16 x 16 block: a0 = (c[2t][0], c[2t][1]),
//     a1 = (c[2t][2], c[2t][3]), a2 = (c[2t+1][0], c[2t+1][1]), a3 = (c[2t+1][2], c[2t+1][3]).
//   ldmatrix.m8n8.x4 loads four 8x8 matrices of 16-bit elements; lanes 8i..8i+7 give the
//   addresses of the 8 rows (16 bytes each) of matrix i, and register i of every lane
//   receives matrix i. Without .trans lane gets (row group, cols 2*quad, 2*quad+1) of each
//   matrix; with .trans it gets (rows 2*quad, 2*quad+1, col group). Hence:
//   - A from a row-major tile: matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7),
//     (rows 0-7, k 8-15), (rows 8-15, k 8-15) -> a0..a3, no .trans.
//     Lane address: row = lane % 8 + 8 * (lane / 8 % 2), col = 8 * (lane / 16).
//   - B from a tile stored n-major, B[k][n] = T[n][k] (K for S = Q K^T): matrices
//     (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15) -> (b0, b1) of
//     n-tile 0 and (b0, b1) of n-tile 1, no .trans.
//     Lane address: row = lane % 8 + 8 * (lane / 16), col = 8 * (lane / 8 % 2).
//   - B from a tile stored k-major, B[k][n] = T[k][n] (V for O = P V): matrices
//     (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15) with .trans ->
//     (b0, b1) of n-tile 0 and (b0, b1) of n-tile 1.
//     Lane address: row = lane % 8 + 8 * (lane / 8 % 2), col = 8 * (lane / 16).
//
// BANKS: ldmatrix reads 8 rows of 16 bytes per matrix. With an unpadded pitch of 128 or
// 256 bytes those 8 rows start in the same bank (8-way conflict); padding every row by
// 8 elements (16 bytes) shifts consecutive rows by 4 banks, so the 8 rows of one matrix
// cover all 32 banks exactly once. The pad keeps every row 16-byte aligned for cp.async.
//
// MASKING and -inf: masked scores are -inf. A row whose running max is still -inf (every
// key seen so far masked) uses 0 as the subtrahend, so exp2(-inf - 0) = 0 and never
// (-inf) - (-inf) = NaN. A row that stays fully masked (impossible with Sq == Sk, where
// query i always sees key 0) gets out = 0 and lse = +inf, which makes the backward's
// exp2(S - lse) = 0. Rows and keys past the sequence end are loaded as zeros (cp.async
// zero-fill), masked in the softmax (keys) and never stored (rows); in the backward,
// padded query rows get lse = +inf and delta = 0, so their P and dS are exactly 0.
//
// LAYOUT: inputs (B, H, S, D) with any batch/head/seq strides (e.g. a transposed
// (B, S, H, D) projection); the last dim must be contiguous and rows 16-byte aligned,
// otherwise the host makes a contiguous copy (see kernel_operand). Outputs are contiguous.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <limits>
#include <tuple>

#include "vector_io.cuh"

namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr unsigned kFullMask = 0xffffffffu;

// ------------------------------------------------------------------ PTX primitives

__device__ __forceinline__ uint32_t shared_address(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

// Copies 16 bytes global -> shared without staging in registers; with in_bounds false it
// reads nothing and writes 16 zero bytes (the src-size operand is 0).
__device__ __forceinline__ void cp_async_16(void* shared_dst, const void* global_src, bool in_bounds) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(shared_dst)),
               "l"(global_src), "r"(in_bounds ? 16 : 0)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most `kPending` of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row_address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row_address))
               : "memory");
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row_address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row_address))
               : "memory");
}

// 2^x on the special-function unit (one MUFU.EX2; exp2f adds three instructions of
// denormal handling around it). ftz flushes results below 2^-126 to zero: such a
// probability is negligible next to the row's largest, which is about 1.
// exp2(-inf) = +0, which the masking relies on.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// The element type decides the mma variant and the 16-bit packing.
template <typename T>
struct Element;

template <>
struct Element<__nv_bfloat16> {
  // c (16 x 8 fp32) += a (16 x 16) * b (16 x 8)
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  // (lo, hi) -> one register, lo in the low 16 bits
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 pair = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&pair);
  }
};

template <>
struct Element<__half> {
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 pair = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&pair);
  }
};

// ------------------------------------------------------------ warp-level tile math
// Shared-memory tiles are row-major with a pitch of kPitch = D + 8 elements (see BANKS).
// "A (16 x 16*KS)" = uint32_t[KS][4] A fragments; "C (16 x 8*NT)" = float[NT][4].

// A fragments of the 16 x 16*KS row-major tile starting at `tile`.
template <int KS, int kPitch, typename T>
__device__ __forceinline__ void load_a_fragments(uint32_t (&a)[KS][4], const T* tile, int lane) {
  const int row = lane % 8 + 8 * (lane / 8 % 2);
  const int col = 8 * (lane / 16);
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) ldmatrix_x4(a[ks], tile + row * kPitch + ks * 16 + col);
}

// c (16 x 8*NT) += a (16 x 16*KS) * B, with B[k][n] = bt[n][k]: `bt` is the (8*NT x 16*KS)
// tile stored n-major (keys as rows for S = Q K^T).
template <int KS, int NT, int kPitch, typename T>
__device__ __forceinline__ void warp_mma_b_n_major(float (&c)[NT][4], const uint32_t (&a)[KS][4], const T* bt,
                                                   int lane) {
  static_assert(NT % 2 == 0, "ldmatrix.x4 feeds two n-tiles at a time");
  const int row = lane % 8 + 8 * (lane / 16);
  const int col = 8 * (lane / 8 % 2);
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      uint32_t b[4];  // (b0, b1) of n-tile 2*np, then of n-tile 2*np + 1
      ldmatrix_x4(b, bt + (np * 16 + row) * kPitch + ks * 16 + col);
      Element<T>::mma(c[2 * np], a[ks], b[0], b[1]);
      Element<T>::mma(c[2 * np + 1], a[ks], b[2], b[3]);
    }
  }
}

// c (16 x 8*NT) += a (16 x 16*KS) * B, with B[k][n] = b[k][n]: `b` is the (16*KS x 8*NT)
// tile stored k-major (keys as rows for O = P V), transposed by ldmatrix.trans.
template <int KS, int NT, int kPitch, typename T>
__device__ __forceinline__ void warp_mma_b_k_major(float (&c)[NT][4], const uint32_t (&a)[KS][4], const T* b,
                                                   int lane) {
  static_assert(NT % 2 == 0, "ldmatrix.x4 feeds two n-tiles at a time");
  const int row = lane % 8 + 8 * (lane / 8 % 2);
  const int col = 8 * (lane / 16);
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      uint32_t frag[4];  // (b0, b1) of n-tile 2*np, then of n-tile 2*np + 1
      ldmatrix_x4_trans(frag, b + (ks * 16 + row) * kPitch + np * 16 + col);
      Element<T>::mma(c[2 * np], a[ks], frag[0], frag[1]);
      Element<T>::mma(c[2 * np + 1], a[ks], frag[2], frag[3]);
    }
  }
}

// The FA2 register trick: C fragments (16 x 16*KS, fp32) -> A fragments of the same tile.
template <int KS, typename T>
__device__ __forceinline__ void c_to_a_fragments(uint32_t (&a)[KS][4], const float (&c)[2 * KS][4]) {
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
    a[ks][0] = Element<T>::pack(c[2 * ks][0], c[2 * ks][1]);
    a[ks][1] = Element<T>::pack(c[2 * ks][2], c[2 * ks][3]);
    a[ks][2] = Element<T>::pack(c[2 * ks + 1][0], c[2 * ks + 1][1]);
    a[ks][3] = Element<T>::pack(c[2 * ks + 1][2], c[2 * ks + 1][3]);
  }
}

// Max / sum over the 4 lanes of a quad (= one row of a C tile).
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(kFullMask, x, 1));
  return fmaxf(x, __shfl_xor_sync(kFullMask, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(kFullMask, x, 1);
  return x + __shfl_xor_sync(kFullMask, x, 2);
}

// Stores rows `row0 + (0..15)` of a warp's C tile (16 x D, fp32) times `multiplier[r]`
// (r = 0: row group, r = 1: row group + 8) to `dst` (contiguous rows of D elements),
// skipping rows at or past `seq_len`. Each thread writes 4-byte pairs.
template <int D, typename T>
__device__ __forceinline__ void store_c_rows(T* dst, const float (&c)[D / 8][4], const float (&multiplier)[2],
                                             int row0, int seq_len, int lane) {
  const int group = lane / 4, quad = lane % 4;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + group + 8 * r;
    if (row >= seq_len) continue;
    T* out_row = dst + static_cast<int64_t>(row) * D;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      *reinterpret_cast<uint32_t*>(out_row + dt * 8 + 2 * quad) =
          Element<T>::pack(c[dt][2 * r] * multiplier[r], c[dt][2 * r + 1] * multiplier[r]);
    }
  }
}

// ------------------------------------------------------------------ global tensors

// One (B, H, S, D) tensor: base pointer and element strides; the last dim is contiguous.
struct HeadStrided {
  const void* data;
  int64_t stride_batch, stride_head, stride_seq;
};

template <typename T>
__device__ __forceinline__ const T* head_start(const HeadStrided& t, int batch, int head) {
  return static_cast<const T*>(t.data) + batch * t.stride_batch + head * t.stride_head;
}

// Copies rows [row0, row0 + ROWS) of one head (row stride `row_stride` elements) into a
// shared tile of pitch D + 8, 16 bytes per cp.async, consecutive threads on consecutive
// 16-byte chunks of a row (coalesced). Rows at or past `seq_len` are filled with zeros.
template <int ROWS, int D, int kThreads, typename T>
__device__ __forceinline__ void load_tile_async(T* tile, const T* head, int64_t row_stride, int row0, int seq_len,
                                                int tid) {
  constexpr int kChunksPerRow = D * static_cast<int>(sizeof(T)) / 16;
  constexpr int kChunks = ROWS * kChunksPerRow;
  static_assert(kChunks % kThreads == 0, "every thread copies the same number of chunks");
#pragma unroll
  for (int i = 0; i < kChunks / kThreads; ++i) {
    const int chunk = tid + i * kThreads;
    const int r = chunk / kChunksPerRow;
    const int col = chunk % kChunksPerRow * (16 / static_cast<int>(sizeof(T)));
    const bool in_bounds = row0 + r < seq_len;
    const T* src = in_bounds ? head + static_cast<int64_t>(row0 + r) * row_stride + col : head;
    cp_async_16(tile + r * (D + 8) + col, src, in_bounds);
  }
}

struct ForwardParams {
  HeadStrided q, k, v;  // q (B, H, S, D); k, v (B, Hkv, S, D)
  void* out;   // (B, H, S, D) contiguous
  float* lse;  // (B, H, S) contiguous
  int heads, seq_len;
  int group_size;  // H / Hkv: query head h reads key/value head h / group_size
  bool causal;
  float scale_log2;  // scale * log2(e)
};

struct BackwardParams {
  HeadStrided q, k, v, grad_out;  // q, grad_out (B, H, S, D); k, v (B, Hkv, S, D)
  const float* lse;    // (B, H, S) contiguous, natural log
  const float* delta;  // (B, H, S) contiguous, rowsum(grad_out * out)
  void* grad_q;        // (B, H, S, D) contiguous
  void* grad_k;        // (B, Hkv, S, D) contiguous, likewise grad_v
  void* grad_v;
  int heads, kv_heads, seq_len;
  int group_size;  // H / Hkv
  bool causal;
  float scale, scale_log2;
};

// ============================================================================ forward
// grid (ceil(S / BLOCK_M), H, B), block 32 * BLOCK_M / 16 threads; see the file header.
template <typename T, int D, int BLOCK_M, int BLOCK_N, int MIN_BLOCKS_PER_SM>
__global__ void __launch_bounds__(BLOCK_M / 16 * 32, MIN_BLOCKS_PER_SM)
    flash_attention_forward_kernel(const ForwardParams p) {
  constexpr int kThreads = BLOCK_M / 16 * 32;
  constexpr int kPitch = D + 8;
  constexpr int kHeadSteps = D / 16;     // k-steps of S = Q K^T (over the head dim)
  constexpr int kKeyTiles = BLOCK_N / 8;  // n-tiles of S
  constexpr int kKeySteps = BLOCK_N / 16;  // k-steps of O += P V (over keys)
  constexpr int kDimTiles = D / 8;       // n-tiles of O

  extern __shared__ __align__(16) unsigned char shared_bytes[];
  T* q_tile = reinterpret_cast<T*>(shared_bytes);  // [BLOCK_M][kPitch]
  T* k_tiles = q_tile + BLOCK_M * kPitch;            // [2 stages][BLOCK_N][kPitch]
  T* v_tiles = k_tiles + 2 * BLOCK_N * kPitch;       // [2 stages][BLOCK_N][kPitch]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int group = lane / 4, quad = lane % 4;
  const int seq_len = p.seq_len;
  const int m_block = gridDim.x - 1 - blockIdx.x;  // longest causal tiles first
  const int head = blockIdx.y, batch = blockIdx.z;
  const int kv_head = head / p.group_size;  // GQA: the K/V head this query head shares
  const int m0 = m_block * BLOCK_M;
  const int warp_row0 = m0 + 16 * warp;  // this warp's 16 query rows start here
  const int my_rows[2] = {warp_row0 + group, warp_row0 + group + 8};

  const T* q = head_start<T>(p.q, batch, head);
  const T* k = head_start<T>(p.k, batch, kv_head);
  const T* v = head_start<T>(p.v, batch, kv_head);
  const int kv_end = p.causal ? min(seq_len, m0 + BLOCK_M) : seq_len;  // keys any row of the tile sees
  const int n_tiles = (kv_end + BLOCK_N - 1) / BLOCK_N;

  // Prologue: group 0 = Q tile, group 1 = key/value tile 0 (stage 0).
  load_tile_async<BLOCK_M, D, kThreads>(q_tile, q, p.q.stride_seq, m0, seq_len, tid);
  cp_async_commit();
  load_tile_async<BLOCK_N, D, kThreads>(k_tiles, k, p.k.stride_seq, 0, seq_len, tid);
  load_tile_async<BLOCK_N, D, kThreads>(v_tiles, v, p.v.stride_seq, 0, seq_len, tid);
  cp_async_commit();
  cp_async_wait<1>();  // Q has landed (for this thread) ...
  __syncthreads();     // ... and for every thread
  uint32_t q_frag[kHeadSteps][4];  // this warp's 16 x D slice of Q, kept for the whole loop
  load_a_fragments<kHeadSteps, kPitch>(q_frag, q_tile + 16 * warp * kPitch, lane);

  float o_acc[kDimTiles][4] = {};  // unnormalised output, 16 x D per warp
  float row_max[2] = {-INFINITY, -INFINITY};  // running max of scaled scores (log2 units)
  float row_sum[2] = {0.f, 0.f};  // running sum of exp2, partial over this lane's columns

  for (int j = 0; j < n_tiles; ++j) {
    const int stage = j % 2;
    // Prefetch tile j+1 into the other stage; that stage was last read in iteration j-1,
    // which every warp has finished (barrier at the end of iteration j-1). The group is
    // committed even when empty, so "all but the newest group" is always tile j.
    if (j + 1 < n_tiles) {
      const int next = (j + 1) * BLOCK_N;
      load_tile_async<BLOCK_N, D, kThreads>(k_tiles + (1 - stage) * BLOCK_N * kPitch, k, p.k.stride_seq, next,
                                            seq_len, tid);
      load_tile_async<BLOCK_N, D, kThreads>(v_tiles + (1 - stage) * BLOCK_N * kPitch, v, p.v.stride_seq, next,
                                            seq_len, tid);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();  // tile j visible to all warps

    const int n0 = j * BLOCK_N;
    // Causal: a warp whose last row precedes every key of the tile has nothing to add.
    if (!p.causal || n0 <= warp_row0 + 15) {
      const T* k_tile = k_tiles + stage * BLOCK_N * kPitch;
      const T* v_tile = v_tiles + stage * BLOCK_N * kPitch;

      float s[kKeyTiles][4] = {};  // S = Q K^T, 16 x BLOCK_N
      warp_mma_b_n_major<kHeadSteps, kKeyTiles, kPitch>(s, q_frag, k_tile, lane);

      const bool needs_mask = n0 + BLOCK_N > seq_len || (p.causal && n0 + BLOCK_N - 1 > warp_row0);
#pragma unroll
      for (int nt = 0; nt < kKeyTiles; ++nt) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          s[nt][i] *= p.scale_log2;
          if (needs_mask) {
            const int key = n0 + nt * 8 + 2 * quad + i % 2;
            if (key >= seq_len || (p.causal && key > my_rows[i / 2])) s[nt][i] = -INFINITY;
          }
        }
      }

      // Online softmax. Row r of this thread = C elements 2r, 2r+1 of every n-tile.
      float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int nt = 0; nt < kKeyTiles; ++nt) {
        tile_max[0] = fmaxf(tile_max[0], fmaxf(s[nt][0], s[nt][1]));
        tile_max[1] = fmaxf(tile_max[1], fmaxf(s[nt][2], s[nt][3]));
      }
      float subtrahend[2], rescale[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float new_max = fmaxf(row_max[r], quad_max(tile_max[r]));
        subtrahend[r] = new_max == -INFINITY ? 0.f : new_max;  // all masked so far: avoid -inf - -inf
        rescale[r] = fast_exp2(row_max[r] - subtrahend[r]);        // 0 on the first visible tile
        row_max[r] = new_max;
      }
      float tile_sum[2] = {0.f, 0.f};
#pragma unroll
      for (int nt = 0; nt < kKeyTiles; ++nt) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          s[nt][i] = fast_exp2(s[nt][i] - subtrahend[i / 2]);  // P, unnormalised
          tile_sum[i / 2] += s[nt][i];
        }
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) row_sum[r] = row_sum[r] * rescale[r] + tile_sum[r];
#pragma unroll
      for (int dt = 0; dt < kDimTiles; ++dt) {
#pragma unroll
        for (int i = 0; i < 4; ++i) o_acc[dt][i] *= rescale[i / 2];
      }

      uint32_t p_frag[kKeySteps][4];  // P (16 x BLOCK_N) as 16-bit A fragments
      c_to_a_fragments<kKeySteps, T>(p_frag, s);
      warp_mma_b_k_major<kKeySteps, kDimTiles, kPitch>(o_acc, p_frag, v_tile, lane);
    }
    __syncthreads();  // every warp is done with this stage before it is refilled
  }

  // Epilogue: out = O / l, lse = (m + log2 l) * ln 2 in natural-log units.
  float inverse_sum[2];
  const int64_t head_row0 = (static_cast<int64_t>(batch) * p.heads + head) * seq_len;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float sum = quad_sum(row_sum[r]);
    inverse_sum[r] = sum > 0.f ? 1.f / sum : 0.f;
    if (quad == 0 && my_rows[r] < seq_len) {
      p.lse[head_row0 + my_rows[r]] = sum > 0.f ? (row_max[r] + log2f(sum)) * kLn2 : INFINITY;
    }
  }
  T* out = static_cast<T*>(p.out) + head_row0 * D;
  store_c_rows<D>(out, o_acc, inverse_sum, warp_row0, seq_len, lane);
}

// =========================================================================== backward
// 1. delta[row] = sum_d grad_out[row, d] * out[row, d], one warp per (batch, head, seq) row.
template <typename T>
__global__ void attention_backward_delta_kernel(HeadStrided grad_out, HeadStrided out, float* delta, int heads,
                                                int seq_len, int head_dim, int64_t rows) {
  constexpr int kWarpsPerBlock = 8;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const int s = static_cast<int>(row % seq_len);
  const int64_t batch_head = row / seq_len;
  const int head = static_cast<int>(batch_head % heads), batch = static_cast<int>(batch_head / heads);
  const T* go = head_start<T>(grad_out, batch, head) + s * grad_out.stride_seq;
  const T* o = head_start<T>(out, batch, head) + s * out.stride_seq;
  float acc[1] = {0.f};
  for (int d = lane; d < head_dim; d += 32) acc[0] += llmkernels::to_float(go[d]) * llmkernels::to_float(o[d]);
  llmkernels::warp_reduce_sum(acc);
  if (lane == 0) delta[row] = acc[0];
}

// 2. dQ, per query tile; grid (ceil(S / BLOCK_M), H, B), block 32 * BLOCK_M / 16 threads.
template <typename T, int D, int BLOCK_M, int BLOCK_N>
__global__ void __launch_bounds__(BLOCK_M / 16 * 32)
    flash_attention_backward_dq_kernel(const BackwardParams p) {
  constexpr int kThreads = BLOCK_M / 16 * 32;
  constexpr int kPitch = D + 8;
  constexpr int kHeadSteps = D / 16;       // k-steps of S = Q K^T and dP = dO V^T
  constexpr int kKeyTiles = BLOCK_N / 8;    // n-tiles of S, dP
  constexpr int kKeySteps = BLOCK_N / 16;  // k-steps of dQ += dS K
  constexpr int kDimTiles = D / 8;         // n-tiles of dQ

  extern __shared__ __align__(16) unsigned char shared_bytes[];
  T* q_tile = reinterpret_cast<T*>(shared_bytes);   // [BLOCK_M][kPitch]
  T* do_tile = q_tile + BLOCK_M * kPitch;             // [BLOCK_M][kPitch]
  T* k_tiles = do_tile + BLOCK_M * kPitch;            // [2 stages][BLOCK_N][kPitch]
  T* v_tiles = k_tiles + 2 * BLOCK_N * kPitch;        // [2 stages][BLOCK_N][kPitch]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int group = lane / 4, quad = lane % 4;
  const int seq_len = p.seq_len;
  const int m_block = gridDim.x - 1 - blockIdx.x;  // longest causal tiles first
  const int head = blockIdx.y, batch = blockIdx.z;
  const int kv_head = head / p.group_size;  // GQA: the K/V head this query head shares
  const int m0 = m_block * BLOCK_M;
  const int warp_row0 = m0 + 16 * warp;
  const int my_rows[2] = {warp_row0 + group, warp_row0 + group + 8};

  const T* q = head_start<T>(p.q, batch, head);
  const T* k = head_start<T>(p.k, batch, kv_head);
  const T* v = head_start<T>(p.v, batch, kv_head);
  const T* grad_out = head_start<T>(p.grad_out, batch, head);
  const int64_t head_row0 = (static_cast<int64_t>(batch) * p.heads + head) * seq_len;

  // Per-row constants (log2 units); rows past the end get lse = +inf, so their P is 0.
  float lse_log2[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const bool valid = my_rows[r] < seq_len;
    lse_log2[r] = valid ? p.lse[head_row0 + my_rows[r]] * kLog2e : INFINITY;
    delta[r] = valid ? p.delta[head_row0 + my_rows[r]] : 0.f;
  }

  const int kv_end = p.causal ? min(seq_len, m0 + BLOCK_M) : seq_len;
  const int n_tiles = (kv_end + BLOCK_N - 1) / BLOCK_N;

  // Prologue: group 0 = Q and dO tiles, group 1 = key/value tile 0.
  load_tile_async<BLOCK_M, D, kThreads>(q_tile, q, p.q.stride_seq, m0, seq_len, tid);
  load_tile_async<BLOCK_M, D, kThreads>(do_tile, grad_out, p.grad_out.stride_seq, m0, seq_len, tid);
  cp_async_commit();
  load_tile_async<BLOCK_N, D, kThreads>(k_tiles, k, p.k.stride_seq, 0, seq_len, tid);
  load_tile_async<BLOCK_N, D, kThreads>(v_tiles, v, p.v.stride_seq, 0, seq_len, tid);
  cp_async_commit();

  float dq_acc[kDimTiles][4] = {};  // 16 x D per warp
  for (int j = 0; j < n_tiles; ++j) {
    const int stage = j % 2;
    if (j + 1 < n_tiles) {  // same double buffering as the forward
      const int next = (j + 1) * BLOCK_N;
      load_tile_async<BLOCK_N, D, kThreads>(k_tiles + (1 - stage) * BLOCK_N * kPitch, k, p.k.stride_seq, next,
                                            seq_len, tid);
      load_tile_async<BLOCK_N, D, kThreads>(v_tiles + (1 - stage) * BLOCK_N * kPitch, v, p.v.stride_seq, next,
                                            seq_len, tid);
    }
    cp_async_commit();
    cp_async_wait<1>();  // Q, dO and tile j have landed
    __syncthreads();

    const int n0 = j * BLOCK_N;
    if (!p.causal || n0 <= warp_row0 + 15) {
      const T* k_tile = k_tiles + stage * BLOCK_N * kPitch;
      const T* v_tile = v_tiles + stage * BLOCK_N * kPitch;
      uint32_t a[kHeadSteps][4];  // Q, then dO: this warp's 16 x D slice

      float s[kKeyTiles][4] = {};  // S = Q K^T
      load_a_fragments<kHeadSteps, kPitch>(a, q_tile + 16 * warp * kPitch, lane);
      warp_mma_b_n_major<kHeadSteps, kKeyTiles, kPitch>(s, a, k_tile, lane);
      float dp[kKeyTiles][4] = {};  // dP = dO V^T
      load_a_fragments<kHeadSteps, kPitch>(a, do_tile + 16 * warp * kPitch, lane);
      warp_mma_b_n_major<kHeadSteps, kKeyTiles, kPitch>(dp, a, v_tile, lane);

      const bool needs_mask = n0 + BLOCK_N > seq_len || (p.causal && n0 + BLOCK_N - 1 > warp_row0);
#pragma unroll
      for (int nt = 0; nt < kKeyTiles; ++nt) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int r = i / 2;
          float prob = fast_exp2(fmaf(s[nt][i], p.scale_log2, -lse_log2[r]));
          if (needs_mask) {
            const int key = n0 + nt * 8 + 2 * quad + i % 2;
            if (key >= seq_len || (p.causal && key > my_rows[r])) prob = 0.f;
          }
          s[nt][i] = prob * (dp[nt][i] - delta[r]);  // dS
        }
      }
      uint32_t ds_frag[kKeySteps][4];
      c_to_a_fragments<kKeySteps, T>(ds_frag, s);
      warp_mma_b_k_major<kKeySteps, kDimTiles, kPitch>(dq_acc, ds_frag, k_tile, lane);  // dQ += dS K
    }
    __syncthreads();
  }

  const float scale[2] = {p.scale, p.scale};
  T* grad_q = static_cast<T*>(p.grad_q) + head_row0 * D;
  store_c_rows<D>(grad_q, dq_acc, scale, warp_row0, seq_len, lane);
}

// 3. dK, dV, per key tile; grid (ceil(S / BLOCK_N), Hkv, B), block 32 * BLOCK_N / 16 threads.
// Each warp owns 16 keys and computes the transposed tiles S^T, P^T, dP^T, dS^T (keys x
// queries), so P^T and dS^T are A operands in registers for dV += P^T dO, dK += dS^T Q.
// With GQA the block sums over the query heads of its key/value head (see the file header).
template <typename T, int D, int BLOCK_N, int BLOCK_M, int MIN_BLOCKS_PER_SM>
__global__ void __launch_bounds__(BLOCK_N / 16 * 32, MIN_BLOCKS_PER_SM)
    flash_attention_backward_dkdv_kernel(const BackwardParams p) {
  constexpr int kThreads = BLOCK_N / 16 * 32;
  constexpr int kPitch = D + 8;
  constexpr int kHeadSteps = D / 16;         // k-steps of S^T = K Q^T and dP^T = V dO^T
  constexpr int kQueryTiles = BLOCK_M / 8;    // n-tiles of S^T, dP^T
  constexpr int kQuerySteps = BLOCK_M / 16;  // k-steps of dV += P^T dO, dK += dS^T Q
  constexpr int kDimTiles = D / 8;           // n-tiles of dK, dV

  extern __shared__ __align__(16) unsigned char shared_bytes[];
  T* k_tile = reinterpret_cast<T*>(shared_bytes);  // [BLOCK_N][kPitch]
  T* v_tile = k_tile + BLOCK_N * kPitch;             // [BLOCK_N][kPitch]
  T* q_tiles = v_tile + BLOCK_N * kPitch;            // [2 stages][BLOCK_M][kPitch]
  T* do_tiles = q_tiles + 2 * BLOCK_M * kPitch;      // [2 stages][BLOCK_M][kPitch]
  float* lse_log2 = reinterpret_cast<float*>(do_tiles + 2 * BLOCK_M * kPitch);  // [2 stages][BLOCK_M]
  float* deltas = lse_log2 + 2 * BLOCK_M;                                       // [2 stages][BLOCK_M]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int group = lane / 4, quad = lane % 4;
  const int seq_len = p.seq_len;
  const int n_block = blockIdx.x;  // causal: the first key tiles are seen by the most queries
  const int kv_head = blockIdx.y, batch = blockIdx.z;
  const int n0 = n_block * BLOCK_N;
  const int warp_key0 = n0 + 16 * warp;  // this warp's 16 keys start here
  const int my_keys[2] = {warp_key0 + group, warp_key0 + group + 8};

  const T* k = head_start<T>(p.k, batch, kv_head);
  const T* v = head_start<T>(p.v, batch, kv_head);
  const int64_t kv_row0 = (static_cast<int64_t>(batch) * p.kv_heads + kv_head) * seq_len;  // rows of dK, dV

  // Query tiles that see this key tile: causal query i sees key j iff j <= i, so tiles
  // ending before n0 are skipped.
  const int m_begin = p.causal ? n0 / BLOCK_M : 0;
  const int m_end = (seq_len + BLOCK_M - 1) / BLOCK_M;
  // GQA: the query heads that read this K/V head. Their query tiles are visited head by
  // head (the fixed summation order of dK, dV); the double buffering runs across heads.
  const int head_begin = kv_head * p.group_size;

  // Loads query tile `m` of query head `head` (Q, dO by cp.async; lse, delta by plain
  // stores) into `stage`.
  auto load_query_tile = [&](int head, int m, int stage) {
    const int row0 = m * BLOCK_M;
    const T* q = head_start<T>(p.q, batch, head);
    const T* grad_out = head_start<T>(p.grad_out, batch, head);
    const int64_t head_row0 = (static_cast<int64_t>(batch) * p.heads + head) * seq_len;
    load_tile_async<BLOCK_M, D, kThreads>(q_tiles + stage * BLOCK_M * kPitch, q, p.q.stride_seq, row0, seq_len, tid);
    load_tile_async<BLOCK_M, D, kThreads>(do_tiles + stage * BLOCK_M * kPitch, grad_out, p.grad_out.stride_seq, row0,
                                          seq_len, tid);
    for (int r = tid; r < BLOCK_M; r += kThreads) {
      const bool valid = row0 + r < seq_len;  // padded rows: P = exp2(0 - inf) = 0, dS = 0
      lse_log2[stage * BLOCK_M + r] = valid ? p.lse[head_row0 + row0 + r] * kLog2e : INFINITY;
      deltas[stage * BLOCK_M + r] = valid ? p.delta[head_row0 + row0 + r] : 0.f;
    }
  };

  // Prologue: group 0 = K and V tiles, group 1 = the first query tile (stage 0).
  load_tile_async<BLOCK_N, D, kThreads>(k_tile, k, p.k.stride_seq, n0, seq_len, tid);
  load_tile_async<BLOCK_N, D, kThreads>(v_tile, v, p.v.stride_seq, n0, seq_len, tid);
  cp_async_commit();
  load_query_tile(head_begin, m_begin, 0);
  cp_async_commit();

  float dk_acc[kDimTiles][4] = {};  // 16 keys x D per warp, summed over the group's query heads
  float dv_acc[kDimTiles][4] = {};
  // One step per query tile of each query head of the group, head by head.
  const int m_count = m_end - m_begin;
  const int n_steps = p.group_size * m_count;
  for (int step = 0; step < n_steps; ++step) {
    const int stage = step % 2;
    // Prefetch the next step's query tile into the other stage, last read in the previous
    // iteration (finished by every warp at its closing barrier).
    const int next = step + 1;
    if (next < n_steps) load_query_tile(head_begin + next / m_count, m_begin + next % m_count, 1 - stage);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();  // K, V and this step's query tile (and its lse/delta stores) visible

    const int m0 = (m_begin + step % m_count) * BLOCK_M;
    // Causal: if every query of the tile precedes every key of this warp, P^T = 0.
    if (!p.causal || m0 + BLOCK_M - 1 >= warp_key0) {
      const T* q_stage = q_tiles + stage * BLOCK_M * kPitch;
      const T* do_stage = do_tiles + stage * BLOCK_M * kPitch;
      const float* lse_stage = lse_log2 + stage * BLOCK_M;
      const float* delta_stage = deltas + stage * BLOCK_M;
      uint32_t a[kHeadSteps][4];  // K, then V: this warp's 16 x D slice

      float st[kQueryTiles][4] = {};  // S^T = K Q^T, 16 keys x BLOCK_M queries
      load_a_fragments<kHeadSteps, kPitch>(a, k_tile + 16 * warp * kPitch, lane);
      warp_mma_b_n_major<kHeadSteps, kQueryTiles, kPitch>(st, a, q_stage, lane);

      const bool needs_mask = warp_key0 + 15 >= seq_len || (p.causal && m0 < warp_key0 + 15);
#pragma unroll
      for (int nt = 0; nt < kQueryTiles; ++nt) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int query_in_tile = nt * 8 + 2 * quad + i % 2;  // column of the C fragment
          float prob = fast_exp2(fmaf(st[nt][i], p.scale_log2, -lse_stage[query_in_tile]));
          if (needs_mask) {
            const int key = my_keys[i / 2];
            if (key >= seq_len || (p.causal && key > m0 + query_in_tile)) prob = 0.f;
          }
          st[nt][i] = prob;  // P^T
        }
      }

      float dpt[kQueryTiles][4] = {};  // dP^T = V dO^T
      load_a_fragments<kHeadSteps, kPitch>(a, v_tile + 16 * warp * kPitch, lane);
      warp_mma_b_n_major<kHeadSteps, kQueryTiles, kPitch>(dpt, a, do_stage, lane);

      uint32_t frag[kQuerySteps][4];
      c_to_a_fragments<kQuerySteps, T>(frag, st);
      warp_mma_b_k_major<kQuerySteps, kDimTiles, kPitch>(dv_acc, frag, do_stage, lane);  // dV += P^T dO

#pragma unroll
      for (int nt = 0; nt < kQueryTiles; ++nt) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int query_in_tile = nt * 8 + 2 * quad + i % 2;
          dpt[nt][i] = st[nt][i] * (dpt[nt][i] - delta_stage[query_in_tile]);  // dS^T
        }
      }
      c_to_a_fragments<kQuerySteps, T>(frag, dpt);
      warp_mma_b_k_major<kQuerySteps, kDimTiles, kPitch>(dk_acc, frag, q_stage, lane);  // dK += dS^T Q
    }
    __syncthreads();
  }

  const float dk_scale[2] = {p.scale, p.scale};
  const float one[2] = {1.f, 1.f};
  store_c_rows<D>(static_cast<T*>(p.grad_k) + kv_row0 * D, dk_acc, dk_scale, warp_key0, seq_len, lane);
  store_c_rows<D>(static_cast<T*>(p.grad_v) + kv_row0 * D, dv_acc, one, warp_key0, seq_len, lane);
}

// ================================================================================ host

// Tile shapes per head dim (see the file header for the budgets).
template <int D>
struct Tiles;
template <>
struct Tiles<64> {
  static constexpr int kForwardM = 128, kForwardN = 64;
  static constexpr int kForwardMinBlocksPerSm = 2;  // 16 warps per SM: caps registers at 128
  static constexpr int kDqM = 64, kDqN = 64;
  static constexpr int kDkdvN = 64, kDkdvM = 64;
  static constexpr int kDkdvMinBlocksPerSm = 3;  // 12 warps per SM: caps registers at 168
};
template <>
struct Tiles<128> {
  static constexpr int kForwardM = 128, kForwardN = 64;
  static constexpr int kForwardMinBlocksPerSm = 1;  // needs ~214 registers per thread
  static constexpr int kDqM = 64, kDqN = 64;
  static constexpr int kDkdvN = 64, kDkdvM = 32;
  static constexpr int kDkdvMinBlocksPerSm = 1;  // needs ~246 registers per thread
};

template <typename Kernel>
void allow_shared_memory(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
}

HeadStrided head_strided(const at::Tensor& t) {
  return HeadStrided{t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}

// The kernels read rows with 16-byte cp.async: the last dim must be contiguous, every row
// 16-byte aligned. Anything else (e.g. a slice at an odd offset) is copied, knowingly;
// ordinary strided views such as a transposed (B, S, H, D) projection pass through.
at::Tensor kernel_operand(const at::Tensor& t) {
  constexpr int64_t kAlignElements = 8;  // 16 bytes of bf16/fp16
  bool usable = t.stride(3) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int dim = 0; dim < 3; ++dim) usable = usable && (t.size(dim) == 1 || t.stride(dim) % kAlignElements == 0);
  return usable ? t : t.clone(at::MemoryFormat::Contiguous);
}

// `name` must be on q's device with q's dtype, 4-D; shape checks are the callers'.
void check_like_query(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.is_cuda(), "flash_attention (CUDA): ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == 4, "flash_attention (CUDA): ", name, " must be 4-D (batch, heads, seq, head_dim), got ",
              t.dim(), "-D");
  TORCH_CHECK(t.device() == q.device(), "flash_attention (CUDA): ", name, " must be on q's device ", q.device(),
              ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "flash_attention (CUDA): ", name, " must have q's dtype ",
              q.scalar_type(), ", got ", t.scalar_type());
}

// grad_out, out: q's shape (B, H, S, D).
void check_query_shaped(const at::Tensor& t, const char* name, const at::Tensor& q) {
  check_like_query(t, name, q);
  TORCH_CHECK(t.sizes() == q.sizes(), "flash_attention (CUDA): ", name, " must have q's shape (B, H, S, D) ",
              q.sizes(), ", got ", t.sizes());
}

// k, v: (B, Hkv, S, D) with Hkv dividing H (grouped-query attention), equal to each other.
void check_key_value(const at::Tensor& k, const at::Tensor& v, const at::Tensor& q) {
  check_like_query(k, "k", q);
  check_like_query(v, "v", q);
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(2) == q.size(2) && k.size(3) == q.size(3) && k.size(1) > 0 &&
                  q.size(1) % k.size(1) == 0,
              "flash_attention (CUDA): k must have shape (B, Hkv, S, D) with q's B, S, D and Hkv dividing q's H ",
              q.sizes(), ", got ", k.sizes(), " (this kernel needs equal query and key lengths)");
  TORCH_CHECK(v.sizes() == k.sizes(), "flash_attention (CUDA): v must have k's shape ", k.sizes(), ", got ",
              v.sizes());
}

void check_query(const at::Tensor& q) {
  TORCH_CHECK(q.is_cuda(), "flash_attention (CUDA): q must be a CUDA tensor, got device ", q.device());
  TORCH_CHECK(q.dim() == 4, "flash_attention (CUDA): q must be 4-D (batch, heads, seq, head_dim), got ", q.dim(),
              "-D");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
              "flash_attention (CUDA): q must be bfloat16 or float16, got ", q.scalar_type());
  TORCH_CHECK(q.size(3) == 64 || q.size(3) == 128, "flash_attention (CUDA): head_dim must be 64 or 128, got ",
              q.size(3));
  TORCH_CHECK(q.size(0) <= 65535 && q.size(1) <= 65535,
              "flash_attention (CUDA): batch and heads must each be <= 65535 (grid z and y), got q of shape ",
              q.sizes());
  TORCH_CHECK(q.size(2) <= std::numeric_limits<int>::max() / 2, "flash_attention (CUDA): sequence length ",
              q.size(2), " is too long");
}

template <typename T, int D>
struct ForwardLauncher {
  static void run(const ForwardParams& params, int batch, int heads, int seq_len, cudaStream_t stream) {
    constexpr int M = Tiles<D>::kForwardM, N = Tiles<D>::kForwardN;
    const auto kernel = flash_attention_forward_kernel<T, D, M, N, Tiles<D>::kForwardMinBlocksPerSm>;
    const size_t shared_bytes = static_cast<size_t>(M + 4 * N) * (D + 8) * sizeof(T);  // Q + 2 stages of K, V
    allow_shared_memory(kernel, shared_bytes);
    const dim3 grid((seq_len + M - 1) / M, heads, batch);
    kernel<<<grid, M / 16 * 32, shared_bytes, stream>>>(params);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

template <typename T, int D>
struct BackwardLauncher {
  static void run(const BackwardParams& params, int batch, int heads, int kv_heads, int seq_len, cudaStream_t stream) {
    {
      constexpr int M = Tiles<D>::kDqM, N = Tiles<D>::kDqN;
      const auto kernel = flash_attention_backward_dq_kernel<T, D, M, N>;
      const size_t shared_bytes = static_cast<size_t>(2 * M + 4 * N) * (D + 8) * sizeof(T);  // Q, dO + 2 x (K, V)
      allow_shared_memory(kernel, shared_bytes);
      const dim3 grid((seq_len + M - 1) / M, heads, batch);
      kernel<<<grid, M / 16 * 32, shared_bytes, stream>>>(params);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    {
      constexpr int N = Tiles<D>::kDkdvN, M = Tiles<D>::kDkdvM;
      const auto kernel = flash_attention_backward_dkdv_kernel<T, D, N, M, Tiles<D>::kDkdvMinBlocksPerSm>;
      const size_t shared_bytes = static_cast<size_t>(2 * N + 4 * M) * (D + 8) * sizeof(T)  // K, V + 2 x (Q, dO)
                                  + 4 * static_cast<size_t>(M) * sizeof(float);             // 2 x (lse, delta)
      allow_shared_memory(kernel, shared_bytes);
      const dim3 grid((seq_len + N - 1) / N, kv_heads, batch);  // one block per key tile of each K/V head
      kernel<<<grid, N / 16 * 32, shared_bytes, stream>>>(params);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
};

// Runs Launcher<T, D>::run(args...) for q's dtype and head dim (already validated).
template <template <typename, int> class Launcher, typename... Args>
void dispatch_dtype_and_head_dim(const at::Tensor& q, const Args&... args) {
  const bool bf16 = q.scalar_type() == at::kBFloat16;
  const bool d64 = q.size(3) == 64;
  if (bf16 && d64) {
    Launcher<__nv_bfloat16, 64>::run(args...);
  } else if (bf16) {
    Launcher<__nv_bfloat16, 128>::run(args...);
  } else if (d64) {
    Launcher<__half, 64>::run(args...);
  } else {
    Launcher<__half, 128>::run(args...);
  }
}

std::tuple<at::Tensor, at::Tensor> flash_attention_forward_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                                const at::Tensor& v_in, bool causal, double scale) {
  check_query(q_in);
  check_key_value(k_in, v_in, q_in);
  const c10::cuda::CUDAGuard device_guard(q_in.device());
  const int batch = q_in.size(0), heads = q_in.size(1), seq_len = q_in.size(2);

  auto out = at::empty(q_in.sizes(), q_in.options());                              // (B, H, S, D)
  auto lse = at::empty({batch, heads, seq_len}, q_in.options().dtype(at::kFloat));  // (B, H, S)
  if (q_in.numel() == 0) return {out, lse};
  const at::Tensor q = kernel_operand(q_in), k = kernel_operand(k_in), v = kernel_operand(v_in);

  ForwardParams params{};
  params.q = head_strided(q);
  params.k = head_strided(k);
  params.v = head_strided(v);
  params.out = out.data_ptr();
  params.lse = lse.data_ptr<float>();
  params.heads = heads;
  params.seq_len = seq_len;
  params.group_size = heads / static_cast<int>(k_in.size(1));
  params.causal = causal;
  params.scale_log2 = static_cast<float>(scale) * kLog2e;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype_and_head_dim<ForwardLauncher>(q, params, batch, heads, seq_len, stream);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attention_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, bool causal, double scale) {
  check_query(q_in);
  check_key_value(k_in, v_in, q_in);
  check_query_shaped(grad_out_in, "grad_out", q_in);
  check_query_shaped(out_in, "out", q_in);
  const int batch = q_in.size(0), heads = q_in.size(1), seq_len = q_in.size(2), head_dim = q_in.size(3);
  const int kv_heads = k_in.size(1);
  TORCH_CHECK(lse_in.device() == q_in.device(), "flash_attention (CUDA): lse must be on q's device ", q_in.device(),
              ", got ", lse_in.device());
  TORCH_CHECK(lse_in.scalar_type() == at::kFloat, "flash_attention (CUDA): lse must be float32, got ",
              lse_in.scalar_type());
  TORCH_CHECK(lse_in.dim() == 3 && lse_in.size(0) == batch && lse_in.size(1) == heads && lse_in.size(2) == seq_len,
              "flash_attention (CUDA): lse must have shape (B, H, S) = (", batch, ", ", heads, ", ", seq_len,
              "), got ", lse_in.sizes());
  const c10::cuda::CUDAGuard device_guard(q_in.device());

  auto grad_q = at::empty(q_in.sizes(), q_in.options());  // (B, H, S, D), contiguous
  auto grad_k = at::empty(k_in.sizes(), k_in.options());  // (B, Hkv, S, D), contiguous
  auto grad_v = at::empty(k_in.sizes(), k_in.options());
  if (q_in.numel() == 0) return {grad_q, grad_k.zero_(), grad_v.zero_()};  // k, v may still hold keys
  const at::Tensor q = kernel_operand(q_in), k = kernel_operand(k_in), v = kernel_operand(v_in);
  const at::Tensor grad_out = kernel_operand(grad_out_in);
  const at::Tensor out = out_in.stride(3) == 1 ? out_in : out_in.contiguous();  // read with plain loads
  const at::Tensor lse = lse_in.contiguous();
  auto delta = at::empty({batch, heads, seq_len}, q_in.options().dtype(at::kFloat));  // (B, H, S)
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const int64_t rows = static_cast<int64_t>(batch) * heads * seq_len;
  constexpr int kDeltaWarps = 8;
  const int64_t delta_blocks = (rows + kDeltaWarps - 1) / kDeltaWarps;
  if (q.scalar_type() == at::kBFloat16) {
    attention_backward_delta_kernel<__nv_bfloat16><<<delta_blocks, kDeltaWarps * 32, 0, stream>>>(
        head_strided(grad_out), head_strided(out), delta.data_ptr<float>(), heads, seq_len, head_dim, rows);
  } else {
    attention_backward_delta_kernel<__half><<<delta_blocks, kDeltaWarps * 32, 0, stream>>>(
        head_strided(grad_out), head_strided(out), delta.data_ptr<float>(), heads, seq_len, head_dim, rows);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  BackwardParams params{};
  params.q = head_strided(q);
  params.k = head_strided(k);
  params.v = head_strided(v);
  params.grad_out = head_strided(grad_out);
  params.lse = lse.data_ptr<float>();
  params.delta = delta.data_ptr<float>();
  params.grad_q = grad_q.data_ptr();
  params.grad_k = grad_k.data_ptr();
  params.grad_v = grad_v.data_ptr();
  params.heads = heads;
  params.kv_heads = kv_heads;
  params.seq_len = seq_len;
  params.group_size = heads / kv_heads;
  params.causal = causal;
  params.scale = static_cast<float>(scale);
  params.scale_log2 = static_cast<float>(scale) * kLog2e;
  dispatch_dtype_and_head_dim<BackwardLauncher>(q, params, batch, heads, kv_heads, seq_len, stream);
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(llmkernels, CUDA, m) {
  m.impl("flash_attention_forward", &flash_attention_forward_cuda);
  m.impl("flash_attention_backward", &flash_attention_backward_cuda);
}
