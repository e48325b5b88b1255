# Sourced by the build and test scripts. Pins the CPU instruction set that torch, MKL and oneDNN
# use, so that a chapter's stored outputs (compared digit for digit by strict nbval) are the same
# on every x86-64 CPU with AVX2, not only on the CPU that executed them. Without these, an
# AVX-512 machine and an AVX2 machine differ in the 8th digit after a few hundred training steps.
export MKL_CBWR=${MKL_CBWR:-AVX2}
export ATEN_CPU_CAPABILITY=${ATEN_CPU_CAPABILITY:-avx2}
export ONEDNN_MAX_CPU_ISA=${ONEDNN_MAX_CPU_ISA:-AVX2}
