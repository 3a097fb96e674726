# Sourced by the launchers. glibc hands a large freed block (a step's activations and gradients) back to the
# kernel, so the next step page-faults the same memory in again; with large per-step buffers that costs more
# than the embedding kernels themselves (benchmarks/README.md: the exact multi-id compositional step 418 ->
# 221 ms, the unsharded fused one 43 -> 28 ms). Keeping freed memory in the process for reuse removes it.
# Values the user already set win.
export MALLOC_MMAP_THRESHOLD_="${MALLOC_MMAP_THRESHOLD_:-4294967296}"
export MALLOC_TRIM_THRESHOLD_="${MALLOC_TRIM_THRESHOLD_:-68719476736}"
# Tables are read at random rows: with 4 KiB pages a row read of tables larger than the TLB's reach also walks
# the page table. torch backs its large allocations (the TBEs' weights, step buffers) with transparent huge
# pages when asked (this machine's THP mode is "madvise"); ~5% of a step here (benchmarks/README.md).
export THP_MEM_ALLOC_ENABLE="${THP_MEM_ALLOC_ENABLE:-1}"
