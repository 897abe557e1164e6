"""`python -m sd3trt.benchmarks [bench] [options]`: the same as `sd3trt bench [options]`."""

import sys

from sd3trt.benchmarks.cli import main

sys.exit(main())
