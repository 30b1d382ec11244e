"""The parts of `make gpu-check` (bench/gpu_check.py): the run, numerics, the CellSAM and
default-model stages, the carried folder (`make gpu-wheels`)."""
