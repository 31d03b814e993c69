// Python binding of the KV page copy launchers. Built through torch's extension machinery (which supplies
// pybind11 and TORCH_EXTENSION_NAME) but deliberately free of torch types: the Python side validates
// shapes and ranges and passes raw addresses, sizes and stream handles; this file only forwards them and
// turns CUDA errors into exceptions.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "kv_copy.h"

namespace {

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

template <typename T>
T* ptr(uint64_t address) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(address));
}

void copy_pages(uint64_t layer_base, uint64_t block_stride, int32_t num_layers, int64_t page_bytes,
                uint64_t entries, int64_t first, int64_t count, uint64_t staging, bool to_staging,
                int vec_bytes, int max_ctas, uint64_t stream) {
  const KvoPagedCache cache{ptr<const int64_t>(layer_base), ptr<const int64_t>(block_stride), num_layers,
                            page_bytes};
  check(kvo_copy_pages(cache, ptr<const int64_t>(entries), first, count, ptr<char>(staging), to_staging,
                       vec_bytes, max_ctas, ptr<CUstream_st>(stream)),
        "kvoffload copy_pages");
}

void copy_runs(uint64_t staging, uint64_t pool, uint64_t runs, int64_t num_runs, int32_t num_layers,
               int32_t run_layers, int64_t pages_per_slot, int64_t page_bytes, bool to_host, uint64_t stream) {
  check(kvo_copy_runs(ptr<char>(staging), ptr<char>(pool), ptr<const int64_t>(runs), num_runs, num_layers,
                      run_layers, pages_per_slot, page_bytes, to_host, ptr<CUstream_st>(stream)),
        "kvoffload copy_runs");
}

std::vector<cudaEvent_t> events(const std::vector<uint64_t>& handles) {
  std::vector<cudaEvent_t> out;
  out.reserve(handles.size());
  for (uint64_t handle : handles) out.push_back(ptr<CUevent_st>(handle));
  return out;
}

KvoRing make_ring(const char* what, uint64_t staging, int64_t buffer_bytes, int next, std::vector<cudaEvent_t>& free,
                  uint64_t ready, uint64_t kernel_stream, uint64_t dma_stream) {
  if (free.empty() || next < 0 || next >= static_cast<int>(free.size())) {
    throw std::invalid_argument(std::string(what) + ": next must index one of the ring's free events");
  }
  return KvoRing{ptr<char>(staging), buffer_bytes, static_cast<int32_t>(free.size()), next, free.data(),
                 ptr<CUevent_st>(ready), ptr<CUstream_st>(kernel_stream), ptr<CUstream_st>(dma_stream)};
}

int load_pieces(uint64_t layer_base, uint64_t block_stride, int32_t num_layers, int64_t page_bytes, uint64_t entries,
                uint64_t pool, int64_t pages_per_slot, uint64_t pieces, int64_t num_pieces, uint64_t runs,
                const std::vector<uint64_t>& layer_done, uint64_t staging, int64_t buffer_bytes, int next,
                const std::vector<uint64_t>& free, uint64_t ready, int vec_bytes, int max_ctas, uint64_t kernel_stream,
                uint64_t dma_stream) {
  const KvoPagedCache cache{ptr<const int64_t>(layer_base), ptr<const int64_t>(block_stride), num_layers,
                            page_bytes};
  std::vector<cudaEvent_t> free_events = events(free), layer_events = events(layer_done);
  if (!layer_events.empty() && layer_events.size() != static_cast<size_t>(num_layers)) {
    throw std::invalid_argument("kvoffload load_pieces: one layer_done event per layer, or none");
  }
  KvoRing ring = make_ring("kvoffload load_pieces", staging, buffer_bytes, next, free_events, ready, kernel_stream,
                           dma_stream);
  check(kvo_load_pieces(cache, ptr<const int64_t>(entries), ptr<char>(pool), pages_per_slot,
                        ptr<const int64_t>(pieces), num_pieces, ptr<const int64_t>(runs),
                        layer_events.empty() ? nullptr : layer_events.data(), &ring, vec_bytes, max_ctas),
        "kvoffload load_pieces");
  return ring.next;
}

int store_layer(uint64_t layer_base, uint64_t block_stride, int32_t num_layers, int64_t page_bytes, int32_t layer,
                uint64_t entries, uint64_t pool, int64_t pages_per_slot, uint64_t pieces, int64_t num_pieces,
                uint64_t runs, uint64_t staging, int64_t buffer_bytes, int next, const std::vector<uint64_t>& free,
                uint64_t ready, int vec_bytes, int max_ctas, uint64_t kernel_stream, uint64_t dma_stream) {
  if (layer < 0 || layer >= num_layers) throw std::out_of_range("kvoffload store_layer: layer out of range");
  const KvoPagedCache cache{ptr<const int64_t>(layer_base), ptr<const int64_t>(block_stride), num_layers,
                            page_bytes};
  std::vector<cudaEvent_t> free_events = events(free);
  KvoRing ring = make_ring("kvoffload store_layer", staging, buffer_bytes, next, free_events, ready, kernel_stream,
                           dma_stream);
  check(kvo_store_layer(cache, layer, ptr<const int64_t>(entries), ptr<char>(pool), pages_per_slot,
                        ptr<const int64_t>(pieces), num_pieces, ptr<const int64_t>(runs), &ring, vec_bytes, max_ctas),
        "kvoffload store_layer");
  return ring.next;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kvoffload KV page copy kernels (addresses in, no torch types)";
  namespace py = pybind11;
  m.def("copy_pages", &copy_pages, "Gather (to_staging) or scatter every layer of entries [first, first+count).",
        py::arg("layer_base"), py::arg("block_stride"), py::arg("num_layers"), py::arg("page_bytes"),
        py::arg("entries"), py::arg("first"), py::arg("count"), py::arg("staging"), py::arg("to_staging"),
        py::arg("vec_bytes"), py::arg("max_ctas"), py::arg("stream"));
  m.def("copy_runs", &copy_runs, "DMA staging runs to (to_host) or from the pinned pool.", py::arg("staging"),
        py::arg("pool"), py::arg("runs"), py::arg("num_runs"), py::arg("num_layers"), py::arg("run_layers"),
        py::arg("pages_per_slot"),
        py::arg("page_bytes"), py::arg("to_host"), py::arg("stream"));
  m.def("load_pieces", &load_pieces,
        "Load pieces from the pool through the staging ring (layer by layer when layer_done is given); returns "
        "the ring buffer the next piece takes.",
        py::arg("layer_base"), py::arg("block_stride"), py::arg("num_layers"), py::arg("page_bytes"),
        py::arg("entries"), py::arg("pool"), py::arg("pages_per_slot"), py::arg("pieces"), py::arg("num_pieces"),
        py::arg("runs"), py::arg("layer_done"), py::arg("staging"), py::arg("buffer_bytes"), py::arg("next"),
        py::arg("free"), py::arg("ready"), py::arg("vec_bytes"), py::arg("max_ctas"), py::arg("kernel_stream"),
        py::arg("dma_stream"));
  m.def("store_layer", &store_layer,
        "Store one layer of a one-layer plan into the pool through the staging ring; returns the ring buffer the "
        "next piece takes.",
        py::arg("layer_base"), py::arg("block_stride"), py::arg("num_layers"), py::arg("page_bytes"),
        py::arg("layer"), py::arg("entries"), py::arg("pool"), py::arg("pages_per_slot"), py::arg("pieces"),
        py::arg("num_pieces"), py::arg("runs"), py::arg("staging"), py::arg("buffer_bytes"), py::arg("next"),
        py::arg("free"), py::arg("ready"), py::arg("vec_bytes"), py::arg("max_ctas"), py::arg("kernel_stream"),
        py::arg("dma_stream"));
}
