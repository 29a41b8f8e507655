"""KFP components: one folder per pipeline stage, each a thin wrapper over one amft_lib function.

Why the images are read here, at import time: `@dsl.component(base_image=...)` bakes the image
into the component spec when the module is imported, so the environment that compiles the
pipeline decides which images a cluster pulls. Pin them by digest (`name@sha256:...`) for
reproducible runs; lineage records what was compiled in.

- ``AMFT_IMAGE_CPU``: preflight, data prepare/validate, register, run summary.
- ``AMFT_IMAGE_CUDA``: warm start, training and evaluation on GPU nodes (generation is the cost of
  evaluation: a 1.5B model generates ~8 tokens/s on 2 CPU cores).

Both images install amft_lib and kfp from requirements/lock.txt (docker/), so every component sets
``install_kfp_package=False``: nothing is pip-installed when a task starts, on a cluster or under
``kfp.local``.
"""

from __future__ import annotations

import os

# The Makefile's defaults (REGISTRY=localhost:5000/amft, TAG=dev): `make images` builds exactly these.
DEFAULT_CPU_IMAGE = "localhost:5000/amft/amft-pipeline:cpu-dev"
DEFAULT_CUDA_IMAGE = "localhost:5000/amft/amft-pipeline:cuda-dev"

CPU_IMAGE = os.environ.get("AMFT_IMAGE_CPU") or DEFAULT_CPU_IMAGE
CUDA_IMAGE = os.environ.get("AMFT_IMAGE_CUDA") or DEFAULT_CUDA_IMAGE
