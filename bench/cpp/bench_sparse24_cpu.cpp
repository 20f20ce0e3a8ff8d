// bench_sparse24_cpu: times the CPU 2:4 linear kernel alone (no Python, no dispatcher).
//
//   bench_sparse24_cpu [N K M dtype reps [variant ...]]   defaults: 4096 4096 1 fp32 50
//   dtype: fp32 | bf16 | fp16;  SEMISPARSE_CPU_ISA=scalar forces the generic path.
//   variant: "key=value[,key=value]": isa=0|1|3 (scalar, avx2_fma, avx512_bf16) and the
//   schedule thresholds gemv_max_m (AVX2), bf16_gemv_max_m (AVX-512 BF16);
//   with several variants the runs are interleaved round-robin so that
//   a noisy machine affects all of them alike, and one line is printed per variant.
//
// Prints the median time, useful GFLOP/s (2*M*N*K/2: the multiplies by pruned zeros
// are not counted), the dense-equivalent GFLOP/s (2*M*N*K) and GB/s (compressed
// weight + x + y bytes moved once).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common/cpu_features.h"
#include "sparse24/sparse24_cpu.h"

using namespace semisparse::sparse24;

int main(int argc, char** argv) {
  const int64_t N = argc > 1 ? std::atoll(argv[1]) : 4096;
  const int64_t K = argc > 2 ? std::atoll(argv[2]) : 4096;
  const int64_t M = argc > 3 ? std::atoll(argv[3]) : 1;
  const std::string dname = argc > 4 ? argv[4] : "fp32";
  const int reps = argc > 5 ? std::atoi(argv[5]) : 50;
  if (N <= 0 || K <= 0 || K % 4 || M <= 0 || reps <= 0) {
    std::fprintf(stderr, "usage: %s [N K M fp32|bf16|fp16 reps], K a multiple of 4\n", argv[0]);
    return 2;
  }
  DType t = dname == "bf16" ? DType::BF16 : dname == "fp16" ? DType::F16 : DType::F32;
  if (dname != "fp32" && dname != "bf16" && dname != "fp16") {
    std::fprintf(stderr, "dtype must be fp32, bf16 or fp16, got %s\n", dname.c_str());
    return 2;
  }
  const int es = dtype_size(t);
  std::mt19937 rng(0);
  std::normal_distribution<float> nd;
  // 2:4 magnitude-pruned dense weight
  std::vector<char> dense(static_cast<size_t>(N * K * es));
  for (int64_t r = 0; r < N; ++r)
    for (int64_t g = 0; g < K / 4; ++g) {
      float q[4];
      for (float& v : q) v = nd(rng);
      int keep0 = 0, keep1 = 1;
      float a[4] = {std::fabs(q[0]), std::fabs(q[1]), std::fabs(q[2]), std::fabs(q[3])};
      for (int i = 0; i < 4; ++i) if (a[i] > a[keep0]) keep0 = i;
      keep1 = keep0 == 0 ? 1 : 0;
      for (int i = 0; i < 4; ++i) if (i != keep0 && a[i] > a[keep1]) keep1 = i;
      for (int i = 0; i < 4; ++i)
        store_from_f32(dense.data(), r * K + 4 * g + i, t, (i == keep0 || i == keep1) ? q[i] : 0.0f);
    }
  const int64_t mc = (K + 7) / 8;
  std::vector<char> values(static_cast<size_t>(N * K / 2 * es));
  std::vector<uint8_t> meta(static_cast<size_t>(N * mc));
  compress(dense.data(), values.data(), meta.data(), N, K, mc, t);
  std::vector<char> x(static_cast<size_t>(M * K * es)), y(static_cast<size_t>(M * N * es));
  for (int64_t i = 0; i < M * K; ++i) store_from_f32(x.data(), i, t, nd(rng));

  LinearProblem p{x.data(), values.data(), meta.data(), nullptr, y.data(), M, N, K, mc, t};
  std::vector<std::string> variants;
  for (int i = 6; i < argc; ++i) variants.push_back(argv[i]);
  if (variants.empty()) variants.push_back("");
  auto apply = [&](const std::string& v) {
#if defined(SEMISPARSE_HAVE_AVX2_TU)
    size_t a = 0;
    while (a < v.size()) {
      size_t b = v.find(',', a);
      if (b == std::string::npos) b = v.size();
      const std::string kv = v.substr(a, b - a);
      const size_t eq = kv.find('=');
      const std::string key = eq == std::string::npos ? kv : kv.substr(0, eq);
      const long long val = eq == std::string::npos ? 0 : std::atoll(kv.c_str() + eq + 1);
      if (key == "isa") {
        const char* names[] = {"scalar", "avx2_fma", "neon", "avx512_bf16"};
        if (val < 0 || val > 3 || semisparse_set_cpu_isa(names[val]) != 0) {
          std::fprintf(stderr, "cannot run isa=%lld here\n", val);
          std::exit(2);
        }
      } else if (eq == std::string::npos ||
                 !(tune_avx2(key.c_str(), val) || tune_avx512bf16(key.c_str(), val))) {
        std::fprintf(stderr, "unknown variant setting %s\n", kv.c_str());
        std::exit(2);
      }
      a = b + 1;
    }
#else
    if (!v.empty()) { std::fprintf(stderr, "variants need the AVX2 kernels\n"); std::exit(2); }
#endif
  };
  std::vector<std::vector<double>> ts(variants.size());
  for (size_t vi = 0; vi < variants.size(); ++vi) { apply(variants[vi]); linear(p); }  // warm-up
  for (int i = 0; i < reps; ++i)
    for (size_t vi = 0; vi < variants.size(); ++vi) {
      apply(variants[vi]);
      auto t0 = std::chrono::steady_clock::now();
      linear(p);
      ts[vi].push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
  std::printf("bench_sparse24_cpu N=%lld K=%lld M=%lld dtype=%s simd=%s reps=%d\n", (long long)N,
              (long long)K, (long long)M, dname.c_str(), semisparse_cpu_isa(), reps);
  const double flops = 2.0 * M * N * (K / 2);
  const double bytes = double(values.size() + meta.size() + x.size() + y.size());
  for (size_t vi = 0; vi < variants.size(); ++vi) {
    auto& v = ts[vi];
    std::sort(v.begin(), v.end());
    const double med = v[v.size() / 2];
    std::printf("%s%smedian %.3f ms  min %.3f ms  useful %.1f GFLOP/s  dense-equivalent %.1f GFLOP/s  %.1f GB/s\n",
                variants[vi].c_str(), variants[vi].empty() ? "" : "  ", med * 1e3, v[0] * 1e3,
                flops / med * 1e-9, 2 * flops / med * 1e-9, bytes / med * 1e-9);
  }
  return 0;
}
