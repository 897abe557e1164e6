"""`python -m sd3trt.server serve ...` / `python -m sd3trt.server keys ...` (same as `sd3trt serve|keys`)."""

import sys

from sd3trt.server.cli import main

sys.exit(main())
