// C interface of the KV page copy kernels. Plain CUDA runtime types only, so the kernels build with nvcc
// alone and the torch binding stays a thin layer that forwards pointers, sizes and streams.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// vLLM's paged cache seen as pages: block b of layer l is page_bytes contiguous bytes at
// layer_base[l] + b * block_stride[l]. Both arrays live in device memory.
typedef struct {
  const int64_t* layer_base;    // byte address of block 0 of each layer
  const int64_t* block_stride;  // bytes from one block to the next, per layer
  int32_t num_layers;
  int64_t page_bytes;
} KvoPagedCache;

// Copies every layer of entries [first, first + count) between the paged cache and a staging buffer.
// `entries` (device) holds three int64 per entry: vLLM block id, byte offset of the entry's layer-0 page
// in `staging`, and the byte pitch between its consecutive layers. to_staging selects gather (true) or
// scatter (false). vec_bytes (16, 8, 4, 2 or 1) must divide page_bytes, every layer_base, block_stride
// and staging address; the caller picks the widest that does.
cudaError_t kvo_copy_pages(KvoPagedCache cache, const int64_t* entries, int64_t first, int64_t count,
                           char* staging, int to_staging, int vec_bytes, int max_ctas, cudaStream_t stream);

// Issues one DMA per run between staging (device) and a pinned pool of shape
// (num_slots, num_layers, pages_per_slot, page_bytes). `runs` (host) holds four int64 per run: byte offset
// in staging, slot, first page, number of pages. Each run moves `run_layers` layers, starting at the layer
// `pool` points into (the pool's base for all layers, base + l * pages_per_slot * page_bytes for layer l
// alone). A run's staging bytes are laid out (run_layers, pages, page_bytes), so a whole-slot run of every
// layer, or any run of one layer, is one contiguous copy; other runs are a 2D copy with one row per layer.
cudaError_t kvo_copy_runs(char* staging, char* pool, const int64_t* runs, int64_t num_runs, int32_t num_layers,
                          int32_t run_layers, int64_t pages_per_slot, int64_t page_bytes, int to_host,
                          cudaStream_t stream);

// A staging ring: `ring` device buffers of buffer_bytes each, back to back from `staging`, handed between a
// producer and a consumer stream. free[k] is recorded by the consumer once it is done with buffer k and
// waited on by the producer before refilling it; ready is recorded by the producer after each fill and waited
// on by the consumer at once. A load's producer is the DMA stream (the consumer scatters on the kernel
// stream), a store's the kernel stream (it gathers; the DMA stream drains). `next` is the buffer the next
// piece takes; kvo_load_pieces and kvo_store_layer advance it.
typedef struct {
  char* staging;
  int64_t buffer_bytes;
  int32_t ring;
  int32_t next;
  cudaEvent_t* free;
  cudaEvent_t ready;
  cudaStream_t kernel;
  cudaStream_t dma;
} KvoRing;

// Loads pieces of a copy plan from the pinned pool into the cache through the ring: per piece, the DMA of its
// runs into the next buffer (once the scatter that last read that buffer is done), then the scatter of its
// entries (once the DMA is in). `pieces` (host) holds four int64 per piece: first entry, number of entries,
// first run and number of runs in `runs` (host, as in kvo_copy_runs). With layer_done NULL every piece moves
// every layer. Otherwise the plan was made for one layer (entries and runs of a single layer) and the load
// goes layer by layer: every piece's layer l, then layer_done[l] is recorded on the kernel stream, so a
// forward can wait for exactly the layers it reads. One call issues the whole load: from Python, the same
// calls cost tens of microseconds each, milliseconds per load, all before the first byte moves.
cudaError_t kvo_load_pieces(KvoPagedCache cache, const int64_t* entries, char* pool, int64_t pages_per_slot,
                            const int64_t* pieces, int64_t num_pieces, const int64_t* runs, cudaEvent_t* layer_done,
                            KvoRing* ring, int vec_bytes, int max_ctas);

// Stores one layer of a copy plan made for one layer (entries and runs of a single layer, as for a layer-wise
// load) from the cache into the pinned pool through a store ring: per piece, the gather of layer `layer` of
// its entries into the next buffer (once the DMA that last read that buffer is done), then the DMA of its
// runs into that layer of their slots (once the gather is done). Called as the forward finishes each layer,
// so a step's stores cross PCIe while the forward runs and are over soon after it ends.
cudaError_t kvo_store_layer(KvoPagedCache cache, int32_t layer, const int64_t* entries, char* pool,
                            int64_t pages_per_slot, const int64_t* pieces, int64_t num_pieces, const int64_t* runs,
                            KvoRing* ring, int vec_bytes, int max_ctas);

#ifdef __cplusplus
}
#endif
