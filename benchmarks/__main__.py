"""`python -m sd3trt.benchmarks [bench] [options]`: the `sd3trt bench` command before core/cli.py wires it."""

import sys

from sd3trt.benchmarks.cli import main

sys.exit(main())
