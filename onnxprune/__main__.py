"""python -m onnxprune: the same as the onnxprune command."""

import sys

from .cli import main

sys.exit(main())
