// The LayerNorm backward kernels, for every dtype pair: one of the four
// translation units that compile layer_norm_kernels.cuh (see there), so nvcc builds them in parallel.
#include "layer_norm_kernels.cuh"

LLMKERNELS_FOR_EACH_LAYER_NORM_TYPE(LLMKERNELS_INSTANTIATE_LAYER_NORM_BACKWARD, false)
