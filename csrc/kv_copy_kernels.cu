// Gather/scatter of KV pages between vLLM's paged cache and a contiguous device staging buffer, plus the
// DMA of staging runs to and from the pinned host pool. One kernel family handles every vLLM layout:
// the layout is reduced by the Python side to a per-layer base address and block stride.
#include "kv_copy.h"

#include <vector>

namespace {

constexpr int kThreads = 512;
constexpr int kUnroll = 4;  // loads in flight per thread before the matching stores

// One CTA copies whole pages (grid-stride over the count * num_layers pages of the range); its threads
// stride over the page in units of V. All loads of an unrolled step are issued before any store, so
// each thread keeps kUnroll independent memory requests in flight.
template <typename V, bool kToStaging>
__global__ void __launch_bounds__(kThreads)
copy_pages_kernel(KvoPagedCache cache, const int64_t* __restrict__ entries, int64_t first, int64_t count,
                  char* __restrict__ staging) {
  const int64_t num_pages = count * cache.num_layers;
  const int64_t num_vecs = cache.page_bytes / static_cast<int64_t>(sizeof(V));
  for (int64_t page = blockIdx.x; page < num_pages; page += gridDim.x) {
    const int64_t* entry = entries + 3 * (first + page / cache.num_layers);
    const int layer = static_cast<int>(page % cache.num_layers);
    char* cached = reinterpret_cast<char*>(static_cast<uintptr_t>(cache.layer_base[layer])) +
                   entry[0] * cache.block_stride[layer];
    char* staged = staging + entry[1] + layer * entry[2];
    const V* src = reinterpret_cast<const V*>(kToStaging ? cached : staged);
    V* dst = reinterpret_cast<V*>(kToStaging ? staged : cached);
    for (int64_t base = threadIdx.x; base < num_vecs; base += kThreads * kUnroll) {
      V tmp[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = base + u * kThreads;
        if (i < num_vecs) tmp[u] = src[i];
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = base + u * kThreads;
        if (i < num_vecs) dst[i] = tmp[u];
      }
    }
  }
}

template <typename V>
cudaError_t launch(KvoPagedCache cache, const int64_t* entries, int64_t first, int64_t count, char* staging,
                   int to_staging, int max_ctas, cudaStream_t stream) {
  const int64_t num_pages = count * cache.num_layers;
  const unsigned grid = static_cast<unsigned>(num_pages < max_ctas ? num_pages : max_ctas);
  if (to_staging) {
    copy_pages_kernel<V, true><<<grid, kThreads, 0, stream>>>(cache, entries, first, count, staging);
  } else {
    copy_pages_kernel<V, false><<<grid, kThreads, 0, stream>>>(cache, entries, first, count, staging);
  }
  return cudaGetLastError();
}

}  // namespace

extern "C" cudaError_t kvo_copy_pages(KvoPagedCache cache, const int64_t* entries, int64_t first, int64_t count,
                                      char* staging, int to_staging, int vec_bytes, int max_ctas,
                                      cudaStream_t stream) {
  if (count <= 0 || cache.num_layers <= 0) return cudaSuccess;
  switch (vec_bytes) {
    case 16: return launch<uint4>(cache, entries, first, count, staging, to_staging, max_ctas, stream);
    case 8: return launch<uint2>(cache, entries, first, count, staging, to_staging, max_ctas, stream);
    case 4: return launch<unsigned int>(cache, entries, first, count, staging, to_staging, max_ctas, stream);
    case 2: return launch<unsigned short>(cache, entries, first, count, staging, to_staging, max_ctas, stream);
    case 1: return launch<unsigned char>(cache, entries, first, count, staging, to_staging, max_ctas, stream);
    default: return cudaErrorInvalidValue;
  }
}

#if CUDART_VERSION >= 12080
// Many contiguous runs in one call: each cudaMemcpyAsync costs microseconds of CPU, which for a layer-wise
// load (runs x layers calls, all issued before the forward can start) would add up to tens of milliseconds.
static cudaError_t copy_contiguous_batch(char* staging, char* pool, const int64_t* runs, int64_t num_runs,
                                         int32_t num_layers, int32_t run_layers, int64_t pages_per_slot,
                                         int64_t page_bytes, int to_host, cudaStream_t stream) {
  std::vector<void*> dsts(num_runs), srcs(num_runs);
  std::vector<size_t> sizes(num_runs);
  for (int64_t r = 0; r < num_runs; ++r) {
    const int64_t* run = runs + 4 * r;
    char* dev = staging + run[0];
    char* host = pool + ((run[1] * num_layers) * pages_per_slot + run[2]) * page_bytes;
    dsts[r] = to_host ? static_cast<void*>(host) : static_cast<void*>(dev);
    srcs[r] = to_host ? static_cast<void*>(dev) : static_cast<void*>(host);
    sizes[r] = static_cast<size_t>(run[3] * page_bytes) * static_cast<size_t>(run_layers);
  }
  cudaMemcpyAttributes attrs = {};
  attrs.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
  size_t attrs_index = 0;
#if CUDART_VERSION >= 13000
  return cudaMemcpyBatchAsync(const_cast<const void**>(dsts.data()), const_cast<const void**>(srcs.data()),
                              sizes.data(), num_runs, &attrs, &attrs_index, 1, stream);
#else
  size_t fail_index = 0;
  return cudaMemcpyBatchAsync(dsts.data(), srcs.data(), sizes.data(), num_runs, &attrs, &attrs_index, 1,
                              &fail_index, stream);
#endif
}
#endif

// One DMA per run (a 2D copy with a row per layer when the run's layers are not contiguous in the pool).
static cudaError_t copy_each(char* staging, char* pool, const int64_t* runs, int64_t num_runs, int32_t num_layers,
                             int32_t run_layers, int64_t pages_per_slot, int64_t page_bytes, int to_host,
                             cudaStream_t stream) {
  const size_t slot_pitch = static_cast<size_t>(pages_per_slot * page_bytes);  // one layer of a pool slot
  for (int64_t r = 0; r < num_runs; ++r) {
    const int64_t* run = runs + 4 * r;
    char* dev = staging + run[0];
    char* host = pool + ((run[1] * num_layers) * pages_per_slot + run[2]) * page_bytes;
    const size_t width = static_cast<size_t>(run[3] * page_bytes);
    cudaError_t err;
    if (run_layers == 1 || (run[3] == pages_per_slot && run_layers == num_layers)) {  // contiguous on both sides
      const size_t bytes = width * static_cast<size_t>(run_layers);
      err = to_host ? cudaMemcpyAsync(host, dev, bytes, cudaMemcpyDeviceToHost, stream)
                    : cudaMemcpyAsync(dev, host, bytes, cudaMemcpyHostToDevice, stream);
    } else {
      err = to_host ? cudaMemcpy2DAsync(host, slot_pitch, dev, width, width, run_layers, cudaMemcpyDeviceToHost, stream)
                    : cudaMemcpy2DAsync(dev, width, host, slot_pitch, width, run_layers, cudaMemcpyHostToDevice, stream);
    }
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

extern "C" cudaError_t kvo_copy_runs(char* staging, char* pool, const int64_t* runs, int64_t num_runs,
                                     int32_t num_layers, int32_t run_layers, int64_t pages_per_slot,
                                     int64_t page_bytes, int to_host, cudaStream_t stream) {
  if (run_layers != 1 || num_runs < 2) {
    return copy_each(staging, pool, runs, num_runs, num_layers, run_layers, pages_per_slot, page_bytes, to_host,
                     stream);
  }
  // One layer of many slots (a layer-wise load). Slots handed out one after another are consecutive in the
  // pool, so that layer's rows of them are equally spaced: one 2D copy moves a whole group at line rate.
  const size_t slot_bytes = static_cast<size_t>(pages_per_slot * page_bytes) * static_cast<size_t>(num_layers);
  std::vector<int64_t> rest;  // runs in no group
  int64_t first = 0;
  while (first < num_runs) {
    const int64_t* head = runs + 4 * first;
    int64_t last = first;
    while (last + 1 < num_runs) {
      const int64_t* prev = runs + 4 * last;
      const int64_t* next = runs + 4 * (last + 1);
      if (next[1] != prev[1] + 1 || next[2] != head[2] || next[3] != head[3] ||
          next[0] != prev[0] + head[3] * page_bytes) break;
      ++last;
    }
    if (last > first) {
      char* dev = staging + head[0];
      char* host = pool + ((head[1] * num_layers) * pages_per_slot + head[2]) * page_bytes;
      const size_t width = static_cast<size_t>(head[3] * page_bytes);
      const size_t rows = static_cast<size_t>(last - first + 1);
      const cudaError_t err =
          to_host ? cudaMemcpy2DAsync(host, slot_bytes, dev, width, width, rows, cudaMemcpyDeviceToHost, stream)
                  : cudaMemcpy2DAsync(dev, width, host, slot_bytes, width, rows, cudaMemcpyHostToDevice, stream);
      if (err != cudaSuccess) return err;
    } else {
      rest.insert(rest.end(), head, head + 4);
    }
    first = last + 1;
  }
  const int64_t left = static_cast<int64_t>(rest.size() / 4);
#if CUDART_VERSION >= 12080
  if (left > 1) {
    return copy_contiguous_batch(staging, pool, rest.data(), left, num_layers, run_layers, pages_per_slot,
                                 page_bytes, to_host, stream);
  }
#endif
  return copy_each(staging, pool, rest.data(), left, num_layers, run_layers, pages_per_slot, page_bytes, to_host,
                   stream);
}

// One piece (or one layer of it) through the next ring buffer: DMA in, then scatter.
static cudaError_t load_piece(KvoPagedCache cache, const int64_t* entries, char* pool, int64_t pages_per_slot,
                              int32_t pool_layers, const int64_t* piece, const int64_t* runs, KvoRing* ring,
                              int vec_bytes, int max_ctas) {
  const int32_t index = ring->next;
  ring->next = (index + 1) % ring->ring;
  char* buffer = ring->staging + static_cast<int64_t>(index) * ring->buffer_bytes;
  cudaError_t err = cudaStreamWaitEvent(ring->dma, ring->free[index], 0);
  if (err == cudaSuccess) {
    err = kvo_copy_runs(buffer, pool, runs + 4 * piece[2], piece[3], pool_layers, cache.num_layers, pages_per_slot,
                        cache.page_bytes, 0, ring->dma);
  }
  if (err == cudaSuccess) err = cudaEventRecord(ring->ready, ring->dma);
  if (err == cudaSuccess) err = cudaStreamWaitEvent(ring->kernel, ring->ready, 0);
  if (err == cudaSuccess) {
    err = kvo_copy_pages(cache, entries, piece[0], piece[1], buffer, 0, vec_bytes, max_ctas, ring->kernel);
  }
  if (err == cudaSuccess) err = cudaEventRecord(ring->free[index], ring->kernel);
  return err;
}

extern "C" cudaError_t kvo_load_pieces(KvoPagedCache cache, const int64_t* entries, char* pool,
                                       int64_t pages_per_slot, const int64_t* pieces, int64_t num_pieces,
                                       const int64_t* runs, cudaEvent_t* layer_done, KvoRing* ring, int vec_bytes,
                                       int max_ctas) {
  if (layer_done == nullptr) {
    for (int64_t p = 0; p < num_pieces; ++p) {
      const cudaError_t err = load_piece(cache, entries, pool, pages_per_slot, cache.num_layers, pieces + 4 * p,
                                         runs, ring, vec_bytes, max_ctas);
      if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
  }
  const int64_t layer_bytes = pages_per_slot * cache.page_bytes;  // one layer of a pool slot
  for (int32_t layer = 0; layer < cache.num_layers; ++layer) {
    const KvoPagedCache one{cache.layer_base + layer, cache.block_stride + layer, 1, cache.page_bytes};
    for (int64_t p = 0; p < num_pieces; ++p) {
      const cudaError_t err = load_piece(one, entries, pool + layer * layer_bytes, pages_per_slot, cache.num_layers,
                                         pieces + 4 * p, runs, ring, vec_bytes, max_ctas);
      if (err != cudaSuccess) return err;
    }
    const cudaError_t err = cudaEventRecord(layer_done[layer], ring->kernel);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

extern "C" cudaError_t kvo_store_layer(KvoPagedCache cache, int32_t layer, const int64_t* entries, char* pool,
                                       int64_t pages_per_slot, const int64_t* pieces, int64_t num_pieces,
                                       const int64_t* runs, KvoRing* ring, int vec_bytes, int max_ctas) {
  if (layer < 0 || layer >= cache.num_layers) return cudaErrorInvalidValue;
  const KvoPagedCache one{cache.layer_base + layer, cache.block_stride + layer, 1, cache.page_bytes};
  char* pool_layer = pool + layer * pages_per_slot * cache.page_bytes;
  for (int64_t p = 0; p < num_pieces; ++p) {
    const int64_t* piece = pieces + 4 * p;
    const int32_t index = ring->next;
    ring->next = (index + 1) % ring->ring;
    char* buffer = ring->staging + static_cast<int64_t>(index) * ring->buffer_bytes;
    cudaError_t err = cudaStreamWaitEvent(ring->kernel, ring->free[index], 0);
    if (err == cudaSuccess) {
      err = kvo_copy_pages(one, entries, piece[0], piece[1], buffer, 1, vec_bytes, max_ctas, ring->kernel);
    }
    if (err == cudaSuccess) err = cudaEventRecord(ring->ready, ring->kernel);
    if (err == cudaSuccess) err = cudaStreamWaitEvent(ring->dma, ring->ready, 0);
    if (err == cudaSuccess) {
      err = kvo_copy_runs(buffer, pool_layer, runs + 4 * piece[2], piece[3], cache.num_layers, 1, pages_per_slot,
                          cache.page_bytes, 1, ring->dma);
    }
    if (err == cudaSuccess) err = cudaEventRecord(ring->free[index], ring->dma);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}
