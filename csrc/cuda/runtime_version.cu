// Reports the CUDA runtime the CUDA kernels were compiled against.
#include <cstdint>
#include <cuda_runtime_api.h>

int64_t lafs_cuda_runtime_version() { return CUDART_VERSION; }
