// CUDA unified (managed) memory for paged optimizer states.
//
// A C ABI with no torch headers, loaded two ways by qlora_triton/paged.py:
//   * qlt_managed_alloc / qlt_managed_free have the signatures that
//     torch.cuda.memory.CUDAPluggableAllocator expects, so a torch.cuda.MemPool
//     backed by them hands out ordinary CUDA tensors whose pages can move
//     between the device and the host;
//   * qlt_prefetch moves a range explicitly (the paging you can see), called
//     through ctypes.
//
// Oversubscribed managed memory can hang the GPU, so an allocation that does
// not fit in the device's free memory is refused (nullptr; torch then raises
// its out-of-memory error). qlora_triton/paged.py checks first and raises a
// clearer error; this check is the safety net.
//
// CUDA 13 changed cudaMemAdvise / cudaMemPrefetchAsync to take a
// cudaMemLocation; CUDA 12 takes a device ordinal (cudaCpuDeviceId = host).

#include <cuda_runtime.h>
#include <sys/types.h>

namespace {

#if CUDART_VERSION >= 13000
cudaMemLocation location_of(int device) {
    cudaMemLocation loc;
    if (device < 0) {
        loc.type = cudaMemLocationTypeHost;
        loc.id = 0;  // ignored for the host
    } else {
        loc.type = cudaMemLocationTypeDevice;
        loc.id = device;
    }
    return loc;
}
#endif

cudaError_t advise_preferred(void* ptr, size_t size, int device) {
#if CUDART_VERSION >= 13000
    return cudaMemAdvise(ptr, size, cudaMemAdviseSetPreferredLocation, location_of(device));
#else
    return cudaMemAdvise(ptr, size, cudaMemAdviseSetPreferredLocation, device);
#endif
}

cudaError_t prefetch(void* ptr, size_t size, int device, cudaStream_t stream) {
#if CUDART_VERSION >= 13000
    return cudaMemPrefetchAsync(ptr, size, location_of(device), 0, stream);
#else
    return cudaMemPrefetchAsync(ptr, size, device < 0 ? cudaCpuDeviceId : device, stream);
#endif
}

}  // namespace

extern "C" {

// CUDAPluggableAllocator alloc: managed memory preferring `device`.
// Returns nullptr when `size` exceeds the device's free memory or on any error.
void* qlt_managed_alloc(ssize_t size, int device, cudaStream_t stream) {
    (void)stream;  // cudaMallocManaged is not stream-ordered
    if (size <= 0) return nullptr;
    int previous = 0;
    if (cudaGetDevice(&previous) != cudaSuccess) return nullptr;
    if (previous != device && cudaSetDevice(device) != cudaSuccess) return nullptr;
    void* ptr = nullptr;
    size_t free_bytes = 0, total_bytes = 0;
    bool ok = cudaMemGetInfo(&free_bytes, &total_bytes) == cudaSuccess &&
              static_cast<size_t>(size) <= free_bytes &&
              cudaMallocManaged(&ptr, static_cast<size_t>(size), cudaMemAttachGlobal) == cudaSuccess;
    if (ok && advise_preferred(ptr, static_cast<size_t>(size), device) != cudaSuccess) {
        cudaFree(ptr);
        ok = false;
    }
    if (!ok) {
        ptr = nullptr;
        cudaGetLastError();  // do not leave a sticky-looking error for torch to find
    }
    if (previous != device) cudaSetDevice(previous);
    return ptr;
}

// CUDAPluggableAllocator free. cudaFree synchronizes, so no stream is needed.
void qlt_managed_free(void* ptr, ssize_t size, int device, cudaStream_t stream) {
    (void)size;
    (void)device;
    (void)stream;
    if (ptr != nullptr) cudaFree(ptr);
}

// Prefetch [ptr, ptr + size) to `device` (>= 0) or to the host (device = -1),
// ordered on `stream`. Returns the cudaError_t as an int (0 = success).
int qlt_prefetch(void* ptr, size_t size, int device, cudaStream_t stream) {
    if (ptr == nullptr || size == 0) return 0;
    return static_cast<int>(prefetch(ptr, size, device, stream));
}

// The location the driver last prefetched [ptr, ptr + size) to, into *device:
// a device ordinal, -1 for the host, -2 when the range was never prefetched or
// its pages were last prefetched to different places. Returns the cudaError_t.
int qlt_last_prefetch_location(void* ptr, size_t size, int* device) {
    *device = -2;
#if CUDART_VERSION >= 13000
    int type = 0, id = 0;
    cudaError_t err = cudaMemRangeGetAttribute(&type, sizeof(type), cudaMemRangeAttributeLastPrefetchLocationType,
                                               ptr, size);
    if (err == cudaSuccess) {
        err = cudaMemRangeGetAttribute(&id, sizeof(id), cudaMemRangeAttributeLastPrefetchLocationId, ptr, size);
    }
    if (err != cudaSuccess) return static_cast<int>(err);
    if (type == cudaMemLocationTypeDevice) *device = id;
    else if (type == cudaMemLocationTypeHost || type == cudaMemLocationTypeHostNuma ||
             type == cudaMemLocationTypeHostNumaCurrent) *device = -1;
    return 0;
#else
    int id = cudaInvalidDeviceId;
    cudaError_t err = cudaMemRangeGetAttribute(&id, sizeof(id), cudaMemRangeAttributeLastPrefetchLocation, ptr, size);
    if (err != cudaSuccess) return static_cast<int>(err);
    *device = id == cudaCpuDeviceId ? -1 : (id == cudaInvalidDeviceId ? -2 : id);
    return 0;
#endif
}

// cudaGetErrorString for the codes qlt_prefetch returns.
const char* qlt_error_string(int error) {
    return cudaGetErrorString(static_cast<cudaError_t>(error));
}

}  // extern "C"
