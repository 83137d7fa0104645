// Helpers of the CUDA bindings, defined in gpu_ops.cpp and shared with the other bindings of
// moeprep._C_cuda (moe_decode_ops.cpp). Declarations only: no runtime headers here.
#pragma once

namespace moeprep {

// Fails the op, naming it, with the runtime's message if a kernel launcher returned an error code.
void check_launch(int error, const char* op);

// The current stream of the current device, as the launchers take it.
void* stream();

}  // namespace moeprep
