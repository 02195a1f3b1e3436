// Emulation stand-in for <cuda_runtime.h> (tests/cuda_emu).
#pragma once
#include "dit_emu_runtime.h"
