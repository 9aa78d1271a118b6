// gptserve's CPU kernels: paged decode attention, the greedy argmax, and linear layers on a
// few rows with weights in 32, 16 or 8 bits. Compiled on first use by cpu_kernels.py (beside
// this folder), which says why each exists and when the PyTorch path runs instead.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
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

// ---- linear layers on 1 to 4 rows, weights in 32, 16 or 8 bits --------------------------
// A decode step at low concurrency multiplies a few rows by every weight: bound by reading
// the weights, so weights held in fewer bytes are read faster. Each weight is widened to
// float32 in registers (bfloat16: shifted; float16: F16C; int8: sign-extended, the output
// channel's scale applied to the sum) and the math is float32.
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
struct BF16 { uint16_t bits; };
struct F16 { uint16_t bits; };
inline __m256 widen8(const float* w) { return _mm256_loadu_ps(w); }
inline __m256 widen8(const BF16* w) {
  const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
}
inline __m256 widen8(const F16* w) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))); }
inline __m256 widen8(const int8_t* w) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w))));
}
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#define GPTSERVE_SIMD 1
#else
struct BF16 { uint16_t bits; };
struct F16 { uint16_t bits; };
#define GPTSERVE_SIMD 0
#endif
inline float widen(float w) { return w; }
inline float widen(int8_t w) { return static_cast<float>(w); }
inline float widen(BF16 w) { uint32_t u = uint32_t(w.bits) << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline float widen(F16 w) { return c10::detail::fp16_ieee_to_fp32_value(w.bits); }

template <typename T, int R>
void rows_linear(const float* x, const T* w, const float* scale, const float* bias, float* y, int64_t N, int64_t K) {
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const T* wr = w + o * K;
      float sums[R];
      int64_t i = 0;
#if GPTSERVE_SIMD
      constexpr int U = R >= 4 ? 1 : 4 / R;  // independent sums per row, to hide the FMA latency
      __m256 acc[R][U];
      for (int r = 0; r < R; ++r) for (int u = 0; u < U; ++u) acc[r][u] = _mm256_setzero_ps();
      for (; i + 8 * U <= K; i += 8 * U) {
        for (int u = 0; u < U; ++u) {
          const __m256 wv = widen8(wr + i + 8 * u);
          for (int r = 0; r < R; ++r)
            acc[r][u] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + r * K + i + 8 * u), acc[r][u]);
        }
      }
      for (int r = 0; r < R; ++r) {
        for (int u = 1; u < U; ++u) acc[r][0] = _mm256_add_ps(acc[r][0], acc[r][u]);
        sums[r] = hsum(acc[r][0]);
      }
#else
      for (int r = 0; r < R; ++r) sums[r] = 0.f;
#endif
      for (; i < K; ++i) {
        const float wv = widen(wr[i]);
        for (int r = 0; r < R; ++r) sums[r] += wv * x[r * K + i];
      }
      const float s = scale ? scale[o] : 1.f, b = bias ? bias[o] : 0.f;
      for (int r = 0; r < R; ++r) y[r * N + o] = sums[r] * s + b;
    }
  });
}

template <typename T>
void rows_linear_n(int64_t R, const float* x, const T* w, const float* s, const float* b, float* y,
                   int64_t N, int64_t K) {
  switch (R) {
    case 1: return rows_linear<T, 1>(x, w, s, b, y, N, K);
    case 2: return rows_linear<T, 2>(x, w, s, b, y, N, K);
    case 3: return rows_linear<T, 3>(x, w, s, b, y, N, K);
    case 4: return rows_linear<T, 4>(x, w, s, b, y, N, K);
  }
  TORCH_CHECK(false, "few_rows_linear takes 1 to 4 rows");
}

// x (R, K) float32, R <= 4; weight (N, K) float32, bfloat16, float16 or int8; scale (N,) float32 for int8;
// bias (N,) float32 -> (R, N) float32
torch::Tensor few_rows_linear(torch::Tensor x, torch::Tensor weight, c10::optional<torch::Tensor> scale,
                              c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2, "x: (R, K) float32");
  TORCH_CHECK(weight.is_contiguous() && weight.dim() == 2 && weight.size(1) == x.size(1), "weight: (N, K) contiguous");
  TORCH_CHECK((weight.dtype() == torch::kInt8) == scale.has_value(), "int8 weights, and only they, take a scale");
  x = x.contiguous();
  const int64_t R = x.size(0), K = x.size(1), N = weight.size(0);
  auto y = torch::empty({R, N}, x.options());
  const float* s = scale.has_value() ? scale->contiguous().data_ptr<float>() : nullptr;
  const float* b = bias.has_value() ? bias->contiguous().data_ptr<float>() : nullptr;
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const void* wp = weight.data_ptr();
  switch (weight.scalar_type()) {
    case torch::kFloat32: rows_linear_n(R, xp, static_cast<const float*>(wp), s, b, yp, N, K); break;
    case torch::kBFloat16: rows_linear_n(R, xp, static_cast<const BF16*>(wp), s, b, yp, N, K); break;
    case torch::kFloat16: rows_linear_n(R, xp, static_cast<const F16*>(wp), s, b, yp, N, K); break;
    case torch::kInt8: rows_linear_n(R, xp, static_cast<const int8_t*>(wp), s, b, yp, N, K); break;
    default: TORCH_CHECK(false, "weight: float32, bfloat16, float16 or int8");
  }
  return y;
}

// The GIL is released while a kernel runs: the event loop sends SSE chunks while a step's kernels run.
// wrap_pybind_function_no_gil is torch's own wrapper (the error and warning translation load_inline
// puts around the functions it binds) plus a py::gil_scoped_release inside it, so errors are still
// turned into Python ones with the GIL held.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", torch::wrap_pybind_function_no_gil(paged_decode), "paged_decode");
  m.def("row_argmax", torch::wrap_pybind_function_no_gil(row_argmax), "row_argmax");
  m.def("few_rows_linear", torch::wrap_pybind_function_no_gil(few_rows_linear), "few_rows_linear");
}

