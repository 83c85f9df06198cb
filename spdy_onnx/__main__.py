import sys

from spdy_onnx.cli import main

sys.exit(main())
