#!/usr/bin/env python3
"""Build an engine directory from a model set (see docs/ENGINES.md):

    python build_engines.py --models DIR --out DIR --size 512 --precision fp16|fp32 [--onnx-only] [--force]
"""

import sys

from magicanimate_rt.export.build import main

if __name__ == "__main__":
    sys.exit(main())
