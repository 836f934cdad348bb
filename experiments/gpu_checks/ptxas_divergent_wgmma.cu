// Why the bounded scores kernel's wgmma were serialised (ptxas C7520) and why scores_mgpu's
// uniform_decision fixes it: a CPU-only check with the CUDA toolkit's nvcc / ptxas / nvdisasm.
//
// A loop of wgmma whose trip count comes from a cross-lane reduction (shfl.sync bfly of values read
// from shared memory, as the bound decision is) is divergent to ptxas: it wraps the loop in
// BSSY / BSYNC and puts a WARPSYNC.ALL before each WARPGROUP.ARRIVE (MODE 0). The same value
// broadcast from lane 0 by shfl.sync idx (MODE 1) compiles exactly as a block-index-derived trip
// count does (MODE 2, as twopass's `blk > 0`): no BSSY, no WARPSYNC.
//   for m in 0 1 2; do nvcc -arch=sm_90a -cubin -DMODE=$m ptxas_divergent_wgmma.cu -o k$m.cubin &&
//     nvdisasm k$m.cubin | grep -cE "BSSY|WARPSYNC"; done      # 3 / 0 / 0 (CUDA 13.0)
// (This small kernel waits for each group at once, so ptxas has no pipeline to serialise and prints
// no C7520 itself; the real kernel's is for the GPU probe: run_scores_overlap.sh fix.)

#include <cstdint>
__device__ __forceinline__ void wgmma(float (&d)[64], uint64_t da, uint64_t db) {
  asm volatile("{ wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
               "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%2"
               "7,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%5"
               "2,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63"
               "}, %64, %65, 1, 1, 1, 0, 1; }"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
                 "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
                 "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
                 "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
                 "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
                 "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
                 "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
                 "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
               : "l"(da), "l"(db));
}
__global__ void __launch_bounds__(128) k(float* out, const float* g, int n) {
  __shared__ __align__(1024) char smem[64*16*2 + 128*16*2];
  __shared__ float gaps[128];
  float d[64];
  for (int i = 0; i < 64; ++i) d[i] = 0.f;
  gaps[threadIdx.x & 127] = g[threadIdx.x];
  __syncthreads();
  float m = gaps[(threadIdx.x & 3) * 2];
  m = fmaxf(m, __shfl_xor_sync(~0u, m, 1));
  m = fmaxf(m, __shfl_xor_sync(~0u, m, 2));
  int fail = !(m <= 64.f);
#if MODE == 1
  fail = __shfl_sync(~0u, fail, 0);
#elif MODE == 2
  fail = blockIdx.x > 3;  // like twopass: from the block index
#endif
  uint64_t base = (uint64_t)(__cvta_generic_to_shared(smem) >> 4);
  uint64_t da = base | (1ull << 62), db = (base + 128) | (1ull << 62);
  int trips = fail ? n : 0;
  float acc = 0.f;
  for (int t = 0; t < trips; ++t) {
    for (int i = 0; i < 64; ++i) d[i] = 0.f;
    asm volatile("wgmma.fence.sync.aligned;");
    for (int c = 0; c < 4; ++c) {
      wgmma(d, da + 2 * c + t, db + 2 * c);
      asm volatile("wgmma.commit_group.sync.aligned;");
    }
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
    for (int i = 0; i < 64; ++i) acc = fmaxf(acc, d[i]);
  }
  d[0] += acc;
  for (int i = 0; i < 64; ++i) out[threadIdx.x * 64 + i] = d[i];
}
