# Sourced by the launchers. glibc hands a large freed block (a step's activations and gradients) back to the
# kernel, so the next step page-faults the same memory in again; on CPU that costs more than the embedding
# kernels themselves (benchmarks/README.md: a plain sharded EBC step 68 -> 40 ms). Keeping freed memory in
# the process for reuse removes it. Values the user already set win.
export MALLOC_MMAP_THRESHOLD_="${MALLOC_MMAP_THRESHOLD_:-4294967296}"
export MALLOC_TRIM_THRESHOLD_="${MALLOC_TRIM_THRESHOLD_:-68719476736}"
