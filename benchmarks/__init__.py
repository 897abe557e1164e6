"""sd3trt benchmark suite: `sd3trt bench` (benchmarks/cli.py); results under benchmarks/results/<machine>/."""
