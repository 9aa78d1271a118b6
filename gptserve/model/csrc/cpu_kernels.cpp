// gptserve's CPU kernels: paged decode attention, the greedy argmax, and linear layers on a
// few rows with weights in 32, 16 or 8 bits. Compiled on first use by cpu_kernels.py (beside
// this folder), which says why each exists and when the PyTorch path runs instead.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

// q (B, H, D); k_cache, v_cache (N, bs, H, D); block_tables (B, M) int64; context_lens (B,) int64
torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                           torch::Tensor block_tables, torch::Tensor context_lens, double scale) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && k_cache.dtype() == torch::kFloat32, "float32 only");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "the pool must be contiguous");
  q = q.contiguous();
  block_tables = block_tables.contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t bs = k_cache.size(1), M = block_tables.size(1);
  auto out = torch::empty_like(q);
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / H, h = i % H, n = lens[b];
      const float* qv = qp + i * D;
      scores.resize(n);
      float mx = -INFINITY;
      for (int64_t t = 0; t < n; ++t) {
        const int64_t slot = tables[b * M + t / bs] * bs + t % bs;
        const float* kv = kp + (slot * H + h) * D;
        float s = 0.f;
        for (int64_t d = 0; d < D; ++d) s += qv[d] * kv[d];
        scores[t] = s * fscale;
        mx = std::max(mx, scores[t]);
      }
      float sum = 0.f;
      for (int64_t t = 0; t < n; ++t) { scores[t] = std::exp(scores[t] - mx); sum += scores[t]; }
      float* o = op + i * D;
      std::fill(o, o + D, 0.f);
      for (int64_t t = 0; t < n; ++t) {
        const int64_t slot = tables[b * M + t / bs] * bs + t % bs;
        const float* vv = vp + (slot * H + h) * D;
        const float p = scores[t] / sum;
        for (int64_t d = 0; d < D; ++d) o[d] += p * vv[d];
      }
    }
  });
  return out;
}

// logits (B, V) float32 -> (B,) int64: each row's first index of its maximum, as
// torch.argmax (a NaN counts as the maximum, so the first NaN wins)
torch::Tensor row_argmax(torch::Tensor logits) {
  TORCH_CHECK(logits.dtype() == torch::kFloat32 && logits.dim() == 2, "(B, V) float32 only");
  logits = logits.contiguous();
  const int64_t B = logits.size(0), V = logits.size(1);
  auto out = torch::empty({B}, torch::kLong);
  const float* lp = logits.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const float* row = lp + b * V;
      constexpr int W = 16;  // independent lanes, so the loop vectorises without -ffast-math
      float lane[W];
      bool nan[W];
      for (int j = 0; j < W; ++j) { lane[j] = -INFINITY; nan[j] = false; }
      int64_t i = 0;
      for (; i + W <= V; i += W) {
        for (int j = 0; j < W; ++j) {
          const float x = row[i + j];
          lane[j] = x > lane[j] ? x : lane[j];
          nan[j] |= x != x;
        }
      }
      float mx = -INFINITY;
      bool any_nan = false;
      for (int j = 0; j < W; ++j) { mx = lane[j] > mx ? lane[j] : mx; any_nan |= nan[j]; }
      for (; i < V; ++i) { mx = row[i] > mx ? row[i] : mx; any_nan |= row[i] != row[i]; }
      int64_t at = 0;
      for (int64_t k = 0; k < V; ++k) {
        if (any_nan ? row[k] != row[k] : row[k] == mx) { at = k; break; }
      }
      op[b] = at;
    }
  });
  return out;
}

// ---- linear layers in panels, weights in 32, 16 or 8 bits ---------------------------------
// A weight (N, K) is held as panels of 16 output channels, (P, K, 16) with P = ceil(N / 16)
// (the last panel padded with zeros), in its own format: float32, bfloat16, float16 or int8
// with one float32 scale per output channel. Each output is one lane of a vector that
// accumulates w[k] * x[k] for k = 0, 1, ..., K - 1 in that order with fused multiply-adds,
// then y = sum * scale + bias: the same operations in the same order whatever the number of
// rows, whichever path below ran and whichever instruction set, so a row's result never
// depends on the batch it came in (float32 rounding included).
//   up to four rows (few_rows): each weight is widened to float32 in registers as it is read; several
//     panels at once keep enough independent sums in flight to hide the FMA latency. Bound
//     by reading the weights, so weights held in fewer bytes are read faster.
//   more rows (many_rows): each thread widens one panel into a float32 buffer (L2-sized) and multiplies
//     every row by it, six rows at a time: compute-bound, the widening paid once per panel.
constexpr int64_t PANEL = 16;
struct BF16 { uint16_t bits; };
struct F16 { uint16_t bits; };
inline float widen(float w) { return w; }
inline float widen(int8_t w) { return static_cast<float>(w); }
inline float widen(BF16 w) { uint32_t u = uint32_t(w.bits) << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline float widen(F16 w) { return c10::detail::fp16_ieee_to_fp32_value(w.bits); }

inline void finish(const float* sums, int64_t o0, int64_t n, const float* scale, const float* bias, float* y) {
  for (int64_t j = 0; j < n; ++j) {
    float v = sums[j];
    if (scale) v = v * scale[o0 + j];
    if (bias) v = v + bias[o0 + j];
    y[o0 + j] = v;
  }
}

// Three widening variants of the inner loops, for every format: avx512 (AVX-512F: a panel row
// is one 16-lane vector), avx2 (AVX2 + FMA + F16C: two 8-lane vectors) and scalar (std::fma,
// one lane at a time). Each sums every output in the same order with correctly rounded fused
// multiply-adds, so all three give the same bits; the tests check each this CPU can run
// against scalar. Each is compiled for its instruction set whatever the compiler's default
// target (GCC's target pragma; built by clang, only the scalar loop). The dot-product
// variants, below, replace them for bfloat16 and int8 weights.
struct Scalar {
  static constexpr const char* name = "scalar";
  template <typename T, int R, int G>
  static void direct_block(const float* x, int64_t K, const T* w, float* sums) {
    for (int r = 0; r < R; ++r) for (int64_t j = 0; j < G * PANEL; ++j) sums[r * G * PANEL + j] = 0.f;
    for (int64_t k = 0; k < K; ++k)
      for (int g = 0; g < G; ++g)
        for (int64_t j = 0; j < PANEL; ++j) {
          const float wv = widen(w[g * K * PANEL + k * PANEL + j]);
          for (int r = 0; r < R; ++r) {
            float& acc = sums[r * G * PANEL + g * PANEL + j];
            acc = std::fma(wv, x[r * K + k], acc);
          }
        }
  }
  template <int R>
  static void buffered_block(const float* x, int64_t K, const float* w, float* sums) {
    direct_block<float, R, 1>(x, K, w, sums);
  }
  template <typename T>
  static void widen_panel(const T* w, int64_t n, float* out) {
    for (int64_t i = 0; i < n; ++i) out[i] = widen(w[i]);
  }
};

// ---- dot-product variants: activations in the weights' format ----------------------------
// CPUs with AVX512-BF16 and VNNI multiply 16-bit and 8-bit numbers directly: vdpbf16ps adds
// two bfloat16 products to each float32 lane, vpdpbusd four 8-bit products to each int32
// lane. The `avx512_dot` variant uses them for bfloat16 and int8 weights, with the
// activations in the weights' format too: rounded to bfloat16, or quantized to int8 with one
// scale per QBLOCK values of a row (as llama.cpp's Q8_0 does). These are not the widening
// variants' numbers (each activation is rounded once more), but they too are the same in any
// batch: a row is rounded on its own, integer sums are exact, and float sums run in one
// fixed order. `scalar_dot` is the reference: the same arithmetic one lane at a time, the
// same bits on any CPU. float32 and float16 weights, and layers whose K is not a multiple of
// the instruction's group (2 or 4), keep the widening path.
constexpr int64_t QBLOCK = 32;

// One call's rows, prepared once for the dot kernels.
struct DotRows {
  int64_t K = 0, blocks = 0;
  std::vector<uint32_t> pairs;  // bfloat16 weights: (M, K/2), x[2i] in the low half, x[2i+1] in the high
  std::vector<int8_t> q;        // int8 weights: (M, K), x / qscale rounded to nearest
  std::vector<float> qscale;    // (M, blocks): a block's largest |x| / 127 (NaN where it holds inf or NaN)
  std::vector<int32_t> qsum;    // (M, blocks): the block's sum of q
};

inline uint16_t to_bf16(float f) {  // round to nearest even; a NaN stays a NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline DotRows bf16_rows(const float* x, int64_t M, int64_t K) {
  DotRows d;
  d.K = K;
  d.pairs.resize(M * K / 2);
  uint32_t* out = d.pairs.data();
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin * K / 2; i < end * K / 2; ++i)
      out[i] = uint32_t(to_bf16(x[2 * i])) | uint32_t(to_bf16(x[2 * i + 1])) << 16;
  });
  return d;
}

inline DotRows int8_rows(const float* x, int64_t M, int64_t K) {
  DotRows d;
  d.K = K;
  d.blocks = (K + QBLOCK - 1) / QBLOCK;
  d.q.resize(M * K);
  d.qscale.resize(M * d.blocks);
  d.qsum.resize(M * d.blocks);
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t b = 0; b < d.blocks; ++b) {
        const int64_t k0 = b * QBLOCK, k1 = std::min(K, k0 + QBLOCK);
        const float* xb = x + r * K;
        float amax = 0.f;
        bool finite = true;
        for (int64_t k = k0; k < k1; ++k) {
          finite = finite && std::isfinite(xb[k]);
          amax = std::max(amax, std::fabs(xb[k]));
        }
        const float inv = finite && amax > 0.f ? 127.f / amax : 0.f;
        int32_t sum = 0;
        for (int64_t k = k0; k < k1; ++k) {
          const int32_t v = finite ? int32_t(std::nearbyint(std::min(127.f, std::max(-127.f, xb[k] * inv)))) : 0;
          d.q[r * K + k] = int8_t(v);
          sum += v;
        }
        d.qscale[r * d.blocks + b] = finite ? amax / 127.f : NAN;
        d.qsum[r * d.blocks + b] = sum;
      }
  });
  return d;
}

// The reference: per output lane, vdpbf16ps's arithmetic (the odd product added first, then the
// even one, each sum rounded to nearest; bfloat16 inputs and float32 results that are
// subnormal count as zero) and vpdpbusd's exact integer sums, scaled block by block.
struct ScalarDot {
  static constexpr const char* name = "scalar_dot";
  static float daz(uint16_t bits) {
    if ((bits & 0x7f80u) == 0) bits &= 0x8000u;
    return widen(BF16{bits});
  }
  static float ftz(float v) { return std::fpclassify(v) == FP_SUBNORMAL ? std::copysign(0.f, v) : v; }
  // R rows (from `r0`) by G panels: sums (R, G * 16); weights in their panels (P, K, 16)
  template <int R, int G>
  static void direct_block(const DotRows& x, int64_t r0, const BF16* w, float* sums) {
    const int64_t K = x.K, K2 = K / 2;
    for (int r = 0; r < R; ++r)
      for (int g = 0; g < G; ++g)
        for (int64_t j = 0; j < PANEL; ++j) {
          const BF16* col = w + g * K * PANEL + j;
          const uint32_t* xr = x.pairs.data() + (r0 + r) * K2;
          float acc = 0.f;
          for (int64_t i = 0; i < K2; ++i) {
            acc = ftz(acc + daz(col[(2 * i + 1) * PANEL].bits) * daz(uint16_t(xr[i] >> 16)));
            acc = ftz(acc + daz(col[2 * i * PANEL].bits) * daz(uint16_t(xr[i] & 0xffffu)));
          }
          sums[r * G * PANEL + g * PANEL + j] = acc;
        }
  }
  template <int R, int G>
  static void direct_block(const DotRows& x, int64_t r0, const int8_t* w, float* sums) {
    const int64_t K = x.K;
    for (int r = 0; r < R; ++r)
      for (int g = 0; g < G; ++g)
        for (int64_t j = 0; j < PANEL; ++j) {
          const int8_t* col = w + g * K * PANEL + j;
          const int8_t* xr = x.q.data() + (r0 + r) * K;
          float acc = 0.f;
          for (int64_t b = 0; b < x.blocks; ++b) {
            int32_t isum = 0;
            for (int64_t k = b * QBLOCK; k < std::min(K, (b + 1) * QBLOCK); ++k) isum += int32_t(col[k * PANEL]) * xr[k];
            acc = std::fma(float(isum), x.qscale[(r0 + r) * x.blocks + b], acc);
          }
          sums[r * G * PANEL + g * PANEL + j] = acc;
        }
  }
  // many rows: the panel as it is, read by the same loop
  template <typename T>
  static void prepare_panel(const T* w, int64_t K, T* out) { std::memcpy(out, w, K * PANEL * sizeof(T)); }
  template <typename T, int R>
  static void buffered_block(const DotRows& x, int64_t r0, const T* panel, float* sums) {
    direct_block<R, 1>(x, r0, panel, sums);
  }
};

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)  // GCC's target pragmas
#include <immintrin.h>
#define GPTSERVE_X86 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
struct Avx2 {
  static constexpr const char* name = "avx2";
  static __m256 widen8(const float* w) { return _mm256_loadu_ps(w); }
  static __m256 widen8(const BF16* w) {
    const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
  }
  static __m256 widen8(const F16* w) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))); }
  static __m256 widen8(const int8_t* w) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w))));
  }
  // R rows by G panels, widened in registers: sums (R, G * 16)
  template <typename T, int R, int G>
  static void direct_block(const float* x, int64_t K, const T* w, float* sums) {
    __m256 acc[R][G][2];
    for (int r = 0; r < R; ++r) for (int g = 0; g < G; ++g) acc[r][g][0] = acc[r][g][1] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; ++k) {
      __m256 xb[R];
      for (int r = 0; r < R; ++r) xb[r] = _mm256_broadcast_ss(x + r * K + k);
      for (int g = 0; g < G; ++g) {
        const T* p = w + g * K * PANEL + k * PANEL;
        const __m256 lo = widen8(p), hi = widen8(p + 8);
        for (int r = 0; r < R; ++r) {
          acc[r][g][0] = _mm256_fmadd_ps(lo, xb[r], acc[r][g][0]);
          acc[r][g][1] = _mm256_fmadd_ps(hi, xb[r], acc[r][g][1]);
        }
      }
    }
    for (int r = 0; r < R; ++r) for (int g = 0; g < G; ++g) {
      _mm256_storeu_ps(sums + r * G * PANEL + g * PANEL, acc[r][g][0]);
      _mm256_storeu_ps(sums + r * G * PANEL + g * PANEL + 8, acc[r][g][1]);
    }
  }
  // R rows by one panel already widened to float32 (K, 16): sums (R, 16)
  template <int R>
  static void buffered_block(const float* x, int64_t K, const float* w, float* sums) {
    __m256 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; ++k) {
      const __m256 lo = _mm256_loadu_ps(w + k * PANEL), hi = _mm256_loadu_ps(w + k * PANEL + 8);
      for (int r = 0; r < R; ++r) {
        const __m256 xb = _mm256_broadcast_ss(x + r * K + k);
        acc[r][0] = _mm256_fmadd_ps(lo, xb, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(hi, xb, acc[r][1]);
      }
    }
    for (int r = 0; r < R; ++r) {
      _mm256_storeu_ps(sums + r * PANEL, acc[r][0]);
      _mm256_storeu_ps(sums + r * PANEL + 8, acc[r][1]);
    }
  }
  template <typename T>
  static void widen_panel(const T* w, int64_t n, float* out) {  // n: a multiple of 16
    for (int64_t i = 0; i < n; i += 8) _mm256_storeu_ps(out + i, widen8(w + i));
  }
};
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma,f16c")
struct Avx512 {
  static constexpr const char* name = "avx512";
  static __m512 widen16(const float* w) { return _mm512_loadu_ps(w); }
  static __m512 widen16(const BF16* w) {
    const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
  }
  static __m512 widen16(const F16* w) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w))); }
  static __m512 widen16(const int8_t* w) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))));
  }
  template <typename T, int R, int G>
  static void direct_block(const float* x, int64_t K, const T* w, float* sums) {
    __m512 acc[R][G];
    for (int r = 0; r < R; ++r) for (int g = 0; g < G; ++g) acc[r][g] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; ++k) {
      __m512 xb[R];
      for (int r = 0; r < R; ++r) xb[r] = _mm512_set1_ps(x[r * K + k]);
      for (int g = 0; g < G; ++g) {
        const __m512 wv = widen16(w + g * K * PANEL + k * PANEL);
        for (int r = 0; r < R; ++r) acc[r][g] = _mm512_fmadd_ps(wv, xb[r], acc[r][g]);
      }
    }
    for (int r = 0; r < R; ++r) for (int g = 0; g < G; ++g) _mm512_storeu_ps(sums + r * G * PANEL + g * PANEL, acc[r][g]);
  }
  template <int R>
  static void buffered_block(const float* x, int64_t K, const float* w, float* sums) {
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; ++k) {
      const __m512 wv = _mm512_loadu_ps(w + k * PANEL);
      for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(wv, _mm512_set1_ps(x[r * K + k]), acc[r]);
    }
    for (int r = 0; r < R; ++r) _mm512_storeu_ps(sums + r * PANEL, acc[r]);
  }
  template <typename T>
  static void widen_panel(const T* w, int64_t n, float* out) {  // n: a multiple of 16
    for (int64_t i = 0; i < n; i += 16) _mm512_storeu_ps(out + i, widen16(w + i));
  }
};
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni,avx512bf16,avx2,fma,f16c")
struct Avx512Dot {
  static constexpr const char* name = "avx512_dot";
  // A panel's rows k, k+1 of bfloat16 (64 contiguous bytes) -> lane j: (w[k][j], w[k+1][j])
  static __m512i pairs(const BF16* w) {
    alignas(64) static const uint16_t order[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                   8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    return _mm512_permutexvar_epi16(_mm512_load_si512(order), _mm512_loadu_si512(w));
  }
  // rows k..k+3 of int8 (64 bytes) -> lane j: (w[k][j], ..., w[k+3][j]), each + 128 (vpdpbusd's
  // first operand is unsigned; the sums are corrected by 128 * the block's sum of x)
  static __m512i quads(const int8_t* w) {
    alignas(64) static const uint8_t order[64] = {
        0,  16, 32, 48, 1,  17, 33, 49, 2,  18, 34, 50, 3,  19, 35, 51, 4,  20, 36, 52, 5,  21,
        37, 53, 6,  22, 38, 54, 7,  23, 39, 55, 8,  24, 40, 56, 9,  25, 41, 57, 10, 26, 42, 58,
        11, 27, 43, 59, 12, 28, 44, 60, 13, 29, 45, 61, 14, 30, 46, 62, 15, 31, 47, 63};
    return _mm512_xor_si512(_mm512_permutexvar_epi8(_mm512_load_si512(order), _mm512_loadu_si512(w)),
                            _mm512_set1_epi8(char(0x80)));
  }
  // R rows by G panels, `load(g, i)` giving panel g's pairs (or quads) i: sums (R, G * 16)
  template <int R, int G, class Load>
  static void bf16_block(const DotRows& x, int64_t r0, Load load, float* sums) {
    const int64_t K2 = x.K / 2;
    __m512 acc[R][G];
    for (int r = 0; r < R; ++r) for (int g = 0; g < G; ++g) acc[r][g] = _mm512_setzero_ps();
    const uint32_t* xr = x.pairs.data() + r0 * K2;
    for (int64_t i = 0; i < K2; ++i) {
      __m512i wv[G];
      for (int g = 0; g < G; ++g) wv[g] = load(g, i);
      for (int r = 0; r < R; ++r) {
        const __m512bh xb = (__m512bh)_mm512_set1_epi32(int(xr[r * K2 + i]));
        for (int g = 0; g < G; ++g) acc[r][g] = _mm512_dpbf16_ps(acc[r][g], (__m512bh)wv[g], xb);
      }
    }
    for (int r = 0; r < R; ++r) for (int g = 0; g < G; ++g) _mm512_storeu_ps(sums + r * G * PANEL + g * PANEL, acc[r][g]);
  }
  template <int R, int G, class Load>
  static void int8_block(const DotRows& x, int64_t r0, Load load, float* sums) {
    const int64_t K = x.K;
    __m512 acc[R][G];
    for (int r = 0; r < R; ++r) for (int g = 0; g < G; ++g) acc[r][g] = _mm512_setzero_ps();
    for (int64_t b = 0; b < x.blocks; ++b) {
      __m512i isum[R][G];
      for (int r = 0; r < R; ++r) for (int g = 0; g < G; ++g) isum[r][g] = _mm512_setzero_si512();
      for (int64_t i = b * QBLOCK / 4; i < std::min(K, (b + 1) * QBLOCK) / 4; ++i) {
        __m512i wv[G];
        for (int g = 0; g < G; ++g) wv[g] = load(g, i);
        for (int r = 0; r < R; ++r) {
          int32_t four;
          std::memcpy(&four, x.q.data() + (r0 + r) * K + 4 * i, 4);
          const __m512i xb = _mm512_set1_epi32(four);
          for (int g = 0; g < G; ++g) isum[r][g] = _mm512_dpbusd_epi32(isum[r][g], wv[g], xb);
        }
      }
      for (int r = 0; r < R; ++r) {
        const __m512i offset = _mm512_set1_epi32(128 * x.qsum[(r0 + r) * x.blocks + b]);
        const __m512 s = _mm512_set1_ps(x.qscale[(r0 + r) * x.blocks + b]);
        for (int g = 0; g < G; ++g)
          acc[r][g] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(isum[r][g], offset)), s, acc[r][g]);
      }
    }
    for (int r = 0; r < R; ++r) for (int g = 0; g < G; ++g) _mm512_storeu_ps(sums + r * G * PANEL + g * PANEL, acc[r][g]);
  }
  // few rows: the panels as they are held, regrouped in registers
  template <int R, int G>
  static void direct_block(const DotRows& x, int64_t r0, const BF16* w, float* sums) {
    const int64_t K = x.K;
    bf16_block<R, G>(x, r0, [&](int g, int64_t i) { return pairs(w + g * K * PANEL + 2 * i * PANEL); }, sums);
  }
  template <int R, int G>
  static void direct_block(const DotRows& x, int64_t r0, const int8_t* w, float* sums) {
    const int64_t K = x.K;
    int8_block<R, G>(x, r0, [&](int g, int64_t i) { return quads(w + g * K * PANEL + 4 * i * PANEL); }, sums);
  }
  // many rows: a panel regrouped once into a buffer, then read as it is
  static void prepare_panel(const BF16* w, int64_t K, BF16* out) {
    for (int64_t i = 0; i < K / 2; ++i) _mm512_storeu_si512(out + 2 * i * PANEL, pairs(w + 2 * i * PANEL));
  }
  static void prepare_panel(const int8_t* w, int64_t K, int8_t* out) {
    for (int64_t i = 0; i < K / 4; ++i) _mm512_storeu_si512(out + 4 * i * PANEL, quads(w + 4 * i * PANEL));
  }
  // Written apart from bf16_block and int8_block: through them at G = 1 (with [R][1] or flat
  // [R * G] sums alike) GCC keeps the sums in memory, a store and a load on every step of
  // their chains, which measured 1.9x (bfloat16) and 2.3x (int8) slower at 64 rows.
  template <typename T, int R>
  static void buffered_block(const DotRows& x, int64_t r0, const T* panel, float* sums) {
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    if constexpr (std::is_same<T, BF16>::value) {
      const int64_t K2 = x.K / 2;
      const uint32_t* xr = x.pairs.data() + r0 * K2;
      for (int64_t i = 0; i < K2; ++i) {
        const __m512bh wv = (__m512bh)_mm512_loadu_si512(panel + 2 * i * PANEL);
        for (int r = 0; r < R; ++r)
          acc[r] = _mm512_dpbf16_ps(acc[r], wv, (__m512bh)_mm512_set1_epi32(int(xr[r * K2 + i])));
      }
    } else {
      const int64_t K = x.K;
      const int8_t* xr = x.q.data() + r0 * K;
      for (int64_t b = 0; b < x.blocks; ++b) {
        __m512i isum[R];
        for (int r = 0; r < R; ++r) isum[r] = _mm512_setzero_si512();
        for (int64_t i = b * QBLOCK / 4; i < std::min(K, (b + 1) * QBLOCK) / 4; ++i) {
          const __m512i wv = _mm512_loadu_si512(panel + 4 * i * PANEL);
          for (int r = 0; r < R; ++r) {
            int32_t four;
            std::memcpy(&four, xr + r * K + 4 * i, 4);
            isum[r] = _mm512_dpbusd_epi32(isum[r], wv, _mm512_set1_epi32(four));
          }
        }
        for (int r = 0; r < R; ++r) {
          const __m512i offset = _mm512_set1_epi32(128 * x.qsum[(r0 + r) * x.blocks + b]);
          acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(isum[r], offset)),
                                   _mm512_set1_ps(x.qscale[(r0 + r) * x.blocks + b]), acc[r]);
        }
      }
    }
    for (int r = 0; r < R; ++r) _mm512_storeu_ps(sums + r * PANEL, acc[r]);
  }
};
#pragma GCC pop_options
#endif

// The variants this CPU can run, best first, and the one in use (best, unless
// GPTSERVE_CPU_KERNELS names another, or a test chose one with use_variant)
std::vector<std::string> variants() {
  std::vector<std::string> names;
#ifdef GPTSERVE_X86
  __builtin_cpu_init();
  const bool dot = __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                   __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512vnni") &&
                   __builtin_cpu_supports("avx512bf16");
  if (dot && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    names.push_back(Avx512Dot::name);
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
      __builtin_cpu_supports("avx2"))
    names.push_back(Avx512::name);
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    names.push_back(Avx2::name);
#endif
  names.push_back(Scalar::name);
  names.push_back(ScalarDot::name);  // the dot variants' reference, any CPU
  return names;
}

std::string& variant_in_use() {
  static std::string chosen = [] {
    const auto names = variants();
    const char* forced = std::getenv("GPTSERVE_CPU_KERNELS");
    if (forced && std::find(names.begin(), names.end(), std::string(forced)) != names.end()) return std::string(forced);
    return names.front();
  }();
  return chosen;
}

void use_variant(const std::string& name) {
  const auto names = variants();
  TORCH_CHECK(std::find(names.begin(), names.end(), name) != names.end(), "this CPU cannot run the ", name,
              " kernels");
  variant_in_use() = name;
}

std::string simd() { return variant_in_use(); }

// Up to four rows: `block(G, w, sums)` computes R rows by G panels from the panels at w,
// several panels at once to keep 8 to 12 independent sums in flight.
template <int R, typename T, class Block>
void few_rows(const T* w, int64_t K, int64_t P, const float* scale, const float* bias, float* y, int64_t N,
              Block block) {
  constexpr int G = R == 1 ? 4 : R == 2 ? 3 : R == 3 ? 2 : 1;
  const int64_t groups = (P + G - 1) / G;
  at::parallel_for(0, groups, 4, [&](int64_t begin, int64_t end) {
    float sums[R * 4 * PANEL];
    for (int64_t gi = begin; gi < end; ++gi) {
      const int64_t p0 = gi * G, here = std::min<int64_t>(G, P - p0);
      const T* wp = w + p0 * K * PANEL;
      switch (here) {  // the last group may hold fewer panels
        case 4: block(std::integral_constant<int, 4>{}, wp, sums); break;
        case 3: block(std::integral_constant<int, 3>{}, wp, sums); break;
        case 2: block(std::integral_constant<int, 2>{}, wp, sums); break;
        default: block(std::integral_constant<int, 1>{}, wp, sums); break;
      }
      for (int r = 0; r < R; ++r)
        for (int64_t q = 0; q < here; ++q) {
          const int64_t o0 = (p0 + q) * PANEL;
          if (o0 < N) finish(sums + r * here * PANEL + q * PANEL, o0, std::min<int64_t>(PANEL, N - o0), scale, bias, y + r * N);
        }
    }
  });
}

// More rows: each thread takes a panel, `prepare(w, buffer)` gives it in the form the block reads
// (widened to float32, or regrouped for the dot instructions), then `block(R, r0, panel, sums)`
// multiplies rows r0.. by it, six at a time.
template <typename B, typename T, class Prepare, class Block>
void many_rows(int64_t M, int64_t K, const T* w, int64_t P, const float* scale, const float* bias, float* y, int64_t N,
               Prepare prepare, Block block) {
  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    std::vector<B> buffer;
    float sums[6 * PANEL];
    for (int64_t p = begin; p < end; ++p) {
      const B* panel = prepare(w + p * K * PANEL, buffer);
      const int64_t o0 = p * PANEL, width = std::min<int64_t>(PANEL, N - o0);
      for (int64_t r0 = 0; r0 < M; r0 += 6) {
        const int64_t rows = std::min<int64_t>(6, M - r0);
        switch (rows) {
          case 6: block(std::integral_constant<int, 6>{}, r0, panel, sums); break;
          case 5: block(std::integral_constant<int, 5>{}, r0, panel, sums); break;
          case 4: block(std::integral_constant<int, 4>{}, r0, panel, sums); break;
          case 3: block(std::integral_constant<int, 3>{}, r0, panel, sums); break;
          case 2: block(std::integral_constant<int, 2>{}, r0, panel, sums); break;
          default: block(std::integral_constant<int, 1>{}, r0, panel, sums); break;
        }
        for (int64_t r = 0; r < rows; ++r) finish(sums + r * PANEL, o0, width, scale, bias, y + (r0 + r) * N);
      }
    }
  });
}

template <class ISA, typename T, int R>
void widening_few_rows(const float* x, int64_t K, const T* w, int64_t P, const float* s, const float* b, float* y,
                       int64_t N) {
  few_rows<R>(w, K, P, s, b, y, N, [&](auto g, const T* wp, float* sums) {
    ISA::template direct_block<T, R, decltype(g)::value>(x, K, wp, sums);
  });
}

template <class ISA, typename T>
void widening_linear(const float* x, int64_t M, int64_t K, const T* w, int64_t P, const float* s, const float* b,
                     float* y, int64_t N) {
  switch (M) {
    case 1: return widening_few_rows<ISA, T, 1>(x, K, w, P, s, b, y, N);
    case 2: return widening_few_rows<ISA, T, 2>(x, K, w, P, s, b, y, N);
    case 3: return widening_few_rows<ISA, T, 3>(x, K, w, P, s, b, y, N);
    case 4: return widening_few_rows<ISA, T, 4>(x, K, w, P, s, b, y, N);
  }
  const auto widened = [&](const T* wp, std::vector<float>& buffer) -> const float* {
    if constexpr (std::is_same<T, float>::value) {
      return wp;
    } else {
      buffer.resize(K * PANEL);
      ISA::widen_panel(wp, K * PANEL, buffer.data());
      return buffer.data();
    }
  };
  many_rows<float>(M, K, w, P, s, b, y, N, widened, [&](auto rows, int64_t r0, const float* panel, float* sums) {
    ISA::template buffered_block<decltype(rows)::value>(x + r0 * K, K, panel, sums);
  });
}

template <class ISA, typename T, int R>
void dot_few_rows(const DotRows& x, const T* w, int64_t P, const float* s, const float* b, float* y, int64_t N) {
  few_rows<R>(w, x.K, P, s, b, y, N, [&](auto g, const T* wp, float* sums) {
    ISA::template direct_block<R, decltype(g)::value>(x, 0, wp, sums);
  });
}

template <class ISA, typename T>
void dot_linear(const float* xf, int64_t M, int64_t K, const T* w, int64_t P, const float* s, const float* b, float* y,
                int64_t N) {
  const DotRows x = std::is_same<T, BF16>::value ? bf16_rows(xf, M, K) : int8_rows(xf, M, K);
  switch (M) {
    case 1: return dot_few_rows<ISA, T, 1>(x, w, P, s, b, y, N);
    case 2: return dot_few_rows<ISA, T, 2>(x, w, P, s, b, y, N);
    case 3: return dot_few_rows<ISA, T, 3>(x, w, P, s, b, y, N);
    case 4: return dot_few_rows<ISA, T, 4>(x, w, P, s, b, y, N);
  }
  const auto regrouped = [&](const T* wp, std::vector<T>& buffer) -> const T* {
    buffer.resize(K * PANEL);
    ISA::prepare_panel(wp, K, buffer.data());
    return buffer.data();
  };
  many_rows<T>(M, K, w, P, s, b, y, N, regrouped, [&](auto rows, int64_t r0, const T* panel, float* sums) {
    ISA::template buffered_block<T, decltype(rows)::value>(x, r0, panel, sums);
  });
}

// bfloat16 weights take the dot path where K is even, int8 ones where K is a multiple of 4
template <typename T>
constexpr int64_t dot_group() { return std::is_same<T, BF16>::value ? 2 : std::is_same<T, int8_t>::value ? 4 : 0; }

template <typename T>
void panel_linear_t(const float* x, int64_t M, int64_t K, const T* w, int64_t P, const float* s,
                    const float* b, float* y, int64_t N) {
  const std::string& v = variant_in_use();
  if constexpr (dot_group<T>() > 0) {
    if (K % dot_group<T>() == 0) {
#ifdef GPTSERVE_X86
      if (v == Avx512Dot::name) return dot_linear<Avx512Dot, T>(x, M, K, w, P, s, b, y, N);
#endif
      if (v == ScalarDot::name) return dot_linear<ScalarDot, T>(x, M, K, w, P, s, b, y, N);
    }
  }
#ifdef GPTSERVE_X86
  if (v == Avx512::name || v == Avx512Dot::name) return widening_linear<Avx512, T>(x, M, K, w, P, s, b, y, N);
  if (v == Avx2::name) return widening_linear<Avx2, T>(x, M, K, w, P, s, b, y, N);
#endif
  return widening_linear<Scalar, T>(x, M, K, w, P, s, b, y, N);
}

#define GPTSERVE_BY_FORMAT(dtype, F, ...)                                                          \
  switch (dtype) {                                                                               \
    case torch::kFloat32: { using T = float; F(__VA_ARGS__); break; }                            \
    case torch::kBFloat16: { using T = BF16; F(__VA_ARGS__); break; }                            \
    case torch::kFloat16: { using T = F16; F(__VA_ARGS__); break; }                              \
    case torch::kInt8: { using T = int8_t; F(__VA_ARGS__); break; }                              \
    default: TORCH_CHECK(false, "weights: float32, bfloat16, float16 or int8");                   \
  }

void check_panels(const torch::Tensor& panels, const c10::optional<torch::Tensor>& scale, int64_t N) {
  TORCH_CHECK(panels.is_contiguous() && panels.dim() == 3 && panels.size(2) == PANEL, "panels: (P, K, 16) contiguous");
  TORCH_CHECK(N > 0 && (N + PANEL - 1) / PANEL == panels.size(0), "out_features must fill the panels");
  TORCH_CHECK((panels.dtype() == torch::kInt8) == scale.has_value(), "int8 weights, and only they, take a scale");
  if (scale.has_value())
    TORCH_CHECK(scale->is_contiguous() && scale->dtype() == torch::kFloat32 && scale->numel() >= N, "scale: (N,) float32");
}

// x (M, K) float32; panels (P, K, 16); scale (>= N,) float32 for int8 weights; bias (N,) float32 -> (M, N) float32
torch::Tensor panel_linear(torch::Tensor x, torch::Tensor panels, c10::optional<torch::Tensor> scale,
                           c10::optional<torch::Tensor> bias, int64_t N) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.size(1) == panels.size(1), "x: (M, K) float32");
  check_panels(panels, scale, N);
  if (bias.has_value()) TORCH_CHECK(bias->is_contiguous() && bias->numel() == N, "bias: (N,) float32");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), P = panels.size(0);
  auto y = torch::empty({M, N}, x.options());
  if (M == 0) return y;
  const float* s = scale.has_value() ? scale->data_ptr<float>() : nullptr;
  const float* b = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const void* wp = panels.data_ptr();
#define GPTSERVE_CALL(...) panel_linear_t<T>(xp, M, K, static_cast<const T*>(wp), P, s, b, yp, N)
  GPTSERVE_BY_FORMAT(panels.scalar_type(), GPTSERVE_CALL)
#undef GPTSERVE_CALL
  return y;
}

template <typename T>
void gather_rows(const T* w, int64_t K, const int64_t* ids, int64_t n, const float* scale, float* out) {
  at::parallel_for(0, n, 8, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t id = ids[i];
      const T* col = w + (id / PANEL) * K * PANEL + id % PANEL;
      const float s = scale ? scale[id] : 1.f;
      for (int64_t k = 0; k < K; ++k) {
        const float v = widen(col[k * PANEL]);
        out[i * K + k] = scale ? v * s : v;
      }
    }
  });
}

// The weight's rows (output channels) `ids` in float32, scaled: (n,) int64 -> (n, K). A tied
// embedding's lookup, read from the LM head's panels.
torch::Tensor panel_rows(torch::Tensor panels, c10::optional<torch::Tensor> scale, torch::Tensor ids, int64_t N) {
  check_panels(panels, scale, N);
  TORCH_CHECK(ids.dtype() == torch::kLong, "ids: int64");
  ids = ids.contiguous();
  const int64_t n = ids.numel(), K = panels.size(1);
  const int64_t* ip = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(ip[i] >= 0 && ip[i] < N, "id ", ip[i], " out of range [0, ", N, ")");
  auto out = torch::empty({n, K}, torch::kFloat32);
  const float* s = scale.has_value() ? scale->data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const void* wp = panels.data_ptr();
#define GPTSERVE_CALL(...) gather_rows<T>(static_cast<const T*>(wp), K, ip, n, s, op)
  GPTSERVE_BY_FORMAT(panels.scalar_type(), GPTSERVE_CALL)
#undef GPTSERVE_CALL
  return out;
}

// ---- LoRA adapters: each row's own low-rank update ---------------------------------------
// y[n] += B_s (A_s x[n]) for the adapter slot s = slots[n] of each row (-1: none), from the
// slots' stacked weights: a (S, K, R) (A transposed) and b (S, R, O) (B transposed, its
// scaling folded in), ranks (S,): the first ranks[s] of R used. Punica's BGMV (batched
// gather matrix-vector): one matrix-vector product per row with the weights its slot names,
// so a batch may mix adapters and a row's result never depends on the others in its batch.
// h = A x for one row: a (K, R), A transposed, so each input adds a row of R values (axpys
// over the rank). The slots' ranks are padded to R with zeros, so R is the trip count, and the
// common widths are compiled with it fixed: the rank loop then is whole vector registers.
template <int64_t R>
void shrink_fixed(const float* x, const float* a, int64_t K, float* h) {
  float acc[R] = {};
  for (int64_t k = 0; k < K; ++k) {
    const float xk = x[k];
    const float* ak = a + k * R;
    for (int64_t j = 0; j < R; ++j) acc[j] += xk * ak[j];
  }
  for (int64_t j = 0; j < R; ++j) h[j] = acc[j];
}

inline void shrink(const float* x, const float* a, int64_t K, int64_t R, float* h) {
  switch (R) {
    case 8: return shrink_fixed<8>(x, a, K, h);
    case 16: return shrink_fixed<16>(x, a, K, h);
    case 32: return shrink_fixed<32>(x, a, K, h);
    case 64: return shrink_fixed<64>(x, a, K, h);
    default:
      std::fill(h, h + R, 0.f);
      for (int64_t k = 0; k < K; ++k) {
        const float xk = x[k];
        const float* ak = a + k * R;
        for (int64_t j = 0; j < R; ++j) h[j] += xk * ak[j];
      }
  }
}

void lora_add(torch::Tensor x, torch::Tensor y, torch::Tensor slots, torch::Tensor a, torch::Tensor b,
              torch::Tensor ranks) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(), "x: (N, K) float32, contiguous");
  TORCH_CHECK(y.dtype() == torch::kFloat32 && y.dim() == 2 && y.is_contiguous() && y.size(0) == x.size(0),
              "y: (N, O) float32, contiguous");
  TORCH_CHECK(a.dtype() == torch::kFloat32 && a.is_contiguous() && a.dim() == 3 && a.size(1) == x.size(1),
              "a: (S, K, R) float32, contiguous");
  TORCH_CHECK(b.dtype() == torch::kFloat32 && b.is_contiguous() && b.dim() == 3 && b.size(0) == a.size(0) &&
              b.size(1) == a.size(2) && b.size(2) == y.size(1), "b: (S, R, O) float32, contiguous");
  TORCH_CHECK(slots.dtype() == torch::kLong && slots.numel() == x.size(0) && slots.is_contiguous(), "slots: (N,) int64");
  TORCH_CHECK(ranks.dtype() == torch::kLong && ranks.numel() == a.size(0) && ranks.is_contiguous(), "ranks: (S,) int64");
  const int64_t N = x.size(0), K = x.size(1), O = y.size(1), S = a.size(0), R = a.size(2);
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* rp = ranks.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) TORCH_CHECK(sp[n] >= -1 && sp[n] < S, "slot ", sp[n], " out of range");
  const float* xp = x.data_ptr<float>();
  const float* ap = a.data_ptr<float>();
  const float* bp = b.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> h(R), d(O);
    for (int64_t n = begin; n < end; ++n) {
      const int64_t s = sp[n];
      const int64_t r = s < 0 ? 0 : std::min(rp[s], R);
      if (r == 0) continue;
      shrink(xp + n * K, ap + s * K * R, K, R, h.data());
      std::fill(d.begin(), d.end(), 0.f);
      const float* bs = bp + s * R * O;
      for (int64_t j = 0; j < r; ++j) {  // d = B h, as axpys over the outputs (rows past the rank: zeros, skipped)
        const float hj = h[j];
        const float* bj = bs + j * O;
        for (int64_t o = 0; o < O; ++o) d[o] += hj * bj[o];
      }
      float* yn = yp + n * O;
      for (int64_t o = 0; o < O; ++o) yn[o] += d[o];
    }
  });
}

// ---- a whole decode step in one call -----------------------------------------------------
// At a few rows a decode step's matmuls read the weights once and are done in a few
// milliseconds; driven from Python, the ~25 other operations of each layer (layer norms,
// views, the K/V write, attention, GELU, residual adds) cost as much again in dispatch. Here
// the layers run in a loop in C++: the same ATen operations (layer norm, GELU, add) and the
// same kernels (panel_linear, paged_decode) the Python path runs, so the same numbers.
struct PanelWeight {
  torch::Tensor panels;
  c10::optional<torch::Tensor> scale, bias;
  int64_t n;
  torch::Tensor operator()(const torch::Tensor& x) const { return panel_linear(x, panels, scale, bias, n); }
};

// A linear layer's adapter slots (lora_add's a, b, ranks); unset where adapters are off.
struct LoraWeight {
  c10::optional<torch::Tensor> a, b, ranks;
  // y after x's low-rank updates, for rows whose slot (slots[n]) holds an adapter
  torch::Tensor add(const torch::Tensor& x, torch::Tensor y, const c10::optional<torch::Tensor>& slots) const {
    if (slots.has_value() && a.has_value()) lora_add(x.contiguous(), y, *slots, *a, *b, *ranks);
    return y;
  }
};

struct DecodeLayer {
  torch::Tensor ln1_w, ln1_b, ln2_w, ln2_b;
  PanelWeight qkv, proj, fc, out;
  double scale;
  LoraWeight lora_qkv, lora_proj, lora_fc, lora_out;
};

class DecodeStack {
 public:
  DecodeStack(torch::Tensor head_panels, c10::optional<torch::Tensor> head_scale, int64_t vocab, torch::Tensor wpe,
              torch::Tensor lnf_w, torch::Tensor lnf_b, int64_t n_head, double eps)
      : head_{head_panels, head_scale, c10::nullopt, vocab}, wpe_(wpe), lnf_w_(lnf_w), lnf_b_(lnf_b),
        n_head_(n_head), eps_(eps) {}

  void add_layer(torch::Tensor ln1_w, torch::Tensor ln1_b, torch::Tensor ln2_w, torch::Tensor ln2_b,
                 std::vector<c10::optional<torch::Tensor>> qkv, std::vector<c10::optional<torch::Tensor>> proj,
                 std::vector<c10::optional<torch::Tensor>> fc, std::vector<c10::optional<torch::Tensor>> out,
                 std::vector<int64_t> widths, double scale) {
    auto weight = [](const std::vector<c10::optional<torch::Tensor>>& t, int64_t n) {
      TORCH_CHECK(t.size() == 3 && t[0].has_value(), "a layer's weight: [panels, scale, bias]");
      return PanelWeight{*t[0], t[1], t[2], n};
    };
    TORCH_CHECK(widths.size() == 4, "widths: qkv, proj, fc, out");
    layers_.push_back({ln1_w, ln1_b, ln2_w, ln2_b, weight(qkv, widths[0]), weight(proj, widths[1]),
                       weight(fc, widths[2]), weight(out, widths[3]), scale});
  }

  // A layer's adapter slots (the model's LoRA stack, shared: slots loaded later are seen):
  // for qkv, proj, fc and out, [a, b, ranks] each.
  void set_lora(int64_t layer, std::vector<std::vector<torch::Tensor>> weights) {
    TORCH_CHECK(layer >= 0 && layer < int64_t(layers_.size()) && weights.size() == 4, "set_lora: a layer, 4 weights");
    DecodeLayer& L = layers_[layer];
    LoraWeight* targets[4] = {&L.lora_qkv, &L.lora_proj, &L.lora_fc, &L.lora_out};
    for (int i = 0; i < 4; ++i) {
      TORCH_CHECK(weights[i].size() == 3, "a LoRA weight: [a, b, ranks]");
      *targets[i] = LoraWeight{weights[i][0], weights[i][1], weights[i][2]};
    }
  }

  // ids, positions, slot_mapping, context_lens (B,) int64; block_tables (B, M) int64;
  // kv (layers, 2, blocks, block_size, H, D) float32; lora_slots (B,) int64, each row's
  // adapter slot (-1: none), or None -> the final hidden states (B, C)
  torch::Tensor forward(torch::Tensor ids, torch::Tensor positions, torch::Tensor kv, torch::Tensor slot_mapping,
                        torch::Tensor block_tables, torch::Tensor context_lens,
                        c10::optional<torch::Tensor> lora_slots) const {
    TORCH_CHECK(kv.is_contiguous() && kv.dtype() == torch::kFloat32 && kv.size(0) == int64_t(layers_.size()),
                "kv: (layers, 2, blocks, block_size, H, D) float32, contiguous");
    const int64_t B = ids.size(0), C = wpe_.size(1), H = n_head_, D = C / H;
    const int64_t* slots = slot_mapping.data_ptr<int64_t>();
    const int64_t pool_slots = kv.size(2) * kv.size(3);
    for (int64_t b = 0; b < B; ++b) TORCH_CHECK(slots[b] >= 0 && slots[b] < pool_slots, "slot out of range");
    auto x = panel_rows(head_.panels, head_.scale, ids, head_.n).add_(wpe_.index_select(0, positions));
    for (size_t l = 0; l < layers_.size(); ++l) {
      const DecodeLayer& L = layers_[l];
      auto k_cache = kv[l][0], v_cache = kv[l][1];
      auto ln1 = at::layer_norm(x, {C}, L.ln1_w, L.ln1_b, eps_);
      auto qkv = L.lora_qkv.add(ln1, L.qkv(ln1), lora_slots);  // (B, 3C)
      float* kp = k_cache.data_ptr<float>();
      float* vp = v_cache.data_ptr<float>();
      const float* row = qkv.data_ptr<float>();
      for (int64_t b = 0; b < B; ++b) {
        std::memcpy(kp + slots[b] * C, row + b * 3 * C + C, C * sizeof(float));
        std::memcpy(vp + slots[b] * C, row + b * 3 * C + 2 * C, C * sizeof(float));
      }
      auto q = qkv.narrow(1, 0, C).reshape({B, H, D});
      auto y = paged_decode(q, k_cache, v_cache, block_tables, context_lens, L.scale);
      auto attended = y.reshape({B, C});
      x.add_(L.lora_proj.add(attended, L.proj(attended), lora_slots));
      auto ln2 = at::layer_norm(x, {C}, L.ln2_w, L.ln2_b, eps_);
      auto h = L.lora_fc.add(ln2, L.fc(ln2), lora_slots);
      at::gelu_(h, "tanh");
      x.add_(L.lora_out.add(h, L.out(h), lora_slots));
    }
    return at::layer_norm(x, {C}, lnf_w_, lnf_b_, eps_);
  }

 private:
  PanelWeight head_;
  torch::Tensor wpe_, lnf_w_, lnf_b_;
  int64_t n_head_;
  double eps_;
  std::vector<DecodeLayer> layers_;
};

// The GIL is released while a kernel runs: the event loop sends SSE chunks while a step's kernels run.
// wrap_pybind_function_no_gil is torch's own wrapper (the error and warning translation load_inline
// puts around the functions it binds) plus a py::gil_scoped_release inside it, so errors are still
// turned into Python ones with the GIL held.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", torch::wrap_pybind_function_no_gil(paged_decode), "paged_decode");
  m.def("row_argmax", torch::wrap_pybind_function_no_gil(row_argmax), "row_argmax");
  m.def("panel_linear", torch::wrap_pybind_function_no_gil(panel_linear), "panel_linear");
  m.def("panel_rows", torch::wrap_pybind_function_no_gil(panel_rows), "panel_rows");
  m.def("lora_add", torch::wrap_pybind_function_no_gil(lora_add), "lora_add");
  m.def("simd", &simd, "simd");
  m.def("variants", &variants, "variants");
  m.def("use_variant", &use_variant, "use_variant");
  py::class_<DecodeStack>(m, "DecodeStack")
      .def(py::init<torch::Tensor, c10::optional<torch::Tensor>, int64_t, torch::Tensor, torch::Tensor, torch::Tensor,
                    int64_t, double>())
      .def("add_layer", &DecodeStack::add_layer)
      .def("set_lora", &DecodeStack::set_lora)
      .def("forward", &DecodeStack::forward, py::call_guard<py::gil_scoped_release>());
}

