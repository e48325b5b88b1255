# Sourced by the build and test scripts. Pins the CPU instruction set that torch, MKL and oneDNN
# use, so that an AVX-512 and an AVX2 Intel machine compute a chapter's stored outputs bit for
# bit (without the pins they differ in the 8th digit after a few hundred training steps). CPUs
# of another vendor still round a few kernels differently; strict nbval compares numbers to a
# tolerance for that (book/conftest.py, CONTRIBUTING.md "Stored outputs on any CPU").
export MKL_CBWR=${MKL_CBWR:-AVX2}
export ATEN_CPU_CAPABILITY=${ATEN_CPU_CAPABILITY:-avx2}
export ONEDNN_MAX_CPU_ISA=${ONEDNN_MAX_CPU_ISA:-AVX2}
