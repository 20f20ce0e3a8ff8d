// Forward tensor-core kernels of semisparse::block_sparse_attention (the kernel itself is in
// block_attention_flash.cuh): the four instantiations fp16 / bf16 x D in {64, 128} and
// run_forward, which raises the dynamic shared-memory limit and launches one CTA of
// kFwdWarps warps per (batch, query head, 128-row query tile). The front end
// (block_attention_cuda.cu) has built the work lists and checked the arguments.
#include "blocksparse/block_attention_flash.cuh"

namespace semisparse::blockattn::flash {
namespace {

template <class T, int D>
cudaError_t launch_fwd(const Params& p, cudaStream_t stream) {
  auto kernel = dev::fwd_kernel<T, D>;
  const size_t smem = fwd_smem_bytes(D);
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (err != cudaSuccess) return err;
  const int64_t blocks = p.B * p.Hq * cdiv(p.Lq, kFwdBM);
  kernel<<<dim3(unsigned(blocks)), dim3(kFwdWarps * 32), smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t run_forward(const Params& p, cudaStream_t stream) {
  if (p.is_bf16) return p.D == 64 ? launch_fwd<__nv_bfloat16, 64>(p, stream) : launch_fwd<__nv_bfloat16, 128>(p, stream);
  return p.D == 64 ? launch_fwd<__half, 64>(p, stream) : launch_fwd<__half, 128>(p, stream);
}

}  // namespace semisparse::blockattn::flash
