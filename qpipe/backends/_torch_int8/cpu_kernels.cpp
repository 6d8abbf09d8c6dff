// qpipe torch-int8 CPU kernels: depthwise conv1d and requantization on
// channels-last 8-bit activations, bit-exact with the qpipe:: reference kernels.
//
// Activations are int8 codes [-128, 127] or, for an output the reference clamps
// to lo >= 0, hi > 127 (a ReLU's, ``dtype_for_range``), uint8 codes [0, 255].
// Outputs: ``out_code`` 0 = the integers as float32, 8 = int8, 16 = int16,
// -8 = uint8 (what ``dtype_for_range`` gives for the clamp).
//
// Exactness: the depthwise accumulator is an fp32 sum of 8-bit x int8 products;
// the Python side only calls it when sum_k |w[k,c]| * max|x| < 2**24 (max|x| is
// 128 for int8, 255 for uint8), so every partial sum is an exact integer in any
// order. Requantization is clamp(((acc + bias) * m + 2**(s-1)) >> s, lo, hi) in
// 64-bit integers with two's-complement wrap-around (what torch's int64 ops do),
// arithmetic shift.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int TB = 8;   // output time steps per block (accumulators in registers)
constexpr int CB = 16;  // channels per vector (one 512-bit fp32 register)
// Elementwise kernels split work only in pieces of at least this many elements: a
// parallel region costs a barrier, and on a busy machine a barrier can wait a whole
// scheduler slice for the other thread; these loops are memory-bound and short.
constexpr int64_t MIN_PARALLEL = 1 << 18;
// the residual add and the input quantizer (a few µs per 10k elements, not memory-bound) pay
// for a second thread from about this many
constexpr int64_t MIN_PARALLEL_8BIT = 1 << 15;

inline int64_t rq1(int64_t v, int64_t m, int64_t half, int64_t s, int64_t lo, int64_t hi) {
  int64_t p = (int64_t)((uint64_t)v * (uint64_t)m + (uint64_t)half);
  int64_t r = p >> s;
  return r < lo ? lo : (r > hi ? hi : r);
}

// One block: TB outputs x CB channels, input already padded and in fp32.
inline void dw_block(const float* __restrict xp, const float* __restrict w, int64_t C, int64_t K,
                     int64_t stride, int64_t dil, int64_t t0, float acc[TB][CB]) {
  for (int tt = 0; tt < TB; ++tt)
    for (int c = 0; c < CB; ++c) acc[tt][c] = 0.f;
  for (int64_t k = 0; k < K; ++k) {
    const float* wk = w + k * C;
    float wv[CB];
    for (int c = 0; c < CB; ++c) wv[c] = wk[c];
    const float* xr = xp + ((t0 * stride) + k * dil) * C;
    for (int tt = 0; tt < TB; ++tt) {
      const float* xrow = xr + tt * stride * C;
      for (int c = 0; c < CB; ++c) acc[tt][c] += wv[c] * xrow[c];
    }
  }
}

template <typename OutT>
void requant_row(const float* __restrict acc, OutT* __restrict out, const int64_t* __restrict bias, const int64_t* __restrict m,
                 const int64_t* __restrict half, const int64_t* __restrict s, int64_t n, int64_t lo, int64_t hi) {
  for (int64_t c = 0; c < n; ++c) {
    int64_t v = (int64_t)acc[c] + (bias ? bias[c] : 0);
    out[c] = (OutT)rq1(v, m[c], half[c], s[c], lo, hi);
  }
}

template <typename InT>
void pad_to_f32(const InT* xd, float* xpd, int64_t B, int64_t T, int64_t C, int64_t Tp, int64_t Cp, int64_t pad) {
  at::parallel_for(0, B * T, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      int64_t b = i / T, t = i % T;
      const InT* src = xd + i * C;
      float* dst = xpd + (b * Tp + t + pad) * Cp;
      for (int64_t c = 0; c < C; ++c) dst[c] = (float)src[c];
    }
  });
}

inline c10::ScalarType out_dtype(int64_t out_code) {
  switch (out_code) {
    case 0: return torch::kFloat32;
    case 8: return torch::kInt8;
    case -8: return torch::kUInt8;
    case 16: return torch::kInt16;
  }
  TORCH_CHECK(false, "out_code must be 0 (float32), 8 (int8), -8 (uint8) or 16 (int16), got ", out_code);
}

}  // namespace

// x: int8 or uint8 (B, T, C) contiguous; w: fp32 (K, Cp) with Cp = C rounded up to CB (zeros beyond C);
// bias: int64 (C) or empty; m, half, s: int64 (C). Returns int8, uint8 or int16 (out_code 8, -8, 16) (B, Tout, C).
torch::Tensor dw_conv1d_rq(torch::Tensor x, torch::Tensor w, torch::Tensor bias, torch::Tensor m,
                           torch::Tensor half, torch::Tensor s, int64_t stride, int64_t pad, int64_t dil,
                           int64_t lo, int64_t hi, int64_t out_code) {
  TORCH_CHECK((x.dtype() == torch::kInt8 || x.dtype() == torch::kUInt8) && x.dim() == 3 && x.is_contiguous(),
              "dw_conv1d_rq: x must be contiguous int8/uint8 (B,T,C)");
  TORCH_CHECK(w.dtype() == torch::kFloat32 && w.dim() == 2 && w.is_contiguous(), "dw_conv1d_rq: w must be fp32 (K,Cp)");
  TORCH_CHECK(out_code != 0, "dw_conv1d_rq: integer output only");
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2);
  const int64_t K = w.size(0), Cp = w.size(1);
  TORCH_CHECK(Cp % CB == 0 && Cp >= C, "dw_conv1d_rq: weight channels not padded");
  const int64_t Tout = (T + 2 * pad - dil * (K - 1) - 1) / stride + 1;
  TORCH_CHECK(Tout > 0, "dw_conv1d_rq: empty output");
  const int64_t nblk = (Tout + TB - 1) / TB;
  // padded fp32 input big enough for whole blocks: rows [0, Tp)
  const int64_t Tp = std::max<int64_t>(T + 2 * pad, ((nblk * TB - 1) * stride) + (K - 1) * dil + 1);
  auto xp = torch::zeros({B, Tp, Cp}, x.options().dtype(torch::kFloat32));
  float* xpd = xp.data_ptr<float>();
  if (x.dtype() == torch::kUInt8) pad_to_f32<uint8_t>(x.data_ptr<uint8_t>(), xpd, B, T, C, Tp, Cp, pad);
  else pad_to_f32<int8_t>(x.data_ptr<int8_t>(), xpd, B, T, C, Tp, Cp, pad);
  auto out = torch::empty({B, Tout, C}, x.options().dtype(out_dtype(out_code)));
  const float* wd = w.data_ptr<float>();
  const int64_t* bd = bias.numel() ? bias.data_ptr<int64_t>() : nullptr;
  const int64_t* md = m.data_ptr<int64_t>();
  const int64_t* hd = half.data_ptr<int64_t>();
  const int64_t* sd = s.data_ptr<int64_t>();
  const int64_t ncb = Cp / CB;
  at::parallel_for(0, B * nblk, 1, [&](int64_t begin, int64_t end) {
    float acc[TB][CB];
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / nblk, t0 = (i % nblk) * TB;
      const int64_t nt = std::min<int64_t>(TB, Tout - t0);
      const float* xb = xpd + b * Tp * Cp;
      for (int64_t cb = 0; cb < ncb; ++cb) {
        const int64_t c0 = cb * CB, nc = std::min<int64_t>(CB, C - c0);
        dw_block(xb + c0, wd + c0, Cp, K, stride, dil, t0, acc);
        for (int64_t tt = 0; tt < nt; ++tt) {
          const int64_t o = (b * Tout + t0 + tt) * C + c0;
          const int64_t* bb = bd ? bd + c0 : nullptr;
          if (out_code == 8)
            requant_row<int8_t>(acc[tt], out.data_ptr<int8_t>() + o, bb, md + c0, hd + c0, sd + c0, nc, lo, hi);
          else if (out_code == -8)
            requant_row<uint8_t>(acc[tt], out.data_ptr<uint8_t>() + o, bb, md + c0, hd + c0, sd + c0, nc, lo, hi);
          else
            requant_row<int16_t>(acc[tt], out.data_ptr<int16_t>() + o, bb, md + c0, hd + c0, sd + c0, nc, lo, hi);
        }
      }
    }
  });
  return out;
}

// One row of requantization. __restrict: an int8 store may alias anything (char
// aliasing), which would stop vectorization without it.
template <typename AccT, typename OutT>
inline void rq_row(const AccT* __restrict a, OutT* __restrict o, const int64_t* __restrict bd,
                   const int64_t* __restrict md, const int64_t* __restrict hd, const int64_t* __restrict sd,
                   int64_t C, int64_t lo, int64_t hi) {
  if (bd) {
    for (int64_t c = 0; c < C; ++c) o[c] = (OutT)rq1((int64_t)a[c] + bd[c], md[c], hd[c], sd[c], lo, hi);
  } else {
    for (int64_t c = 0; c < C; ++c) o[c] = (OutT)rq1((int64_t)a[c], md[c], hd[c], sd[c], lo, hi);
  }
}

template <typename AccT, typename OutT>
void rq_rows(const AccT* a, OutT* o, const int64_t* bd, const int64_t* md, const int64_t* hd, const int64_t* sd,
             int64_t N, int64_t C, int64_t lo, int64_t hi) {
  at::parallel_for(0, N, std::max<int64_t>(1, MIN_PARALLEL / std::max<int64_t>(C, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) rq_row<AccT, OutT>(a + i * C, o + i * C, bd, md, hd, sd, C, lo, hi);
  });
}

// acc: fp32 (exact integers) or int32, (N, C) contiguous; per-column bias/m/half/s (int64, C).
// out_code 8 / -8 / 16: int8 / uint8 / int16 out; 0: the integers as float32 (for a consumer
// that convolves in exact fp32).
torch::Tensor requant_cols(torch::Tensor acc, torch::Tensor bias, torch::Tensor m, torch::Tensor half,
                           torch::Tensor s, int64_t lo, int64_t hi, int64_t out_code) {
  TORCH_CHECK(acc.dim() == 2 && acc.is_contiguous(), "requant_cols: acc must be contiguous (N,C)");
  const int64_t N = acc.size(0), C = acc.size(1);
  auto out = torch::empty({N, C}, acc.options().dtype(out_dtype(out_code)));
  const int64_t* bd = bias.numel() ? bias.data_ptr<int64_t>() : nullptr;
  const int64_t* md = m.data_ptr<int64_t>();
  const int64_t* hd = half.data_ptr<int64_t>();
  const int64_t* sd = s.data_ptr<int64_t>();
  const bool f32 = acc.dtype() == torch::kFloat32;
  TORCH_CHECK(f32 || acc.dtype() == torch::kInt32, "requant_cols: acc must be fp32 or int32");
#define QPIPE_RQ(ACC, OUT) rq_rows<ACC, OUT>(acc.data_ptr<ACC>(), out.data_ptr<OUT>(), bd, md, hd, sd, N, C, lo, hi)
  if (f32) {
    if (out_code == 0) QPIPE_RQ(float, float);
    else if (out_code == 8) QPIPE_RQ(float, int8_t);
    else if (out_code == -8) QPIPE_RQ(float, uint8_t);
    else QPIPE_RQ(float, int16_t);
  } else {
    if (out_code == 0) QPIPE_RQ(int32_t, float);
    else if (out_code == 8) QPIPE_RQ(int32_t, int8_t);
    else if (out_code == -8) QPIPE_RQ(int32_t, uint8_t);
    else QPIPE_RQ(int32_t, int16_t);
  }
#undef QPIPE_RQ
  return out;
}

// The float32-faithful requantization (f32.py's requant_f32, the reference's requant_f32_reference):
// clamp(round_half_even(fl32(fl32(acc + bias) * mult)), lo, hi) per column. acc + bias is summed
// exactly in double (|acc| < 2**31, |bias| < 2**52: the caller checks) and rounded once to float32
// (nearest even, as torch's int64 -> float32 cast); one IEEE float32 multiply; nearbyint (half to even).
template <typename AccT, typename OutT>
inline void rq_f32_row(const AccT* __restrict a, OutT* __restrict o, const int64_t* __restrict bd,
                       const float* __restrict mult, int64_t C, float lo, float hi) {
  for (int64_t c = 0; c < C; ++c) {
    const float v = bd ? (float)((double)a[c] + (double)bd[c]) : (float)a[c];
    const float p = v * mult[c];
    float r = std::nearbyint(p);
    r = r < lo ? lo : r;
    r = r > hi ? hi : r;
    o[c] = (OutT)r;
  }
}

template <typename AccT, typename OutT>
void rq_f32_rows(const AccT* a, OutT* o, const int64_t* bd, const float* mult, int64_t N, int64_t C, float lo, float hi) {
  at::parallel_for(0, N, std::max<int64_t>(1, MIN_PARALLEL / std::max<int64_t>(C, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) rq_f32_row<AccT, OutT>(a + i * C, o + i * C, bd, mult, C, lo, hi);
  });
}

// acc: fp32 (exact integers) or int32 (N, C) contiguous; bias int64 (C) or empty; mult float32 (C);
// out_code as requant_cols.
torch::Tensor requant_f32_cols(torch::Tensor acc, torch::Tensor bias, torch::Tensor mult, int64_t lo, int64_t hi,
                               int64_t out_code) {
  TORCH_CHECK(acc.dim() == 2 && acc.is_contiguous(), "requant_f32_cols: acc must be contiguous (N,C)");
  TORCH_CHECK(mult.dtype() == torch::kFloat32 && mult.is_contiguous() && mult.numel() == acc.size(1),
              "requant_f32_cols: mult must be float32 (C)");
  const int64_t N = acc.size(0), C = acc.size(1);
  auto out = torch::empty({N, C}, acc.options().dtype(out_dtype(out_code)));
  const int64_t* bd = bias.numel() ? bias.data_ptr<int64_t>() : nullptr;
  const float* md = mult.data_ptr<float>();
  const float flo = (float)lo, fhi = (float)hi;
  const bool f32 = acc.dtype() == torch::kFloat32;
  TORCH_CHECK(f32 || acc.dtype() == torch::kInt32, "requant_f32_cols: acc must be fp32 or int32");
#define QPIPE_RQF(ACC, OUT) rq_f32_rows<ACC, OUT>(acc.data_ptr<ACC>(), out.data_ptr<OUT>(), bd, md, N, C, flo, fhi)
  if (f32) {
    if (out_code == 0) QPIPE_RQF(float, float);
    else if (out_code == 8) QPIPE_RQF(float, int8_t);
    else if (out_code == -8) QPIPE_RQF(float, uint8_t);
    else QPIPE_RQF(float, int16_t);
  } else {
    if (out_code == 0) QPIPE_RQF(int32_t, float);
    else if (out_code == 8) QPIPE_RQF(int32_t, int8_t);
    else if (out_code == -8) QPIPE_RQF(int32_t, uint8_t);
    else QPIPE_RQF(int32_t, int16_t);
  }
#undef QPIPE_RQF
  return out;
}

template <typename AT, typename BT, typename OutT>
inline void add_span(const AT* __restrict a, const BT* __restrict b, OutT* __restrict o, int64_t n,
                     int64_t ma, int64_t mb, int64_t half, int64_t s, int64_t lo, int64_t hi) {
  for (int64_t i = 0; i < n; ++i) {
    int64_t v = (int64_t)((uint64_t)(int64_t)a[i] * (uint64_t)ma + (uint64_t)(int64_t)b[i] * (uint64_t)mb + (uint64_t)half) >> s;
    o[i] = (OutT)(v < lo ? lo : (v > hi ? hi : v));
  }
}

// The same sum in double, 16 codes per step: exact while 255 * (|ma| + |mb|) + half < 2**53, so v
// is the integer itself and v * 2**-s (a power of two, exact) floored is the arithmetic shift.
// (The scalar int64 loop above does not vectorize: AVX-512 has no cheap 64-bit multiply.)
#if defined(__AVX512F__) && defined(__AVX512BW__)
template <typename T>
inline __m512i load16_epi32(const T* p) {
  const __m128i v = _mm_loadu_si128((const __m128i*)p);
  if constexpr (std::is_same<T, uint8_t>::value) return _mm512_cvtepu8_epi32(v);
  else return _mm512_cvtepi8_epi32(v);
}
#endif

template <typename AT, typename BT, typename OutT>
inline void add_span_f64(const AT* __restrict a, const BT* __restrict b, OutT* __restrict o, int64_t n,
                         double ma, double mb, double half, double inv, double lo, double hi) {
  int64_t i = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
  const __m512d vma = _mm512_set1_pd(ma), vmb = _mm512_set1_pd(mb), vh = _mm512_set1_pd(half),
                vinv = _mm512_set1_pd(inv), vlo = _mm512_set1_pd(lo), vhi = _mm512_set1_pd(hi);
  auto eight = [&](__m256i ai, __m256i bi) {
    __m512d v = _mm512_fmadd_pd(_mm512_cvtepi32_pd(ai), vma, _mm512_fmadd_pd(_mm512_cvtepi32_pd(bi), vmb, vh));
    v = _mm512_roundscale_pd(_mm512_mul_pd(v, vinv), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    return _mm512_cvtpd_epi32(_mm512_min_pd(_mm512_max_pd(v, vlo), vhi));
  };
  for (; i + 16 <= n; i += 16) {
    const __m512i ai = load16_epi32(a + i), bi = load16_epi32(b + i);
    const __m256i r0 = eight(_mm512_castsi512_si256(ai), _mm512_castsi512_si256(bi));
    const __m256i r1 = eight(_mm512_extracti64x4_epi64(ai, 1), _mm512_extracti64x4_epi64(bi, 1));
    const __m512i r = _mm512_inserti64x4(_mm512_castsi256_si512(r0), r1, 1);
    if constexpr (sizeof(OutT) == 1) _mm_storeu_si128((__m128i*)(o + i), _mm512_cvtepi32_epi8(r));
    else _mm256_storeu_si256((__m256i*)(o + i), _mm512_cvtepi32_epi16(r));
  }
#endif
  for (; i < n; ++i) {
    double v = std::floor(std::fma((double)a[i], ma, std::fma((double)b[i], mb, half)) * inv);
    v = v < lo ? lo : v;
    v = v > hi ? hi : v;
    o[i] = (OutT)(int32_t)v;
  }
}

// The same sum in int32, 32 codes per step, for 16 <= s <= 46: each multiplier split as
// m = mh * 2**16 + ml with both halves signed 16-bit (ml in [-2**15, 2**15)), so that one vpmaddwd of the
// interleaved (a, b) words gives H = a*mah + b*mbh and another L = a*mal + b*mbl, both below 2**25. With
// half = 2**(s-1) in H (s > 16) or L (s = 16), a*ma + b*mb + half = H * 2**16 + L, and
// floor(that / 2**s) = (H + (L >> 16)) >> (s - 16): L's low 16 bits cannot carry across a multiple of
// 2**s. About twice the double path's speed (fewer, single-width operations).
struct AddLimbs {
  int32_t h = 0, l = 0, hh = 0, hl = 0;  // (mah | mbh << 16), (mal | mbl << 16), half's share of H and of L
  int shift = 0;                        // s - 16
};

inline bool add_limbs(int64_t ma, int64_t mb, int64_t s, AddLimbs& k) {
  if (s < 16 || s > 46) return false;
  const int64_t mah = (ma + 32768) >> 16, mbh = (mb + 32768) >> 16;
  if (mah < -32768 || mah > 32767 || mbh < -32768 || mbh > 32767) return false;
  const int64_t mal = ma - mah * 65536, mbl = mb - mbh * 65536;  // in [-32768, 32767]
  k.h = (int32_t)((uint32_t)(uint16_t)mah | ((uint32_t)(uint16_t)mbh << 16));
  k.l = (int32_t)((uint32_t)(uint16_t)mal | ((uint32_t)(uint16_t)mbl << 16));
  k.hh = s > 16 ? (int32_t)(int64_t(1) << (s - 17)) : 0;
  k.hl = s == 16 ? 32768 : 0;
  k.shift = (int)(s - 16);
  return true;
}

template <typename AT, typename BT, typename OutT>
inline void add_span_limbs(const AT* __restrict a, const BT* __restrict b, OutT* __restrict o, int64_t n, const AddLimbs& k,
                           int64_t ma, int64_t mb, int64_t half, int64_t s, int64_t lo, int64_t hi) {
  int64_t i = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
  const __m512i vh = _mm512_set1_epi32(k.h), vl = _mm512_set1_epi32(k.l), vhh = _mm512_set1_epi32(k.hh),
                vhl = _mm512_set1_epi32(k.hl), vlo = _mm512_set1_epi32((int)lo), vhi = _mm512_set1_epi32((int)hi);
  const __m128i cnt = _mm_cvtsi32_si128(k.shift);
  auto words = [](auto* p) {
    const __m256i v = _mm256_loadu_si256((const __m256i*)p);
    if constexpr (std::is_same<std::remove_cv_t<std::remove_pointer_t<decltype(p)>>, uint8_t>::value) return _mm512_cvtepu8_epi16(v);
    else return _mm512_cvtepi8_epi16(v);
  };
  auto half_sum = [&](__m512i pairs) {  // 16 interleaved (a, b) pairs -> 16 clamped results
    const __m512i hsum = _mm512_add_epi32(_mm512_madd_epi16(pairs, vh), vhh);
    const __m512i lsum = _mm512_add_epi32(_mm512_madd_epi16(pairs, vl), vhl);
    const __m512i r = _mm512_sra_epi32(_mm512_add_epi32(hsum, _mm512_srai_epi32(lsum, 16)), cnt);
    return _mm512_min_epi32(_mm512_max_epi32(r, vlo), vhi);
  };
  for (; i + 32 <= n; i += 32) {
    const __m512i aw = words(a + i), bw = words(b + i);
    // in each 128-bit lane: unpacklo holds elements 8L..8L+3, unpackhi 8L+4..8L+7; packs puts them back in order
    const __m512i r = _mm512_packs_epi32(half_sum(_mm512_unpacklo_epi16(aw, bw)), half_sum(_mm512_unpackhi_epi16(aw, bw)));
    if constexpr (sizeof(OutT) == 1) _mm256_storeu_si256((__m256i*)(o + i), _mm512_cvtepi16_epi8(r));
    else _mm512_storeu_si512((void*)(o + i), r);
  }
#endif
  if (i < n) add_span<AT, BT, OutT>(a + i, b + i, o + i, n - i, ma, mb, half, s, lo, hi);
}

template <typename AT, typename BT, typename OutT>
inline void add_any(const AT* a, const BT* b, OutT* o, int64_t n, int64_t ma, int64_t mb, int64_t half, int64_t s,
                    int64_t lo, int64_t hi) {
  AddLimbs k;
  if (add_limbs(ma, mb, s, k)) return add_span_limbs<AT, BT, OutT>(a, b, o, n, k, ma, mb, half, s, lo, hi);
  const double bound = 255.0 * ((double)std::abs(ma) + (double)std::abs(mb)) + (double)half;
  if (bound < 9007199254740992.0 && s <= 63)  // 2**53
    add_span_f64<AT, BT, OutT>(a, b, o, n, (double)ma, (double)mb, (double)half, std::ldexp(1.0, -(int)s), (double)lo,
                               (double)hi);
  else
    add_span<AT, BT, OutT>(a, b, o, n, ma, mb, half, s, lo, hi);
}

template <typename AT, typename BT>
void add_all(const void* a, const void* b, void* out, int64_t n, int64_t out_code,
             int64_t ma, int64_t mb, int64_t half, int64_t s, int64_t lo, int64_t hi) {
  const AT* ad = (const AT*)a;
  const BT* bd = (const BT*)b;
  at::parallel_for(0, n, MIN_PARALLEL_8BIT, [&](int64_t begin, int64_t end) {
    if (out_code == 8)
      add_any<AT, BT, int8_t>(ad + begin, bd + begin, (int8_t*)out + begin, end - begin, ma, mb, half, s, lo, hi);
    else if (out_code == -8)
      add_any<AT, BT, uint8_t>(ad + begin, bd + begin, (uint8_t*)out + begin, end - begin, ma, mb, half, s, lo, hi);
    else
      add_any<AT, BT, int16_t>(ad + begin, bd + begin, (int16_t*)out + begin, end - begin, ma, mb, half, s, lo, hi);
  });
}

// a, b: one shape, in one dense layout; out the same elements in that layout.
void add_rq_into(const torch::Tensor& a, const torch::Tensor& b, torch::Tensor& out, int64_t ma, int64_t mb, int64_t s,
                 int64_t lo, int64_t hi, int64_t out_code) {
  const int64_t n = a.numel();
  const int64_t half = s > 0 ? (int64_t(1) << (s - 1)) : 0;
  const bool au = a.dtype() == torch::kUInt8, bu = b.dtype() == torch::kUInt8;
  const void *ad = a.data_ptr(), *bd = b.data_ptr();
  void* od = out.data_ptr();
  if (au && bu) add_all<uint8_t, uint8_t>(ad, bd, od, n, out_code, ma, mb, half, s, lo, hi);
  else if (au) add_all<uint8_t, int8_t>(ad, bd, od, n, out_code, ma, mb, half, s, lo, hi);
  else if (bu) add_all<int8_t, uint8_t>(ad, bd, od, n, out_code, ma, mb, half, s, lo, hi);
  else add_all<int8_t, int8_t>(ad, bd, od, n, out_code, ma, mb, half, s, lo, hi);
}

inline bool is_codes(const torch::Tensor& t) { return t.dtype() == torch::kInt8 || t.dtype() == torch::kUInt8; }

// A (B, C, T) view of dense channels-last (B, T, C) storage: what every 8-bit value of a program is.
// Read from the strides, not by making the transposed view: each tensor op (transpose, view,
// contiguous, ...) from C++ still goes through torch's dispatcher, about a microsecond apiece, some
// 2 us a layer at batch 1 (a 5-25 us kernel).
inline bool channels_last_3d(const torch::Tensor& x) {
  if (x.dim() != 3) return false;
  const int64_t C = x.size(1), T = x.size(2);
  return (C <= 1 || x.stride(1) == 1) && (T <= 1 || x.stride(2) == C) && (x.size(0) <= 1 || x.stride(0) == C * T);
}

// An empty (B, C, T) tensor whose storage is channels-last (B, T, C).
inline torch::Tensor empty_channels_last_3d(int64_t B, int64_t C, int64_t T, const torch::TensorOptions& opts) {
  return torch::empty_strided({B, C, T}, {T * C, 1, C}, opts);
}

// Residual add with one shared shift: clamp((a*ma + b*mb + half) >> s, lo, hi); a, b int8 or uint8
// (each its own) of one shape, contiguous; out int8 / uint8 / int16 (out_code 8 / -8 / 16).
torch::Tensor add_rq(torch::Tensor a, torch::Tensor b, int64_t ma, int64_t mb, int64_t s, int64_t lo, int64_t hi,
                     int64_t out_code) {
  TORCH_CHECK(is_codes(a) && is_codes(b) && a.is_contiguous() && b.is_contiguous() && a.sizes() == b.sizes(),
              "add_rq: a, b must be contiguous int8/uint8 of one shape");
  TORCH_CHECK(out_code != 0, "add_rq: integer output only");
  auto out = torch::empty_like(a, a.options().dtype(out_dtype(out_code)));
  add_rq_into(a, b, out, ma, mb, s, lo, hi, out_code);
  return out;
}

// add_rq as the program calls it: a, b of one shape, each channels-last (B, C, T) views or both
// contiguous; the result in the same layout. Returns an undefined tensor (None) for any other layout,
// which the caller then handles (each Python-side transpose or layout check costs about a microsecond).
torch::Tensor add_rq_cl(torch::Tensor a, torch::Tensor b, int64_t ma, int64_t mb, int64_t s, int64_t lo, int64_t hi,
                        int64_t out_code) {
  if (a.sizes() != b.sizes()) return torch::Tensor();
  if (channels_last_3d(a) && channels_last_3d(b)) {
    TORCH_CHECK(is_codes(a) && is_codes(b) && out_code != 0, "add_rq_cl: a, b must be int8/uint8, the output integer");
    auto out = empty_channels_last_3d(a.size(0), a.size(1), a.size(2), a.options().dtype(out_dtype(out_code)));
    add_rq_into(a, b, out, ma, mb, s, lo, hi, out_code);
    return out;
  }
  if (a.is_contiguous() && b.is_contiguous()) return add_rq(a, b, ma, mb, s, lo, hi, out_code);
  return torch::Tensor();
}

#if defined(__AVX512F__)
// r[i] (row i of a 16 x 16 float block) becomes column i. In-lane unpacks and shuffles leave
// u[4g + k] holding, in 128-bit lane L, rows 4g..4g+3 at column 4L + k; a 4 x 4 transpose of
// 128-bit lanes across u[k], u[4+k], u[8+k], u[12+k] then gives the columns 4L + k.
inline void transpose16x16(__m512 r[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int g = 0; g < 4; ++g) {
    u[4 * g] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0x44);
    u[4 * g + 1] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0xEE);
    u[4 * g + 2] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
    u[4 * g + 3] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xEE);
  }
  for (int k = 0; k < 4; ++k) {
    const __m512 v0 = _mm512_shuffle_f32x4(u[k], u[4 + k], 0x88), v1 = _mm512_shuffle_f32x4(u[k], u[4 + k], 0xDD);
    const __m512 w0 = _mm512_shuffle_f32x4(u[8 + k], u[12 + k], 0x88), w1 = _mm512_shuffle_f32x4(u[8 + k], u[12 + k], 0xDD);
    r[k] = _mm512_shuffle_f32x4(v0, w0, 0x88);
    r[8 + k] = _mm512_shuffle_f32x4(v0, w0, 0xDD);
    r[4 + k] = _mm512_shuffle_f32x4(v1, w1, 0x88);
    r[12 + k] = _mm512_shuffle_f32x4(v1, w1, 0xDD);
  }
}
#endif

// The input quantizer, ONNX QuantizeLinear as qpipe.quantize computes it: the float32
// quotient x / scale (IEEE division; scale rounded to float32 first, as the reference
// does), rounded half to even (nearbyint in the default rounding mode), clamped to
// [-hi-1, hi]; written channels-last: x (B, C, T) -> out (B, T, C), int8 or float32
// (out_f32). Returns the number of NaN inputs (whose integer the reference leaves to
// torch's cast): when non-zero the caller recomputes the tensor with the reference.
template <typename OutT>
void quantize_tiles(const float* xd, OutT* od, int64_t B, int64_t C, int64_t T, float fs, float flo, float fhi,
                    std::atomic<int64_t>& special) {
  constexpr int64_t TQ = 64;  // time steps per tile: the quotients of C x TQ inputs, then a transposed write
  const int64_t nblk = (T + TQ - 1) / TQ;
  at::parallel_for(0, B * nblk, std::max<int64_t>(1, MIN_PARALLEL_8BIT / std::max<int64_t>(C * TQ, 1)), [&](int64_t begin, int64_t end) {
    std::vector<float> tile((size_t)(C * TQ));
    float* __restrict tl = tile.data();
    int64_t bad = 0;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / nblk, t0 = (i % nblk) * TQ, nt = std::min<int64_t>(TQ, T - t0);
      for (int64_t c = 0; c < C; ++c) {
        const float* __restrict src = xd + (b * C + c) * T + t0;
        float* __restrict row = tl + c * TQ;
        for (int64_t tt = 0; tt < nt; ++tt) {
          const float q = src[tt] / fs;  // IEEE division (no -ffast-math / -freciprocal-math)
          bad += (q != q);
          float v = std::nearbyint(q);  // half to even in the default rounding mode
          v = v < flo ? flo : v;
          v = v > fhi ? fhi : v;
          row[tt] = v;
        }
      }
      OutT* __restrict o = od + (b * T + t0) * C;
      int64_t c16 = 0, t16 = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
      c16 = C / 16 * 16;
      t16 = nt / 16 * 16;
      for (int64_t c0 = 0; c0 < c16; c0 += 16)
        for (int64_t tt0 = 0; tt0 < t16; tt0 += 16) {
          __m512 r[16];
          for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(tl + (c0 + i) * TQ + tt0);
          transpose16x16(r);
          for (int j = 0; j < 16; ++j) {
            OutT* dst = o + (tt0 + j) * C + c0;
            if constexpr (sizeof(OutT) == 1) _mm_storeu_si128((__m128i*)dst, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(r[j])));
            else _mm512_storeu_ps((float*)dst, r[j]);
          }
        }
#endif
      for (int64_t tt = 0; tt < nt; ++tt)  // what the 16 x 16 blocks left: the last channels, the last times
        for (int64_t c = (tt < t16 ? c16 : 0); c < C; ++c) o[tt * C + c] = (OutT)tl[c * TQ + tt];
    }
    special += bad;
  });
}

std::tuple<torch::Tensor, int64_t> quantize_cl(torch::Tensor x, double scale, int64_t hi, bool out_f32) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 3, "quantize_cl: x must be float32 (B,C,T)");
  x = x.contiguous();
  const int64_t B = x.size(0), C = x.size(1), T = x.size(2);
  auto out = torch::empty({B, T, C}, x.options().dtype(out_f32 ? torch::kFloat32 : torch::kInt8));
  std::atomic<int64_t> special{0};
  const float fs = (float)scale;
  const float fhi = (float)hi, flo = -(float)hi - 1.0f;
  if (out_f32) quantize_tiles<float>(x.data_ptr<float>(), out.data_ptr<float>(), B, C, T, fs, flo, fhi, special);
  else quantize_tiles<int8_t>(x.data_ptr<float>(), out.data_ptr<int8_t>(), B, C, T, fs, flo, fhi, special);
  return {out, special.load()};
}

// Depthwise conv1d on 8-bit codes with AVX-512 VNNI (vpdpbusd: u8 x s8, four products per
// int32 lane, summed without saturation): int32 accumulators, exact while 255 * sum_k |w| < 2**31.
// x: int8 or uint8 (B, T, C) contiguous (channels-last). A uint8 input goes in as it is; an int8
// one as the uint8 x + 128 (XOR 0x80), so the accumulator holds 128 * sum_k w[k, c] more, which
// the caller folds into the bias it passes (padding holds the shifted zero, 128).
//
// Output: with an empty ``mult`` (and ``bias``), the int32 accumulators (B, Tout, C);
// with a float32 ``mult`` (C), the float32-faithful requantization fused in (rq_f32_row's
// arithmetic: the exact double acc + bias rounded once to float32, one IEEE float32 multiply,
// round half to even, clamp), written as out_code 8 / -8 / 16 (int8 / uint8 / int16). Fusing
// it means the int32 accumulators never reach memory: at batch 8 the unfused kernel spent more
// time storing them than multiplying.
//
// Per 64 channels and a tile of output times the taps are first packed in fours, Q[r] = (xp[r],
// xp[r+d], xp[r+2d], xp[r+3d]) per channel (xp the padded input), so that output t is the sum over
// kq of dot4(Q[t*stride + 4*d*kq], w[taps 4kq..4kq+3]). Packing 64 channels of 4 rows with
// in-lane byte/word unpacks leaves register j holding, in 128-bit lane L, channels 16L + 4j + (0..3);
// the weights (``w4``, built by the caller) come in that order: int8 (ncb, KQ, 4 j, 4 L, 4 i, 4 taps)
// for channel 64*cb + 16L + 4j + i, zero past C and past the layer's K taps. The four accumulators
// of one output time go back to channel order by a 4x4 transpose of 128-bit lanes. A work item is
// one time tile of one batch row, all channel blocks in turn, so each output row is written whole
// while its cache lines are hot.
bool dw_vnni_available() {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
  return true;
#else
  return false;
#endif
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
namespace {
inline __mmask64 byte_mask(int64_t n) { return n >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << n) - 1); }
inline __mmask16 lane_mask(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : (n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1)); }

#define QPIPE_INLINE __attribute__((always_inline)) inline
#define QPIPE_INLINE_LAMBDA __attribute__((always_inline))

// The fused epilogue's per-channel constants, padded with zeros to whole 64-channel blocks so that a
// block's loads never go past them: the multiplier, and the bias as int32 or as double. An int32 bias
// (or none) is the caller's promise that every acc + bias fits int32 (255 * sum|w| + |bias| < 2**31):
// the sum is then one vpaddd and its float32 rounding one vcvtdq2ps. An int64 bias is summed in double
// (exact: callers keep |bias| < 2**52) and rounded from there; both give fl32(acc + bias).
inline void epilogue_constants(const torch::Tensor& bias, const torch::Tensor& mult, bool fused, int64_t n,
                               int64_t blocks, std::vector<double>& bd, std::vector<int32_t>& bi, std::vector<float>& md) {
  const bool wide = bias.numel() && bias.dtype() == torch::kInt64;
  bd.assign(wide ? (size_t)(blocks * 64) : 0, 0.0);
  bi.assign(wide ? 0 : (size_t)(blocks * 64), 0);
  md.assign((size_t)(blocks * 64), 0.f);
  if (bias.numel()) {
    const torch::Tensor bc = bias.contiguous();
    if (wide) {
      const int64_t* b = bc.data_ptr<int64_t>();
      for (int64_t c = 0; c < n; ++c) bd[c] = (double)b[c];
    } else {
      const int32_t* b = bc.data_ptr<int32_t>();
      for (int64_t c = 0; c < n; ++c) bi[c] = b[c];
    }
  }
  if (fused) {
    const torch::Tensor mc = mult.contiguous();
    const float* m = mc.data_ptr<float>();
    for (int64_t c = 0; c < n; ++c) md[c] = m[c];
  }
}

// acc[j] lane L = channels 16L + 4j + (0..3) -> out[L] = channels 16L + (0..15)
inline void lanes_to_channels(const __m512i acc[4], __m512i out[4]) {
  const __m512i t0 = _mm512_shuffle_i32x4(acc[0], acc[1], 0x44);  // a0 a1 b0 b1
  const __m512i t1 = _mm512_shuffle_i32x4(acc[0], acc[1], 0xEE);  // a2 a3 b2 b3
  const __m512i t2 = _mm512_shuffle_i32x4(acc[2], acc[3], 0x44);  // c0 c1 d0 d1
  const __m512i t3 = _mm512_shuffle_i32x4(acc[2], acc[3], 0xEE);  // c2 c3 d2 d3
  out[0] = _mm512_shuffle_i32x4(t0, t2, 0x88);  // a0 b0 c0 d0
  out[1] = _mm512_shuffle_i32x4(t0, t2, 0xDD);  // a1 b1 c1 d1
  out[2] = _mm512_shuffle_i32x4(t1, t3, 0x88);  // a2 b2 c2 d2
  out[3] = _mm512_shuffle_i32x4(t1, t3, 0xDD);  // a3 b3 c3 d3
}

// v = fl32(acc + bias) of 16 channels: clamp(round_half_even(v * mult), lo, hi) as int32 lanes.
inline __m512i rq_scale_16(__m512 v, const float* mult, __m512 lo, __m512 hi) {
  __m512 r = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_loadu_ps(mult)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  r = _mm512_min_ps(_mm512_max_ps(r, lo), hi);
  return _mm512_cvtps_epi32(r);
}

// The same from an int64 bias (as double: acc + bias exact, then one rounding to float32).
inline __m512i rq_f32_16(__m512i acc, const double* bias, const float* mult, __m512 lo, __m512 hi) {
  const __m512d a0 = _mm512_add_pd(_mm512_cvtepi32_pd(_mm512_castsi512_si256(acc)), _mm512_loadu_pd(bias));
  const __m512d a1 = _mm512_add_pd(_mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(acc, 1)), _mm512_loadu_pd(bias + 8));
  return rq_scale_16(_mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtpd_ps(a0)), _mm512_cvtpd_ps(a1), 1), mult, lo, hi);
}

// The same from an int32 bias (see epilogue_constants): acc + bias in int32, one rounding to float32.
inline __m512i rq_f32_16_i32(__m512i acc, const int32_t* bias, const float* mult, __m512 lo, __m512 hi) {
  return rq_scale_16(_mm512_cvtepi32_ps(_mm512_add_epi32(acc, _mm512_loadu_si512(bias))), mult, lo, hi);
}

// Where a VNNI kernel's 16-channel results go: the int32 accumulators as they are, or requantized
// (rq_f32_16 / rq_f32_16_i32) to 8/16-bit codes. One place for both kernels' stores.
struct Epilogue {
  bool fused = false;
  int64_t osz = 4;  // bytes per output element
  char* od = nullptr;
  const double* bias = nullptr;   // an int64 bias (summed in double), or
  const int32_t* bias32 = nullptr;  // an int32 one (or none: zeros)
  const float* mult = nullptr;
  __m512 lo, hi;

  // the 16 lanes of acc are output elements e .. e+15, channels c .. c+15 (m: which exist)
  QPIPE_INLINE void store16(int64_t e, int64_t c, __mmask16 m, __m512i acc) const {
    if (!fused) {
      _mm512_mask_storeu_epi32(od + e * 4, m, acc);
      return;
    }
    const __m512i q = bias32 ? rq_f32_16_i32(acc, bias32 + c, mult + c, lo, hi) : rq_f32_16(acc, bias + c, mult + c, lo, hi);
    if (osz == 1) _mm512_mask_cvtepi32_storeu_epi8(od + e, m, q);
    else _mm512_mask_cvtepi32_storeu_epi16(od + e * 2, m, q);
  }
};

// The plain or requantizing epilogue writing into out (bd, md: epilogue_constants).
inline Epilogue make_epilogue(torch::Tensor& out, bool fused, const std::vector<double>& bd, const std::vector<int32_t>& bi,
                              const std::vector<float>& md, int64_t lo, int64_t hi) {
  Epilogue e;
  e.fused = fused;
  e.osz = out.element_size();
  e.od = (char*)out.data_ptr();
  e.bias = bd.empty() ? nullptr : bd.data();
  e.bias32 = bi.empty() ? nullptr : bi.data();
  e.mult = md.data();
  e.lo = _mm512_set1_ps((float)lo);
  e.hi = _mm512_set1_ps((float)hi);
  return e;
}

// acc += dot4(u8 a, s8 w) per int32 lane, in place. With the intrinsic GCC copied every
// accumulator to a fresh register and back around each vpdpbusd and folded the weight loads
// into it (one zmm load per product instruction): half the speed of torch._int_mm.
QPIPE_INLINE void dpbusd(__m512i& acc, __m512i a, __m512i w) { asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(w)); }

// 6 output times x 64 channels of a depthwise conv: q0 the packed rows of the first output,
// su / sk the packed-row steps (in vectors) of one output / one tap quad. A short tile computes
// all six (the packed buffer has the rows) and stores fewer. 24 named accumulators, as pw_tile6.
template <typename Store>
QPIPE_INLINE void dw_tile6(const __m512i* q0, const __m512i* wc, int64_t KQ, int64_t su, int64_t sk, Store&& store) {
#define QPIPE_DW_ZERO(U) __m512i c##U##0 = _mm512_setzero_si512(), c##U##1 = c##U##0, c##U##2 = c##U##0, c##U##3 = c##U##0;
  QPIPE_DW_ZERO(0) QPIPE_DW_ZERO(1) QPIPE_DW_ZERO(2) QPIPE_DW_ZERO(3) QPIPE_DW_ZERO(4) QPIPE_DW_ZERO(5)
#undef QPIPE_DW_ZERO
  for (int64_t kq = 0; kq < KQ; ++kq) {
    const __m512i w0 = _mm512_loadu_si512(wc + 4 * kq), w1 = _mm512_loadu_si512(wc + 4 * kq + 1);
    const __m512i w2 = _mm512_loadu_si512(wc + 4 * kq + 2), w3 = _mm512_loadu_si512(wc + 4 * kq + 3);
    const __m512i* qk = q0 + sk * kq;
#define QPIPE_DW_ROW(U)                                              \
  {                                                                  \
    const __m512i* qu = qk + su * (U);                               \
    dpbusd(c##U##0, _mm512_loadu_si512(qu), w0);                     \
    dpbusd(c##U##1, _mm512_loadu_si512(qu + 1), w1);                 \
    dpbusd(c##U##2, _mm512_loadu_si512(qu + 2), w2);                 \
    dpbusd(c##U##3, _mm512_loadu_si512(qu + 3), w3);                 \
  }
    QPIPE_DW_ROW(0) QPIPE_DW_ROW(1) QPIPE_DW_ROW(2) QPIPE_DW_ROW(3) QPIPE_DW_ROW(4) QPIPE_DW_ROW(5)
#undef QPIPE_DW_ROW
  }
#define QPIPE_DW_STORE(U)                                            \
  {                                                                  \
    const __m512i acc[4] = {c##U##0, c##U##1, c##U##2, c##U##3};     \
    __m512i o[4];                                                    \
    lanes_to_channels(acc, o);                                       \
    store(U, o);                                                     \
  }
  QPIPE_DW_STORE(0) QPIPE_DW_STORE(1) QPIPE_DW_STORE(2) QPIPE_DW_STORE(3) QPIPE_DW_STORE(4) QPIPE_DW_STORE(5)
#undef QPIPE_DW_STORE
}


// 6 rows x 64 columns of a GEMM: xr the 6 input rows (a short tile repeats a row and stores fewer),
// kfull whole quads of K, the K % 4 tail read byte by byte (never past a row; the weights past K are
// zero). 24 named accumulators (an array of them GCC kept on the stack), the 4 weight vectors of a
// k-quad and one broadcast row at a time: 30 of the 32 zmm registers. (4 x 64 tiles ran 1-3 % slower.)
template <typename Store>
QPIPE_INLINE void pw_tile6(const uint8_t* const* xr, const __m512i* wc, int64_t K, int64_t kfull, uint32_t flip, Store&& store) {
#define QPIPE_PW_ZERO(R) __m512i c##R##0 = _mm512_setzero_si512(), c##R##1 = c##R##0, c##R##2 = c##R##0, c##R##3 = c##R##0;
  QPIPE_PW_ZERO(0) QPIPE_PW_ZERO(1) QPIPE_PW_ZERO(2) QPIPE_PW_ZERO(3) QPIPE_PW_ZERO(4) QPIPE_PW_ZERO(5)
#undef QPIPE_PW_ZERO
  const __m512i vflip = _mm512_set1_epi32((int)flip);
#define QPIPE_PW_ROW(R, A)                                    \
  {                                                           \
    const __m512i a = (A);                                    \
    dpbusd(c##R##0, a, w0); dpbusd(c##R##1, a, w1);           \
    dpbusd(c##R##2, a, w2); dpbusd(c##R##3, a, w3);           \
  }
#define QPIPE_PW_WEIGHTS(KQ_)                                                                               \
  const __m512i w0 = _mm512_loadu_si512(wc + 4 * (KQ_)), w1 = _mm512_loadu_si512(wc + 4 * (KQ_) + 1);     \
  const __m512i w2 = _mm512_loadu_si512(wc + 4 * (KQ_) + 2), w3 = _mm512_loadu_si512(wc + 4 * (KQ_) + 3);
#define QPIPE_BCAST(R) _mm512_xor_si512(_mm512_set1_epi32(*(const int32_t*)(xr[R] + 4 * kq)), vflip)
  for (int64_t kq = 0; kq < kfull; ++kq) {
    QPIPE_PW_WEIGHTS(kq)
    QPIPE_PW_ROW(0, QPIPE_BCAST(0)) QPIPE_PW_ROW(1, QPIPE_BCAST(1)) QPIPE_PW_ROW(2, QPIPE_BCAST(2))
    QPIPE_PW_ROW(3, QPIPE_BCAST(3)) QPIPE_PW_ROW(4, QPIPE_BCAST(4)) QPIPE_PW_ROW(5, QPIPE_BCAST(5))
  }
#undef QPIPE_BCAST
  if (4 * kfull < K) {  // the K % 4 tail, read byte by byte
    uint32_t t[6];
    for (int r = 0; r < 6; ++r) {
      t[r] = 0;
      std::memcpy(&t[r], xr[r] + 4 * kfull, (size_t)(K - 4 * kfull));
      t[r] ^= flip;
    }
    QPIPE_PW_WEIGHTS(kfull)
    QPIPE_PW_ROW(0, _mm512_set1_epi32((int)t[0])) QPIPE_PW_ROW(1, _mm512_set1_epi32((int)t[1]))
    QPIPE_PW_ROW(2, _mm512_set1_epi32((int)t[2])) QPIPE_PW_ROW(3, _mm512_set1_epi32((int)t[3]))
    QPIPE_PW_ROW(4, _mm512_set1_epi32((int)t[4])) QPIPE_PW_ROW(5, _mm512_set1_epi32((int)t[5]))
  }
#undef QPIPE_PW_ROW
#undef QPIPE_PW_WEIGHTS
  store(0, c00, c01, c02, c03);
  store(1, c10, c11, c12, c13);
  store(2, c20, c21, c22, c23);
  store(3, c30, c31, c32, c33);
  store(4, c40, c41, c42, c43);
  store(5, c50, c51, c52, c53);
}
}  // namespace
#endif

// The depthwise kernel on x: B x T x C codes at xd, channels-last and dense (sgn: int8, read as x + 128),
// into out (B x Tout x C elements in that order, whatever its shape and strides say).
void dw_vnni_into(const uint8_t* xd, bool sgn, int64_t B, int64_t T, int64_t C, const torch::Tensor& w4, int64_t K,
                  int64_t stride, int64_t pad, int64_t dil, const torch::Tensor& bias, const torch::Tensor& mult, int64_t lo,
                  int64_t hi, torch::Tensor& out, int64_t Tout);

// The AVX2 kernels' epilogue constants as raw pointers: the int64 bias (or none) and the float32
// multipliers (none: int32 accumulators out), the clamp as floats.
struct Avx2Epilogue {
  const int64_t* bias;
  const float* mult;
  float lo, hi;
  Avx2Epilogue(const torch::Tensor& b, const torch::Tensor& m, int64_t lo_, int64_t hi_)
      : bias(b.numel() ? b.data_ptr<int64_t>() : nullptr), mult(m.numel() ? m.data_ptr<float>() : nullptr),
        lo((float)lo_), hi((float)hi_) {}
};

// f(out's data as the kernel's output type): int32 accumulators unfused, else out_code's 8/16-bit codes.
template <class F>
void with_out_type(bool fused, int64_t out_code, torch::Tensor& out, F&& f) {
  if (!fused) f(out.data_ptr<int32_t>());
  else if (out_code == 8) f(out.data_ptr<int8_t>());
  else if (out_code == -8) f(out.data_ptr<uint8_t>());
  else f(out.data_ptr<int16_t>());
}

// The epilogue arguments both VNNI kernels take for n output channels: an empty mult and bias (int32
// accumulators out), or a float32 mult (n), an int64 / int32 bias (n) or none, and an 8/16-bit output.
void check_epilogue_args(const char* kernel, const torch::Tensor& bias, const torch::Tensor& mult, int64_t n,
                         int64_t out_code) {
  const bool fused = mult.numel() > 0;
  TORCH_CHECK(!fused || (mult.dtype() == torch::kFloat32 && mult.numel() == n), kernel, ": mult must be float32 (", n,
              ") or empty");
  TORCH_CHECK(bias.numel() == 0 || (fused && (bias.dtype() == torch::kInt64 || bias.dtype() == torch::kInt32) && bias.numel() == n),
              kernel, ": bias must be int64 or int32 (", n, "), and only with a fused requant (else empty)");
  TORCH_CHECK(!fused || out_code == 8 || out_code == -8 || out_code == 16, kernel, ": fused output is int8, uint8 or int16");
}

// The output length of dw_conv1d_vnni, the geometry and the constants checked.
int64_t dw_vnni_check(int64_t T, int64_t C, const torch::Tensor& w4, int64_t K, int64_t stride, int64_t pad, int64_t dil,
                      const torch::Tensor& bias, const torch::Tensor& mult, int64_t out_code) {
  const int64_t ncb = (C + 63) / 64;
  TORCH_CHECK(w4.dtype() == torch::kInt8 && w4.dim() == 6 && w4.size(0) == ncb && w4.size(2) == 4 && w4.size(3) == 4 &&
                  w4.size(4) == 4 && w4.size(5) == 4 && w4.is_contiguous(),
              "dw_conv1d_vnni: w4 must be int8 (ceil(C/64), KQ, 4, 4, 4, 4)");
  const int64_t KQ = w4.size(1);
  TORCH_CHECK(K >= 1 && K <= 4 * KQ && stride >= 1 && dil >= 1 && pad >= 0, "dw_conv1d_vnni: bad geometry");
  const int64_t Tout = (T + 2 * pad - dil * (K - 1) - 1) / stride + 1;
  TORCH_CHECK(Tout > 0, "dw_conv1d_vnni: empty output");
  check_epilogue_args("dw_conv1d_vnni", bias, mult, C, out_code);
  return Tout;
}

inline c10::ScalarType vnni_out_dtype(const torch::Tensor& mult, int64_t out_code) {
  return mult.numel() > 0 ? out_dtype(out_code) : torch::kInt32;
}

torch::Tensor dw_conv1d_vnni(torch::Tensor x, torch::Tensor w4, int64_t K, int64_t stride, int64_t pad, int64_t dil,
                             torch::Tensor bias, torch::Tensor mult, int64_t lo, int64_t hi, int64_t out_code) {
  TORCH_CHECK(is_codes(x) && x.dim() == 3 && x.is_contiguous(), "dw_conv1d_vnni: x must be contiguous int8/uint8 (B,T,C)");
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2);
  const int64_t Tout = dw_vnni_check(T, C, w4, K, stride, pad, dil, bias, mult, out_code);
  auto out = torch::empty({B, Tout, C}, x.options().dtype(vnni_out_dtype(mult, out_code)));
  dw_vnni_into((const uint8_t*)x.data_ptr(), x.dtype() == torch::kInt8, B, T, C, w4, K, stride, pad, dil, bias, mult, lo,
               hi, out, Tout);
  return out;
}

void dw_vnni_into(const uint8_t* xd, bool sgn, int64_t B, int64_t T, int64_t C, const torch::Tensor& w4, int64_t K,
                  int64_t stride, int64_t pad, int64_t dil, const torch::Tensor& bias, const torch::Tensor& mult, int64_t lo,
                  int64_t hi, torch::Tensor& out, int64_t Tout) {
  const int64_t ncb = (C + 63) / 64, KQ = w4.size(1);
  const bool fused = mult.numel() > 0;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
  constexpr int TBV = 6;       // output times in registers (4 x 6 accumulators + 4 weights)
  const int8_t* wd = w4.data_ptr<int8_t>();
  std::vector<double> bd;
  std::vector<int32_t> bi;
  std::vector<float> md;
  epilogue_constants(bias, mult, fused, C, ncb, bd, bi, md);
  const Epilogue epi = make_epilogue(out, fused, bd, bi, md, lo, hi);
  // Work items are (batch, time tile) of at most 128 output times, as many as makes them split evenly over
  // the threads and of near-equal length (128-time tiles left one of two threads with 64 % of a
  // QuartzNet layer at batch 1: 401 times = 128 + 128 + 128 + 17).
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  int64_t ntile = (Tout + 127) / 128;
  for (int64_t n = ntile; n < 2 * ntile; ++n)
    if ((B * n) % nthreads == 0) {
      ntile = n;
      break;
    }
  const int64_t TT = ((Tout + ntile - 1) / ntile + TBV - 1) / TBV * TBV;  // output times per tile, whole micro-tiles
  ntile = (Tout + TT - 1) / TT;
  const int64_t qspan = 4 * dil * (KQ - 1);  // Q rows one output reaches past its first
  const __m512i flip = _mm512_set1_epi8(sgn ? (char)0x80 : 0);  // also the (shifted) zero of the padding
  at::parallel_for(0, B * ntile, 1, [&](int64_t begin, int64_t end) {
    std::vector<__m512i> qbuf((size_t)(4 * ((TT - 1 + TBV) * stride + qspan + 1)));  // + TBV: a short last micro-tile reads past nt
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / ntile, tile = i % ntile;
      const int64_t t0 = tile * TT, nt = std::min<int64_t>(TT, Tout - t0);
      const int64_t r0 = t0 * stride, nq = (nt - 1) * stride + qspan + 1;  // Q rows [r0, r0 + nq)
      for (int64_t cb = 0; cb < ncb; ++cb) {
        const int64_t c0 = cb * 64, nc = std::min<int64_t>(64, C - c0);
        const __mmask64 cm = byte_mask(nc);
        const uint8_t* xb = xd + b * T * C + c0;
        for (int64_t q = 0; q < nq; ++q) {
          __m512i v[4];
          for (int j = 0; j < 4; ++j) {
            const int64_t src = r0 + q + j * dil - pad;  // input time of padded row r0 + q + j*d
            v[j] = (src >= 0 && src < T) ? _mm512_xor_si512(_mm512_maskz_loadu_epi8(cm, xb + src * C), flip) : flip;
          }
          const __m512i ab_lo = _mm512_unpacklo_epi8(v[0], v[1]), ab_hi = _mm512_unpackhi_epi8(v[0], v[1]);
          const __m512i cd_lo = _mm512_unpacklo_epi8(v[2], v[3]), cd_hi = _mm512_unpackhi_epi8(v[2], v[3]);
          __m512i* qr = qbuf.data() + 4 * q;
          qr[0] = _mm512_unpacklo_epi16(ab_lo, cd_lo);
          qr[1] = _mm512_unpackhi_epi16(ab_lo, cd_lo);
          qr[2] = _mm512_unpacklo_epi16(ab_hi, cd_hi);
          qr[3] = _mm512_unpackhi_epi16(ab_hi, cd_hi);
        }
        const __m512i* wc = (const __m512i*)(wd + cb * KQ * 256);
        __mmask16 sm[4];
        for (int L = 0; L < 4; ++L) sm[L] = lane_mask(nc - 16 * L);
        for (int64_t tb = 0; tb < nt; tb += TBV) {
          const int nb = (int)std::min<int64_t>(TBV, nt - tb);
          auto store = [&](int u, const __m512i* o) QPIPE_INLINE_LAMBDA {
            if (u >= nb) return;
            const int64_t row = (b * Tout + t0 + tb + u) * C + c0;  // element index of channel c0
            for (int L = 0; L < 4; ++L)
              if (sm[L]) epi.store16(row + 16 * L, c0 + 16 * L, sm[L], o[L]);
          };
          const __m512i* q0 = qbuf.data() + 4 * tb * stride;
          const int64_t su = 4 * stride, sk = 16 * dil;
          dw_tile6(q0, wc, KQ, su, sk, store);
        }
      }
    }
  });
#else
  TORCH_CHECK(false, "dw_conv1d_vnni: built without AVX-512 VNNI");
#endif
}

// Pointwise conv / linear as an (M, K) x (K, N) GEMM on 8-bit codes with AVX-512 VNNI, the
// same arithmetic and epilogue as dw_conv1d_vnni: x uint8 as it is or int8 as x + 128 (the caller
// folds -128 * sum_k w[n, k] into the bias), int32 accumulators (exact while 255 * sum_k |w| < 2**31),
// and either the int32 result (empty ``mult`` and ``bias``) or the float32-faithful requant fused in
// (out_code 8 / -8 / 16). Fusing saves what torch._int_mm + a requant pass cost besides the
// products: the int32 (M, N) round trip through memory, the uint8 -> int8 XOR pass, the padding.
//
// wp: int8 (ceil(N/64), ceil(K/4), 4 v, 16 n, 4 k): column 64*nb + 16v + n, rows 4kq..4kq+3, zero
// past N and K. A micro-tile is 6 rows x 64 columns (24 accumulators); per k-quad, 4 weight
// vectors and one broadcast of 4 input bytes per row. Tiles go in blocks of 96 rows x 64 columns, so
// the weight panel (K * 64 bytes) is reused from L1/L2 across the rows.
// The weights and constants of pw_gemm_vnni checked against K input channels.
void pw_vnni_check(int64_t K, const torch::Tensor& wp, int64_t N, const torch::Tensor& bias, const torch::Tensor& mult,
                   int64_t out_code) {
  const int64_t nnb = (N + 63) / 64, KQ = (K + 3) / 4;
  TORCH_CHECK(wp.dtype() == torch::kInt8 && wp.dim() == 5 && wp.size(0) == nnb && wp.size(1) == KQ && wp.size(2) == 4 &&
                  wp.size(3) == 16 && wp.size(4) == 4 && wp.is_contiguous(),
              "pw_gemm_vnni: wp must be int8 (ceil(N/64), ceil(K/4), 4, 16, 4)");
  check_epilogue_args("pw_gemm_vnni", bias, mult, N, out_code);
}

// The GEMM on M x K dense row-major codes at xd (sgn: int8, read as x + 128) into out (M x N elements
// in row-major order, whatever its shape and strides say).
void pw_vnni_into(const uint8_t* xd, bool sgn, int64_t M, int64_t K, const torch::Tensor& wp, int64_t N,
                  const torch::Tensor& bias, const torch::Tensor& mult, int64_t lo, int64_t hi, torch::Tensor& out);

torch::Tensor pw_gemm_vnni(torch::Tensor x, torch::Tensor wp, int64_t N, torch::Tensor bias, torch::Tensor mult,
                           int64_t lo, int64_t hi, int64_t out_code) {
  TORCH_CHECK(is_codes(x) && x.dim() == 2 && x.is_contiguous(), "pw_gemm_vnni: x must be contiguous int8/uint8 (M,K)");
  const int64_t M = x.size(0), K = x.size(1);
  pw_vnni_check(K, wp, N, bias, mult, out_code);
  auto out = torch::empty({M, N}, x.options().dtype(vnni_out_dtype(mult, out_code)));
  pw_vnni_into((const uint8_t*)x.data_ptr(), x.dtype() == torch::kInt8, M, K, wp, N, bias, mult, lo, hi, out);
  return out;
}

void pw_vnni_into(const uint8_t* xd, bool sgn, int64_t M, int64_t K, const torch::Tensor& wp, int64_t N,
                  const torch::Tensor& bias, const torch::Tensor& mult, int64_t lo, int64_t hi, torch::Tensor& out) {
  if (M == 0) return;
  const int64_t nnb = (N + 63) / 64, KQ = (K + 3) / 4;
  const bool fused = mult.numel() > 0;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
  constexpr int MR = 6;       // rows per micro-tile (pw_tile6)
  constexpr int64_t MB = 96;  // rows per work item
  const uint32_t flip = sgn ? 0x80808080u : 0u;
  const int8_t* wd = wp.data_ptr<int8_t>();
  std::vector<double> bd;
  std::vector<int32_t> bi;
  std::vector<float> md;
  epilogue_constants(bias, mult, fused, N, nnb, bd, bi, md);
  const Epilogue epi = make_epilogue(out, fused, bd, bi, md, lo, hi);
  const int64_t kfull = K / 4;  // whole quads; a tail of K % 4 bytes is read byte by byte
  // Work units are micro-tiles, ordered (row block, column block, tile) so that a thread's run of them
  // reuses one row block across the column blocks (L2) and one weight panel across a block's tiles (L1);
  // each thread takes an equal run of units. (Whole 96 x 64 blocks as the units left one of two threads
  // with up to 64 % of the work at QuartzNet's 401 rows: 15 blocks, the last ones 17 rows.)
  constexpr int64_t TPB = MB / MR;  // tiles per full row block
  const int64_t full = M / MB, last_tiles = (M - full * MB + MR - 1) / MR;
  const int64_t reg_units = full * nnb * TPB, units = reg_units + nnb * last_tiles;
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  at::parallel_for(0, units, (units + nthreads - 1) / nthreads, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      int64_t mb, nb, tile;
      if (u < reg_units) {
        mb = u / (nnb * TPB);
        nb = (u / TPB) % nnb;
        tile = u % TPB;
      } else {
        mb = full;
        nb = (u - reg_units) / last_tiles;
        tile = (u - reg_units) % last_tiles;
      }
      const int64_t n0 = nb * 64, nn = std::min<int64_t>(64, N - n0);
      __mmask16 sm[4];
      for (int v = 0; v < 4; ++v) sm[v] = lane_mask(nn - 16 * v);
      const __m512i* wc = (const __m512i*)(wd + nb * KQ * 256);
      {
        const int64_t m0 = mb * MB + tile * MR;
        const int nr = (int)std::min<int64_t>(MR, M - m0);
        const uint8_t* xr[MR];
        for (int r = 0; r < MR; ++r) xr[r] = xd + (m0 + (r < nr ? r : 0)) * K;
        auto store = [&](int r, __m512i a0, __m512i a1, __m512i a2, __m512i a3) QPIPE_INLINE_LAMBDA {
          if (r >= nr) return;
          const __m512i acc[4] = {a0, a1, a2, a3};
          const int64_t row = (m0 + r) * N + n0;
          for (int v = 0; v < 4; ++v)
            if (sm[v]) epi.store16(row + 16 * v, n0 + 16 * v, sm[v], acc[v]);
        };
        pw_tile6(xr, wc, K, kfull, flip, store);
      }
    }
  });
#else
  TORCH_CHECK(false, "pw_gemm_vnni: built without AVX-512 VNNI");
#endif
}

// The two VNNI convs as the program calls them: x the (B, C, T) view of channels-last (B, T, C) 8-bit
// codes, the result the (B, N, T) view of (B, T, N) storage, the bias for int8 (shifted: read as x + 128)
// or uint8 codes picked by x's dtype. The layout glue lives here, read from strides (channels_last_3d):
// the Python-side transposes and views cost about 5 us a layer at batch 1, the same ops from C++ about 2.
// Any other layout of x is copied to channels-last first.
inline torch::Tensor channels_last_codes(const torch::Tensor& x) {
  TORCH_CHECK(x.dim() == 3 && is_codes(x), "conv1d_cl: x must be int8/uint8 (B,C,T)");
  return channels_last_3d(x) ? x : x.transpose(1, 2).contiguous().transpose(1, 2);
}

torch::Tensor pw_conv1d_cl(torch::Tensor x, torch::Tensor wp, int64_t N, torch::Tensor bias_s8, torch::Tensor bias_u8,
                           torch::Tensor mult, int64_t lo, int64_t hi, int64_t out_code) {
  const torch::Tensor xc = channels_last_codes(x);
  const int64_t B = xc.size(0), K = xc.size(1), T = xc.size(2);
  const bool sgn = xc.dtype() == torch::kInt8;
  const torch::Tensor& bias = sgn ? bias_s8 : bias_u8;
  pw_vnni_check(K, wp, N, bias, mult, out_code);
  auto out = empty_channels_last_3d(B, N, T, xc.options().dtype(vnni_out_dtype(mult, out_code)));
  pw_vnni_into((const uint8_t*)xc.data_ptr(), sgn, B * T, K, wp, N, bias, mult, lo, hi, out);
  return out;
}

torch::Tensor dw_conv1d_cl(torch::Tensor x, torch::Tensor w4, int64_t K, int64_t stride, int64_t pad, int64_t dil,
                           torch::Tensor bias_s8, torch::Tensor bias_u8, torch::Tensor mult, int64_t lo, int64_t hi,
                           int64_t out_code) {
  const torch::Tensor xc = channels_last_codes(x);
  const int64_t B = xc.size(0), C = xc.size(1), T = xc.size(2);
  const bool sgn = xc.dtype() == torch::kInt8;
  const torch::Tensor& bias = sgn ? bias_s8 : bias_u8;
  const int64_t Tout = dw_vnni_check(T, C, w4, K, stride, pad, dil, bias, mult, out_code);
  auto out = empty_channels_last_3d(B, C, Tout, xc.options().dtype(vnni_out_dtype(mult, out_code)));
  dw_vnni_into((const uint8_t*)xc.data_ptr(), sgn, B, T, C, w4, K, stride, pad, dil, bias, mult, lo, hi, out, Tout);
  return out;
}

// Pointwise conv / linear as an (M, K) x (K, N) GEMM on 8-bit codes with AVX2 only (no VNNI: AMD
// Zen 3, older Intel), exact: vpmaddwd multiplies int16 pairs into int32 lanes without saturation
// (vpmaddubsw, the u8 x s8 instruction, saturates each pair at int16: what makes ORT's MLAS AVX2 kernel
// inexact, onnxruntime#16105). The codes are widened to int16 once per block of rows (int8 read as
// x + 128, as pw_gemm_vnni; the caller folds -128 * sum_k w into the bias); the weights come widened:
// wp int16 (ceil(N/16), ceil(K/2), 16 n, 2 k), column 16*nb + n, rows 2kp, 2kp+1, zero past N and K.
// int32 accumulators, exact while 255 * sum_k |w| < 2**31. A micro-tile is 6 rows x 16 columns (12
// named ymm accumulators; per k-pair two weight vectors and one broadcast pair per row). Output: the
// int32 accumulators (empty ``mult``), or rq_f32_row's float32-faithful requant of each tile row with
// an int64 bias (or none), out_code 8 / -8 / 16.
bool pw_avx2_available() {
#if defined(__AVX2__)
  return true;
#else
  return false;
#endif
}

#if defined(__AVX2__)
namespace {
template <typename Store>
__attribute__((always_inline)) inline void pw_tile6_avx2(const int16_t* xw, int64_t KP, const int16_t* wc, int64_t nkp,
                                                         Store&& store) {
#define QPIPE_A2_ZERO(R) __m256i c##R##0 = _mm256_setzero_si256(), c##R##1 = c##R##0;
  QPIPE_A2_ZERO(0) QPIPE_A2_ZERO(1) QPIPE_A2_ZERO(2) QPIPE_A2_ZERO(3) QPIPE_A2_ZERO(4) QPIPE_A2_ZERO(5)
#undef QPIPE_A2_ZERO
  for (int64_t kp = 0; kp < nkp; ++kp) {
    const __m256i w0 = _mm256_loadu_si256((const __m256i*)(wc + 32 * kp));
    const __m256i w1 = _mm256_loadu_si256((const __m256i*)(wc + 32 * kp + 16));
#define QPIPE_A2_ROW(R)                                                                  \
  {                                                                                      \
    const __m256i a = _mm256_set1_epi32(*(const int32_t*)(xw + (R) * KP + 2 * kp));      \
    c##R##0 = _mm256_add_epi32(c##R##0, _mm256_madd_epi16(a, w0));                       \
    c##R##1 = _mm256_add_epi32(c##R##1, _mm256_madd_epi16(a, w1));                       \
  }
    QPIPE_A2_ROW(0) QPIPE_A2_ROW(1) QPIPE_A2_ROW(2) QPIPE_A2_ROW(3) QPIPE_A2_ROW(4) QPIPE_A2_ROW(5)
#undef QPIPE_A2_ROW
  }
  store(0, c00, c01);
  store(1, c10, c11);
  store(2, c20, c21);
  store(3, c30, c31);
  store(4, c40, c41);
  store(5, c50, c51);
}

template <typename OutT>
void pw_avx2_run(const uint8_t* xd, bool sgn, int64_t M, int64_t K, const int16_t* wd, int64_t N, const int64_t* bd,
                 const float* md, float lo, float hi, OutT* od) {
  constexpr int MR = 6;
  constexpr int64_t MB = 24;  // rows per block: widened once (24 x K int16), then every column block
  const int64_t KP = (K + 1) / 2 * 2, nkp = KP / 2, nnb = (N + 15) / 16;
  const int64_t nmb = (M + MB - 1) / MB, units = nmb * nnb;
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  const uint8_t flip = sgn ? 0x80 : 0;
  at::parallel_for(0, units, (units + nthreads - 1) / nthreads, [&](int64_t begin, int64_t end) {
    std::vector<int16_t> xw((size_t)((MB + MR) * KP), 0);  // + MR: a short last tile reads zero rows
    int64_t widened = -1;
    alignas(32) int32_t acc[MR][16];
    for (int64_t u = begin; u < end; ++u) {
      const int64_t mb = u / nnb, nb = u % nnb;
      const int64_t m0 = mb * MB, nm = std::min<int64_t>(MB, M - m0);
      if (widened != mb) {  // a run of units shares its row block: widen it once
        for (int64_t r = 0; r < nm; ++r) {
          const uint8_t* xr = xd + (m0 + r) * K;
          int16_t* wr = xw.data() + r * KP;
          for (int64_t k = 0; k < K; ++k) wr[k] = (int16_t)(uint8_t)(xr[k] ^ flip);
          if (KP > K) wr[K] = 0;
        }
        for (int64_t r = nm; r < MB + MR; ++r) std::fill(xw.begin() + r * KP, xw.begin() + (r + 1) * KP, (int16_t)0);
        widened = mb;
      }
      const int64_t n0 = nb * 16, nn = std::min<int64_t>(16, N - n0);
      const int16_t* wc = wd + nb * nkp * 32;
      for (int64_t t = 0; t < nm; t += MR) {
        const int nr = (int)std::min<int64_t>(MR, nm - t);
        auto store = [&](int r, __m256i a0, __m256i a1) __attribute__((always_inline)) {
          _mm256_store_si256((__m256i*)acc[r], a0);
          _mm256_store_si256((__m256i*)(acc[r] + 8), a1);
        };
        pw_tile6_avx2(xw.data() + t * KP, KP, wc, nkp, store);
        for (int r = 0; r < nr; ++r) {
          OutT* o = od + (m0 + t + r) * N + n0;
          if (md) rq_f32_row<int32_t, OutT>(acc[r], o, bd ? bd + n0 : nullptr, md + n0, nn, lo, hi);
          else std::memcpy(o, acc[r], (size_t)nn * sizeof(int32_t));
        }
      }
    }
  });
}
}  // namespace
#endif

// x: int8 / uint8 (M, K) contiguous; wp: int16 (ceil(N/16), ceil(K/2), 16, 2); bias int64 (N) or empty
// (with a mult only); mult float32 (N) or empty (int32 accumulators out).
torch::Tensor pw_gemm_avx2(torch::Tensor x, torch::Tensor wp, int64_t N, torch::Tensor bias, torch::Tensor mult, int64_t lo,
                           int64_t hi, int64_t out_code) {
  TORCH_CHECK(is_codes(x) && x.dim() == 2 && x.is_contiguous(), "pw_gemm_avx2: x must be contiguous int8/uint8 (M,K)");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(wp.dtype() == torch::kInt16 && wp.dim() == 4 && wp.size(0) == (N + 15) / 16 && wp.size(1) == (K + 1) / 2 &&
                  wp.size(2) == 16 && wp.size(3) == 2 && wp.is_contiguous(),
              "pw_gemm_avx2: wp must be int16 (ceil(N/16), ceil(K/2), 16, 2)");
  const bool fused = mult.numel() > 0;
  check_epilogue_args("pw_gemm_avx2", bias, mult, N, out_code);
  TORCH_CHECK(mult.is_contiguous() && (bias.numel() == 0 || (bias.dtype() == torch::kInt64 && bias.is_contiguous())),
              "pw_gemm_avx2: mult and bias must be contiguous, the bias int64 (the AVX2 epilogue sums in int64)");
  auto out = torch::empty({M, N}, x.options().dtype(fused ? out_dtype(out_code) : torch::kInt32));
  if (M == 0) return out;
#if defined(__AVX2__)
  const uint8_t* xd = (const uint8_t*)x.data_ptr();
  const bool sgn = x.dtype() == torch::kInt8;
  const int16_t* wd = wp.data_ptr<int16_t>();
  const Avx2Epilogue e(bias, mult, lo, hi);
  with_out_type(fused, out_code, out, [&](auto* o) { pw_avx2_run(xd, sgn, M, K, wd, N, e.bias, e.mult, e.lo, e.hi, o); });
#else
  TORCH_CHECK(false, "pw_gemm_avx2: built without AVX2");
#endif
  return out;
}

// Depthwise conv1d on 8-bit codes with AVX2 only, exact, the same arithmetic and epilogue as
// pw_gemm_avx2: per 16 channels and a tile of output times the padded input (int8 read as x + 128,
// padding the shifted zero) is widened to int16 and packed in tap pairs, Q[r] = (xp[r], xp[r+d]) per
// channel, so that output t is the sum over kp of vpmaddwd(Q[t*stride + 2*d*kp], w[taps 2kp, 2kp+1]).
// The word unpacks leave vector 0 holding channels 0-3 and 8-11, vector 1 channels 4-7 and 12-15;
// the weights (``w2``, built by the caller) come in that order: int16 (ceil(C/16), KP, 16, 2) for
// channel order (0-3, 8-11, 4-7, 12-15), zero past C and past the layer's K taps. A micro-tile is 6
// output times x 16 channels (12 accumulators). Exact while 255 * sum_k |w| < 2**31.
#if defined(__AVX2__)
namespace {
template <typename OutT>
void dw_avx2_run(const uint8_t* xd, bool sgn, int64_t B, int64_t T, int64_t C, const int16_t* wd, int64_t KP,
                 int64_t stride, int64_t pad, int64_t dil, int64_t Tout, const int64_t* bd, const float* md, float lo,
                 float hi, OutT* od) {
  constexpr int TBV = 6;
  const int64_t ncb = (C + 15) / 16;
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  int64_t ntile = (Tout + 127) / 128;
  for (int64_t n = ntile; n < 2 * ntile; ++n)
    if ((B * n) % nthreads == 0) {
      ntile = n;
      break;
    }
  const int64_t TT = ((Tout + ntile - 1) / ntile + TBV - 1) / TBV * TBV;
  ntile = (Tout + TT - 1) / TT;
  const int64_t qspan = 2 * dil * (KP - 1);  // Q rows one output reaches past its first
  const uint8_t flip = sgn ? 0x80 : 0;
  at::parallel_for(0, B * ntile, 1, [&](int64_t begin, int64_t end) {
    std::vector<__m256i> qbuf((size_t)(2 * ((TT - 1 + TBV) * stride + qspan + 1)));
    alignas(32) int32_t acc[TBV][16];
    alignas(32) uint8_t row0[16], row1[16];
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / ntile, tile = i % ntile;
      const int64_t t0 = tile * TT, nt = std::min<int64_t>(TT, Tout - t0);
      const int64_t r0 = t0 * stride, nq = (nt - 1) * stride + qspan + 1;
      const int64_t nqb = (int64_t)qbuf.size() / 2;  // rows past nq (a short micro-tile reads them) stay as they are
      for (int64_t cb = 0; cb < ncb; ++cb) {
        const int64_t c0 = cb * 16, nc = std::min<int64_t>(16, C - c0);
        const uint8_t* xb = xd + b * T * C + c0;
        auto load = [&](int64_t src, uint8_t* row) {
          if (src >= 0 && src < T) {
            const uint8_t* p = xb + src * C;
            for (int64_t c = 0; c < nc; ++c) row[c] = p[c] ^ flip;
            for (int64_t c = nc; c < 16; ++c) row[c] = 0;
          } else {
            std::memset(row, flip, 16);
          }
        };
        for (int64_t q = 0; q < std::min(nq, nqb); ++q) {
          load(r0 + q - pad, row0);
          load(r0 + q + dil - pad, row1);
          const __m256i a = _mm256_cvtepu8_epi16(_mm_load_si128((const __m128i*)row0));
          const __m256i c = _mm256_cvtepu8_epi16(_mm_load_si128((const __m128i*)row1));
          qbuf[2 * q] = _mm256_unpacklo_epi16(a, c);
          qbuf[2 * q + 1] = _mm256_unpackhi_epi16(a, c);
        }
        const int16_t* wc = wd + cb * KP * 32;
        for (int64_t tb = 0; tb < nt; tb += TBV) {
          const int nb = (int)std::min<int64_t>(TBV, nt - tb);
          const __m256i* q0 = qbuf.data() + 2 * tb * stride;
          const int64_t su = 2 * stride, sk = 4 * dil;  // vectors per output step / per tap pair
#define QPIPE_D2_ZERO(U) __m256i c##U##0 = _mm256_setzero_si256(), c##U##1 = c##U##0;
          QPIPE_D2_ZERO(0) QPIPE_D2_ZERO(1) QPIPE_D2_ZERO(2) QPIPE_D2_ZERO(3) QPIPE_D2_ZERO(4) QPIPE_D2_ZERO(5)
#undef QPIPE_D2_ZERO
          for (int64_t kp = 0; kp < KP; ++kp) {
            const __m256i w0 = _mm256_loadu_si256((const __m256i*)(wc + 32 * kp));
            const __m256i w1 = _mm256_loadu_si256((const __m256i*)(wc + 32 * kp + 16));
            const __m256i* qk = q0 + sk * kp;
#define QPIPE_D2_ROW(U)                                                                    \
  {                                                                                        \
    const __m256i* qu = qk + su * (U);                                                     \
    c##U##0 = _mm256_add_epi32(c##U##0, _mm256_madd_epi16(_mm256_loadu_si256(qu), w0));     \
    c##U##1 = _mm256_add_epi32(c##U##1, _mm256_madd_epi16(_mm256_loadu_si256(qu + 1), w1)); \
  }
            QPIPE_D2_ROW(0) QPIPE_D2_ROW(1) QPIPE_D2_ROW(2) QPIPE_D2_ROW(3) QPIPE_D2_ROW(4) QPIPE_D2_ROW(5)
#undef QPIPE_D2_ROW
          }
#define QPIPE_D2_STORE(U)                                                                   \
  _mm256_store_si256((__m256i*)acc[U], _mm256_permute2x128_si256(c##U##0, c##U##1, 0x20));  \
  _mm256_store_si256((__m256i*)(acc[U] + 8), _mm256_permute2x128_si256(c##U##0, c##U##1, 0x31));
          QPIPE_D2_STORE(0) QPIPE_D2_STORE(1) QPIPE_D2_STORE(2) QPIPE_D2_STORE(3) QPIPE_D2_STORE(4) QPIPE_D2_STORE(5)
#undef QPIPE_D2_STORE
          for (int u = 0; u < nb; ++u) {
            OutT* o = od + (b * Tout + t0 + tb + u) * C + c0;
            if (md) rq_f32_row<int32_t, OutT>(acc[u], o, bd ? bd + c0 : nullptr, md + c0, nc, lo, hi);
            else std::memcpy(o, acc[u], (size_t)nc * sizeof(int32_t));
          }
        }
      }
    }
  });
}
}  // namespace
#endif

// x: int8 / uint8 (B, T, C) contiguous; w2: int16 (ceil(C/16), KP, 16, 2) with 2 * KP >= K; bias int64 (C)
// or empty (with a mult only); mult float32 (C) or empty (int32 accumulators out). Returns (B, Tout, C).
torch::Tensor dw_conv1d_avx2(torch::Tensor x, torch::Tensor w2, int64_t K, int64_t stride, int64_t pad, int64_t dil,
                             torch::Tensor bias, torch::Tensor mult, int64_t lo, int64_t hi, int64_t out_code) {
  TORCH_CHECK(is_codes(x) && x.dim() == 3 && x.is_contiguous(), "dw_conv1d_avx2: x must be contiguous int8/uint8 (B,T,C)");
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2);
  TORCH_CHECK(w2.dtype() == torch::kInt16 && w2.dim() == 4 && w2.size(0) == (C + 15) / 16 && w2.size(2) == 16 &&
                  w2.size(3) == 2 && w2.is_contiguous(),
              "dw_conv1d_avx2: w2 must be int16 (ceil(C/16), KP, 16, 2)");
  const int64_t KP = w2.size(1);
  TORCH_CHECK(K >= 1 && K <= 2 * KP && stride >= 1 && dil >= 1 && pad >= 0, "dw_conv1d_avx2: bad geometry");
  const int64_t Tout = (T + 2 * pad - dil * (K - 1) - 1) / stride + 1;
  TORCH_CHECK(Tout > 0, "dw_conv1d_avx2: empty output");
  const bool fused = mult.numel() > 0;
  check_epilogue_args("dw_conv1d_avx2", bias, mult, C, out_code);
  TORCH_CHECK(mult.is_contiguous() && (bias.numel() == 0 || (bias.dtype() == torch::kInt64 && bias.is_contiguous())),
              "dw_conv1d_avx2: mult and bias must be contiguous, the bias int64 (the AVX2 epilogue sums in int64)");
  auto out = torch::empty({B, Tout, C}, x.options().dtype(fused ? out_dtype(out_code) : torch::kInt32));
#if defined(__AVX2__)
  const uint8_t* xd = (const uint8_t*)x.data_ptr();
  const bool sgn = x.dtype() == torch::kInt8;
  const int16_t* wd = w2.data_ptr<int16_t>();
  const Avx2Epilogue e(bias, mult, lo, hi);
  with_out_type(fused, out_code, out, [&](auto* o) {
    dw_avx2_run(xd, sgn, B, T, C, wd, KP, stride, pad, dil, Tout, e.bias, e.mult, e.lo, e.hi, o);
  });
#else
  TORCH_CHECK(false, "dw_conv1d_avx2: built without AVX2");
#endif
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("dw_conv1d_avx2", &dw_conv1d_avx2, "depthwise conv1d, 8-bit codes, int32 out or fused f32 requant (AVX2, exact)");
  mod.def("pw_avx2_available", &pw_avx2_available, "built with AVX2 (pw_gemm_avx2 works)");
  mod.def("pw_gemm_avx2", &pw_gemm_avx2, "pointwise GEMM, 8-bit codes, int32 out or fused f32 requant (AVX2, exact)");
  mod.def("dw_conv1d_rq", &dw_conv1d_rq, "depthwise conv1d + requant, channels-last int8/uint8");
  mod.def("dw_vnni_available", &dw_vnni_available, "built with AVX-512 VNNI (dw_conv1d_vnni works)");
  mod.def("dw_conv1d_vnni", &dw_conv1d_vnni, "depthwise conv1d, 8-bit codes, int32 out or fused f32 requant (AVX-512 VNNI)");
  mod.def("pw_gemm_vnni", &pw_gemm_vnni, "pointwise GEMM, 8-bit codes, int32 out or fused f32 requant (AVX-512 VNNI)");
  mod.def("pw_conv1d_cl", &pw_conv1d_cl, "pw_gemm_vnni, fused requant, on (B,C,T) views of channels-last codes");
  mod.def("dw_conv1d_cl", &dw_conv1d_cl, "dw_conv1d_vnni, fused requant, on (B,C,T) views of channels-last codes");
  mod.def("requant_cols", &requant_cols, "per-column dyadic requant of an fp32/int32 accumulator");
  mod.def("requant_f32_cols", &requant_f32_cols, "per-column float32-faithful requant of an fp32/int32 accumulator");
  mod.def("quantize_cl", &quantize_cl, "input quantizer, channels-last out");
  mod.def("add_rq", &add_rq, "residual add with dyadic requant");
  mod.def("add_rq_cl", &add_rq_cl, "add_rq on channels-last views or contiguous tensors (None otherwise)");
}
