"""The multi-rank cases of tests/mpi_worker.py by name, importable without initialising MPI.

tests/test_mpi.py and tests/test_gpu.py parametrize over these lists, and
``test_case_lists_equal_the_workers_registry`` checks them against the worker's own
registry, so a case added to one but not the other fails a test instead of never running.
"""
# Run on the CPU under mpiexec -n 2 and -n 4 (tests/test_mpi.py) and over NCCL (tests/test_gpu.py).
CPU_CASES = (
    "sync_matches_global_reference", "dtypes_and_momentum", "default_comm_is_world",
    "mpi4py_comm_argument_and_groups", "stable_for_large_mean", "stable_at_any_mean_float64",
    "unsynced_differs_negative_control",
    "one_collective_per_pass_and_none_in_eval", "eval_matches_running_statistics", "all_ranks_empty",
    "global_count_one_gives_bias", "lifo_forwards", "bad_input_raises_before_any_collective",
    "debug_mode_raises_on_every_rank", "debug_mode_accepts_valid_differences",
    "skipped_batch_is_detected_on_every_rank", "nonfinite_statistics_leave_running_stats_and_warn",
    "functional_matches_global_reference", "fused_epilogue_matches_global_reference",
    "functional_fused_epilogue_matches_global_reference",
    "allreduce_gradients_sums_and_averages",
    "torch_converted_model_matches_torch_on_whole_batch", "nccl_bootstrap_and_fallback",
)
# Need CUDA: run by tests/test_gpu.py only.
GPU_CASES = ("torch_syncbatchnorm_numerics",)
# Run no kernel of the layer, so are not repeated with the kernels emulated.
NO_KERNEL_CASES = ("nccl_bootstrap_and_fallback", "allreduce_gradients_sums_and_averages",
                   "bad_input_raises_before_any_collective")
