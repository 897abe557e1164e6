"""`python -m sd3trt.server serve ...` / `python -m sd3trt.server keys ...` (same as `sd3trt serve|keys`)."""

import sys

from sd3trt.cli import main

sys.exit(main())
