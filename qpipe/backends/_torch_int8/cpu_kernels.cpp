// qpipe torch-int8 CPU kernels: depthwise conv1d and requantization on
// channels-last int8 activations, bit-exact with the qpipe:: reference kernels.
//
// Exactness: the depthwise accumulator is an fp32 sum of int8 x int8 products;
// the Python side only calls it when sum_k |w[k,c]| * max|x| < 2**24, so every
// partial sum is an exact integer in any order. Requantization is
// clamp(((acc + bias) * m + 2**(s-1)) >> s, lo, hi) in 64-bit integers with
// two's-complement wrap-around (what torch's int64 ops do), arithmetic shift.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstdint>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <tuple>

namespace {

constexpr int TB = 8;   // output time steps per block (accumulators in registers)
constexpr int CB = 16;  // channels per vector (one 512-bit fp32 register)
// Elementwise kernels split work only in pieces of at least this many elements: a
// parallel region costs a barrier, and on a busy machine a barrier can wait a whole
// scheduler slice for the other thread; these loops are memory-bound and short.
constexpr int64_t MIN_PARALLEL = 1 << 18;

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

}  // namespace

// x: int8 (B, T, C) contiguous; w: fp32 (K, Cp) with Cp = C rounded up to CB (zeros beyond C);
// bias: int64 (C) or empty; m, half, s: int64 (C). Returns int8 or int16 (B, Tout, C).
torch::Tensor dw_conv1d_rq(torch::Tensor x, torch::Tensor w, torch::Tensor bias, torch::Tensor m,
                           torch::Tensor half, torch::Tensor s, int64_t stride, int64_t pad, int64_t dil,
                           int64_t lo, int64_t hi, int64_t out_bits) {
  TORCH_CHECK(x.dtype() == torch::kInt8 && x.dim() == 3 && x.is_contiguous(), "dw_conv1d_rq: x must be contiguous int8 (B,T,C)");
  TORCH_CHECK(w.dtype() == torch::kFloat32 && w.dim() == 2 && w.is_contiguous(), "dw_conv1d_rq: w must be fp32 (K,Cp)");
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2);
  const int64_t K = w.size(0), Cp = w.size(1);
  TORCH_CHECK(Cp % CB == 0 && Cp >= C, "dw_conv1d_rq: weight channels not padded");
  const int64_t Tout = (T + 2 * pad - dil * (K - 1) - 1) / stride + 1;
  TORCH_CHECK(Tout > 0, "dw_conv1d_rq: empty output");
  const int64_t nblk = (Tout + TB - 1) / TB;
  // padded fp32 input big enough for whole blocks: rows [0, Tp)
  const int64_t Tp = std::max<int64_t>(T + 2 * pad, ((nblk * TB - 1) * stride) + (K - 1) * dil + 1);
  auto xp = torch::zeros({B, Tp, Cp}, x.options().dtype(torch::kFloat32));
  const int8_t* xd = x.data_ptr<int8_t>();
  float* xpd = xp.data_ptr<float>();
  at::parallel_for(0, B * T, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      int64_t b = i / T, t = i % T;
      const int8_t* src = xd + i * C;
      float* dst = xpd + (b * Tp + t + pad) * Cp;
      for (int64_t c = 0; c < C; ++c) dst[c] = (float)src[c];
    }
  });
  auto out = torch::empty({B, Tout, C}, x.options().dtype(out_bits <= 8 ? torch::kInt8 : torch::kInt16));
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
          if (out_bits <= 8)
            requant_row<int8_t>(acc[tt], out.data_ptr<int8_t>() + o, bd ? bd + c0 : nullptr, md + c0, hd + c0, sd + c0, nc, lo, hi);
          else
            requant_row<int16_t>(acc[tt], out.data_ptr<int16_t>() + o, bd ? bd + c0 : nullptr, md + c0, hd + c0, sd + c0, nc, lo, hi);
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
// out_bits 8 or 16: int8/int16 out; 0: the integers as float32 (for a consumer that convolves in exact fp32).
torch::Tensor requant_cols(torch::Tensor acc, torch::Tensor bias, torch::Tensor m, torch::Tensor half,
                           torch::Tensor s, int64_t lo, int64_t hi, int64_t out_bits) {
  TORCH_CHECK(acc.dim() == 2 && acc.is_contiguous(), "requant_cols: acc must be contiguous (N,C)");
  const int64_t N = acc.size(0), C = acc.size(1);
  auto odt = out_bits == 0 ? torch::kFloat32 : (out_bits <= 8 ? torch::kInt8 : torch::kInt16);
  auto out = torch::empty({N, C}, acc.options().dtype(odt));
  const int64_t* bd = bias.numel() ? bias.data_ptr<int64_t>() : nullptr;
  const int64_t* md = m.data_ptr<int64_t>();
  const int64_t* hd = half.data_ptr<int64_t>();
  const int64_t* sd = s.data_ptr<int64_t>();
  const bool f32 = acc.dtype() == torch::kFloat32;
  TORCH_CHECK(f32 || acc.dtype() == torch::kInt32, "requant_cols: acc must be fp32 or int32");
#define QPIPE_RQ(ACC, OUT) rq_rows<ACC, OUT>(acc.data_ptr<ACC>(), out.data_ptr<OUT>(), bd, md, hd, sd, N, C, lo, hi)
  if (f32) {
    if (out_bits == 0) QPIPE_RQ(float, float);
    else if (out_bits <= 8) QPIPE_RQ(float, int8_t);
    else QPIPE_RQ(float, int16_t);
  } else {
    if (out_bits == 0) QPIPE_RQ(int32_t, float);
    else if (out_bits <= 8) QPIPE_RQ(int32_t, int8_t);
    else QPIPE_RQ(int32_t, int16_t);
  }
#undef QPIPE_RQ
  return out;
}

template <typename OutT>
inline void add_span(const int8_t* __restrict a, const int8_t* __restrict b, OutT* __restrict o, int64_t n,
                     int64_t ma, int64_t mb, int64_t half, int64_t s, int64_t lo, int64_t hi) {
  for (int64_t i = 0; i < n; ++i) {
    int64_t v = (int64_t)((uint64_t)(int64_t)a[i] * (uint64_t)ma + (uint64_t)(int64_t)b[i] * (uint64_t)mb + (uint64_t)half) >> s;
    o[i] = (OutT)(v < lo ? lo : (v > hi ? hi : v));
  }
}

// Residual add with one shared shift: clamp((a*ma + b*mb + half) >> s, lo, hi); a, b int8 of one shape, contiguous.
torch::Tensor add_rq(torch::Tensor a, torch::Tensor b, int64_t ma, int64_t mb, int64_t s, int64_t lo, int64_t hi,
                     int64_t out_bits) {
  TORCH_CHECK(a.dtype() == torch::kInt8 && b.dtype() == torch::kInt8 && a.is_contiguous() && b.is_contiguous() &&
              a.sizes() == b.sizes(), "add_rq: a, b must be contiguous int8 of one shape");
  auto out = torch::empty_like(a, a.options().dtype(out_bits <= 8 ? torch::kInt8 : torch::kInt16));
  const int64_t n = a.numel();
  const int8_t* ad = a.data_ptr<int8_t>();
  const int8_t* bd = b.data_ptr<int8_t>();
  const int64_t half = s > 0 ? (int64_t(1) << (s - 1)) : 0;
  at::parallel_for(0, n, MIN_PARALLEL, [&](int64_t begin, int64_t end) {
    if (out_bits <= 8)
      add_span<int8_t>(ad + begin, bd + begin, out.data_ptr<int8_t>() + begin, end - begin, ma, mb, half, s, lo, hi);
    else
      add_span<int16_t>(ad + begin, bd + begin, out.data_ptr<int16_t>() + begin, end - begin, ma, mb, half, s, lo, hi);
  });
  return out;
}

// The input quantizer floor(x/scale + 1/2) clamped to [-hi, hi], computed as qpipe's
// div_round_half_up does in float64 (t = x/scale; k = floor(t); q = k + (t > k + 1/2)),
// written channels-last: x (B, C, T) -> out (B, T, C), int8 or float32 (out_f32).
// Returns the number of elements it could not decide (t exactly on a half, or NaN):
// when non-zero the caller recomputes the tensor with the reference quantizer.
std::tuple<torch::Tensor, int64_t> quantize_cl(torch::Tensor x, double scale, int64_t hi, bool out_f32) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 3, "quantize_cl: x must be float32 (B,C,T)");
  x = x.contiguous();
  const int64_t B = x.size(0), C = x.size(1), T = x.size(2);
  auto out = torch::empty({B, T, C}, x.options().dtype(out_f32 ? torch::kFloat32 : torch::kInt8));
  const float* xd = x.data_ptr<float>();
  std::atomic<int64_t> special{0};
  const double dhi = (double)hi;
  at::parallel_for(0, B * C, std::max<int64_t>(1, MIN_PARALLEL / std::max<int64_t>(T, 1)), [&](int64_t begin, int64_t end) {
    int64_t bad = 0;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / C, c = i % C;
      const float* src = xd + i * T;
      for (int64_t t = 0; t < T; ++t) {
        double q = (double)src[t] / scale;
        double k = std::floor(q);
        double h = k + 0.5;
        bad += (q == h) | (q != q);
        double v = k + (q > h ? 1.0 : 0.0);
        v = v < -dhi ? -dhi : (v > dhi ? dhi : v);
        const int64_t o = (b * T + t) * C + c;
        if (out_f32) out.data_ptr<float>()[o] = (float)v;
        else out.data_ptr<int8_t>()[o] = (int8_t)v;
      }
    }
    special += bad;
  });
  return {out, special.load()};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("dw_conv1d_rq", &dw_conv1d_rq, "depthwise conv1d + requant, channels-last int8");
  mod.def("requant_cols", &requant_cols, "per-column dyadic requant of an fp32/int32 accumulator");
  mod.def("quantize_cl", &quantize_cl, "input quantizer, channels-last out");
  mod.def("add_rq", &add_rq, "residual add with dyadic requant");
}
