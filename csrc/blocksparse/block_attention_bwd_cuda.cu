// Backward tensor-core kernels of semisparse::block_sparse_attention_backward (the kernels
// are in block_attention_flash.cuh): instantiations fp16 / bf16 x D in {64, 128} of the dq
// and dkdv kernels (and the per-dtype prep kernel), and run_backward, which launches, on
// one stream and in this order:
//   1. prep: dsum = rowsum(dO * O), lse2 = lse * log2(e) (+inf for dead and padding rows);
//   2. dq:   one CTA of 4 warps per (batch, query head, 64-row query tile);
//   3. dkdv: one CTA of 4 warps per (batch, kv head, 64-key tile), GQA heads looped inside.
// dq and dkdv only read what prep wrote, so they could run concurrently; they are
// launched back to back on the caller's stream (no extra streams or events to manage).
// The front end (block_attention_cuda.cu) has built both work lists and the workspace.
#include "blocksparse/block_attention_flash.cuh"

namespace semisparse::blockattn::flash {
namespace {

template <class T>
cudaError_t launch_prep(const Params& p, cudaStream_t stream) {
  const int64_t rows = p.B * p.Hq * p.Lq_pad;
  const int64_t blocks = (rows + 7) / 8;  // 8 warps of 32 per block, one row per warp
  const unsigned grid = unsigned(blocks < 65536 * 8 ? blocks : 65536 * 8);  // grid-stride beyond
  dev::bwd_prep_kernel<T><<<grid, 256, 0, stream>>>(p);
  return cudaGetLastError();
}

template <class T, int D>
cudaError_t launch_bwd(const Params& p, cudaStream_t stream) {
  cudaError_t err = launch_prep<T>(p, stream);
  if (err != cudaSuccess) return err;
  {
    auto kernel = dev::bwd_dq_kernel<T, D>;
    const size_t smem = dq_smem_bytes(D);
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (err != cudaSuccess) return err;
    const int64_t blocks = p.B * p.Hq * cdiv(p.Lq, kBwdBM);
    kernel<<<dim3(unsigned(blocks)), dim3(kBwdWarps * 32), smem, stream>>>(p);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  {
    auto kernel = dev::bwd_dkdv_kernel<T, D>;
    const size_t smem = dkdv_smem_bytes(D);
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (err != cudaSuccess) return err;
    const int64_t blocks = p.B * p.Hkv * cdiv(p.Lk, kBN);
    kernel<<<dim3(unsigned(blocks)), dim3(kBwdWarps * 32), smem, stream>>>(p);
    err = cudaGetLastError();
  }
  return err;
}

}  // namespace

cudaError_t run_backward(const Params& p, cudaStream_t stream) {
  if (p.is_bf16) return p.D == 64 ? launch_bwd<__nv_bfloat16, 64>(p, stream) : launch_bwd<__nv_bfloat16, 128>(p, stream);
  return p.D == 64 ? launch_bwd<__half, 64>(p, stream) : launch_bwd<__half, 128>(p, stream);
}

}  // namespace semisparse::blockattn::flash
