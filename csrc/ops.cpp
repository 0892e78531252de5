// Every schema of the pcl_ext op library, in one place. Backends register their kernels in
// csrc/cpu/*.cpp and csrc/cuda/*.cu; fake kernels and autograd live in pcl_ext/ops.py.
#include "torch_stable.h"

#ifdef PCL_EXT_PYTHON_MODULE  // set by setup.py; the CMake build is a plain library
#include <Python.h>
// An empty module: importing pcl_ext._C loads this library, which runs the registrations.
// (The library is built with hidden visibility: PyMODINIT_FUNC exports this one symbol.)
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif

STABLE_TORCH_LIBRARY(pcl_ext, m) {
  // Fused ProtoNCE forward. Returns (loss, dloss/dq, dloss/dk, correct): the gradients are
  // accumulated during the forward pass, so backward is a scale by the incoming gradient;
  // correct [1 + M, N] bool tells, per term and row, whether the target logit is the row's
  // largest (top-1 accuracy, for free). `negatives` empty: all-prototype mode; one tensor per
  // clustering: sampled mode. `allow_tf32`: float32 on CUDA may use TF32 tensor cores (the
  // caller passes torch's matmul precision setting, which the stable ABI cannot read).
  m.def(
      "proto_nce(Tensor q, Tensor k, Tensor queue, Tensor[] prototypes, Tensor[] phi, "
      "Tensor[] assignments, Tensor[] negatives, float temperature, *, "
      "bool allow_tf32=False) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // Fused InfoNCE forward: per-row cross-entropy of softmax_j(q_i . k_j / T) against column
  // targets[i], streamed over key tiles (nothing N x K). Returns (losses [N], lse [N] (both in
  // the accumulation dtype: float64 for float64, else float32), d losses_i / d q_i [N, D]
  // accumulated during the pass (empty [0] unless compute_grad_queries), correct [N] bool).
  // exclude_self: column i is left out of row i's softmax (needs N <= K, targets[i] != i).
  m.def(
      "info_nce(Tensor queries, Tensor keys, Tensor targets, float temperature, "
      "bool exclude_self, bool compute_grad_queries, *, bool allow_tf32=False) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // The key gradient of info_nce: sum_i grad_losses_i (P_ij - [j == targets_i]) q_i / T with
  // P_ij = exp(s_ij - lse_i), a second streaming pass over key tiles x row tiles.
  m.def(
      "info_nce_backward(Tensor grad_losses, Tensor queries, Tensor keys, Tensor targets, "
      "Tensor lse, float temperature, bool exclude_self, *, bool allow_tf32=False) -> Tensor");
  // EMA of the key encoder: key[i] <- momentum * key[i] + (1 - momentum) * query[i], in place.
  m.def("momentum_update_(Tensor(a!)[] key, Tensor[] query, float momentum) -> ()");
  // Ring-buffer queue: write `keys` at rows ptr, ptr+1, ... (mod size) of `buffer`, advance ptr.
  m.def("ring_enqueue_(Tensor(a!) buffer, Tensor(b!) ptr, Tensor keys) -> ()");
  // Per-cluster sums for PCL's concentration: (mean sqrt(sq_dist) / log(count + alpha) where
  // count > 1, else 0; member counts).
  m.def("cluster_stats(Tensor sq_dist, Tensor im2cluster, int num_clusters, float alpha) "
        "-> (Tensor, Tensor)");
  // The r free clusters (not in `assignments`) with the smallest random `keys`: r distinct ids,
  // uniform over the free clusters when the keys are i.i.d.
  m.def("sample_negatives(Tensor assignments, Tensor keys, int r) -> Tensor");
}
